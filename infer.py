"""Run a trained model: classify, embed, classify long documents, generate text, or serve.

    python infer.py --model-path output/checkpoint-best --text "今天天气真好啊"
    python infer.py --model-path models/model.onnx --file data/test.jsonl --output predictions.jsonl
    cut -f2 data/test.tsv | python infer.py --model-path output/checkpoint-best --json
    python infer.py --model-path output/checkpoint-best      # on a terminal: type a text, get its answer
    python infer.py --model-path gpt2-chinese --prompt "今天" --max-new-tokens 40 --top-p 0.9 --seed 1
    python infer.py --model-path output/checkpoint-best --serve --port 8000
    python infer.py --model-path output/vector-best --corpus data/corpus.jsonl --text "a query"
    python infer.py --model-path output/vector-best --serve --corpus data/corpus.jsonl
    python infer.py --model-path reranker/checkpoint-best --text "a query" --text-pair "a document"

--model-path is a model directory written by this toolkit's trainers, an .onnx export from
export_onnx.py, or a causal language model directory (GPT-2 style) for generation. The
task and every preprocessing setting (normalization, max length, truncation side, context
pair) come from the model; --max-length alone may override the stored max length. Exit
codes: 0 every input processed, 1 some inputs could not be processed (each reported with
its line), 2 a usage error.

Inputs come from --text/--prompt, --file, or standard input (see INPUTS_HELP): with no input
flag, a terminal gets the interactive loop and a pipe is read as ``--file -``.

--output is written whole or not at all (a temporary file beside it, then a rename) when
it is a regular file or a new path; a symlink is followed; /dev/null, a FIFO or
/dev/stdout is written to directly, never replaced. An --output that is one of the inputs
(--file, the model's files) is refused.
"""
import argparse
import functools
import importlib
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from common.choices import MAX_RETURN_SEQUENCES
from common.cli import SEED_LIMIT, ArgumentParser, add_flag, bounded, exit_on_help, parse_bool, parse_device
from common.errors import UserError, report_user_errors

EXIT_SOME_FAILED = 1
PLAIN_TEXT_SUFFIXES = (".txt", ".text", "")
EMBEDDING_VALUES_SHOWN = 8
PREVIEW_CHARACTERS = 200  # a long document's echo in text output is clipped to this
DEFAULT_HITS = 5  # --corpus entries listed per input when --top-k is not given
STDIN = "-"  # --file - reads standard input
STDIN_NAME = "stdin"  # how errors name standard input ("stdin line 3: ...")
PROMPT = "> "
INPUTS_HELP = """inputs:
  --text/--prompt, --file, or standard input: "--file -", or no input flag while standard input
  is not a terminal. Standard input is read as JSON records (JSON Lines or a JSON array) when its
  first non-space character is { or [, else as one input per line (a long-document model reads
  all of it as one document).
  With no input flag on a terminal, infer.py is interactive: type a text (a prompt, for a causal
  language model) and press Enter to see its answer; an empty line, Ctrl-D or Ctrl-C ends it.
"""
# flags that mean something only for some kinds of model: given for another kind they are an error,
# never silently ignored ("generation" is a causal language model)
# ("rerank": a classification directory trained with --problem-type rerank, scoring query/document pairs)
TASK_FLAGS = {"context": ("classification",), "text_pair": ("vector", "rerank"), "corpus": ("vector",),
              "explain": ("longdoc",), "max_length": ("classification", "vector", "longdoc", "rerank"),
              "top_k": ("classification", "longdoc", "generation", "vector"),
              "temperature": ("classification", "longdoc", "generation"), "threshold": ("classification", "longdoc"),
              "dim": ("vector",)}
# classifier flags that mean something only for some problem types (common/problem_types.py)
PROBLEM_TYPE_FLAGS = {"temperature": ("single_label",), "threshold": ("multi_label",),
                      "top_k": ("single_label", "multi_label"), "explain": ("single_label",)}


def build_parser():
    parser = ArgumentParser(description=__doc__.split("\n")[0], epilog=INPUTS_HELP,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flag(parser, "model-path", required=True,
             help="model directory, .onnx export, or causal LM directory (generation)")
    add_flag(parser, "backend", choices=["auto", "torch", "onnx"], default="auto",
             help="auto: onnx for .onnx files, torch for directories")
    add_flag(parser, "device", type=parse_device, default="cpu",
             help="auto (cuda when available, else cpu), cpu, mps, cuda or cuda:N")
    add_flag(parser, "tokenizer-path", default=None,
             help="tokenizer of an .onnx export (default: tokenizer/ beside it)")
    inputs = parser.add_argument_group("inputs")
    add_flag(inputs, "text", action="append", default=[], help="text to run (repeatable)")
    add_flag(inputs, "context", default=None, help="context for every --text (encoded as the first segment)")
    add_flag(inputs, "text-pair", action="append", default=[],
             help="vector models: second text(s) for the cosine similarity; rerankers: the document(s) each "
                  "--text (the query) is scored against (one, or one per --text)")
    add_flag(inputs, "file", default=None,
             help="inputs: .txt (one per line; long-document models: the whole file is one document) "
                  "or JSON/JSONL/CSV/TSV records (text, message/context, messages), one input per record; "
                  "- reads standard input (JSON records when it starts with { or [, else lines)")
    add_flag(inputs, "text-field", default=None, help="record field holding the text when it is not 'text'")
    add_flag(inputs, "output", default=None,
             help="write results as JSONL here (input order); checked before the model loads, written atomically "
                  "(a device, FIFO or /dev/stdout is written directly); must not be an input file")
    add_flag(inputs, "max-length", type=bounded(int, minimum=3), default=None,
             help="override the model's stored max length in tokens (vector models: query and document); "
                  "3 up to the model's positions")
    add_flag(inputs, "batch-size", type=bounded(int, minimum=1), default=32, help="texts per forward pass")
    add_flag(inputs, "sort-by-length", type=parse_bool, default=True, metavar="true|false",
             help="form batches of similar token length (results still come back in input order)")
    outputs = parser.add_argument_group("classification")
    add_flag(outputs, "temperature", type=bounded(float, minimum=0), default=None,
             help="softmax temperature, > 0 (default: the calibrated one stored with the model, else 1.0); "
                  "generation: sampling temperature, 0 = greedy (default 1.0)")
    add_flag(outputs, "threshold", type=bounded(float, minimum=0, maximum=1), default=None,
             help="multi-label models: one decision threshold for every label, in [0, 1] (default: the "
                  "per-label thresholds tuned on validation and stored with the model)")
    add_flag(outputs, "top-k", type=bounded(int, minimum=0), default=None,
             help="show the k most probable labels; generation: top-k sampling (default 50, 0 = off); "
                  f"vector models with --corpus: entries listed per input (default {DEFAULT_HITS})")
    add_flag(outputs, "dim", type=bounded(int, minimum=1), default=None,
             help="vector models: embeddings cut to this size (one the model was trained for with "
                  "--matryoshka-dims); with --serve, /v1/embeddings takes 'dimensions' per request")
    add_flag(outputs, "json", action="store_true", help="print one JSON object per input instead of text")
    add_flag(outputs, "explain", type=bounded(int, minimum=0), default=0, metavar="N",
             help="long-document models: show the N chunks that weigh most in the decision")
    generate = parser.add_argument_group("generation (causal language models)")
    add_flag(generate, "prompt", action="append", default=[], help="prompt to continue (repeatable)")
    add_flag(generate, "max-new-tokens", type=bounded(int, minimum=1), default=50,
             help="tokens to generate per prompt; beyond the model's positions (n_positions minus the prompt's "
                  "tokens) it is lowered to fit, with a warning")
    add_flag(generate, "top-p", type=bounded(float, above=0, maximum=1), default=1.0,
             help="nucleus sampling probability mass, in (0, 1]")
    add_flag(generate, "repetition-penalty", type=bounded(float, above=0), default=1.0,
             help=">1 discourages repeating tokens (> 0)")
    add_flag(generate, "num-return-sequences", type=bounded(int, minimum=1, maximum=MAX_RETURN_SEQUENCES),
             default=1, help=f"continuations per prompt (1 to {MAX_RETURN_SEQUENCES})")
    add_flag(generate, "seed", type=bounded(int, minimum=0, below=SEED_LIMIT), default=None,
             help="seed for reproducible sampling")
    serve = parser.add_argument_group("serving")
    add_flag(serve, "serve", action="store_true", help="serve the model over HTTP (common.server)")
    add_flag(serve, "host", default="127.0.0.1", help="address to listen on")
    add_flag(serve, "port", type=bounded(int, minimum=1, maximum=65535), default=8000, help="port to listen on")
    add_flag(serve, "corpus", default=None,
             help="vector models: JSONL of {id, text} encoded at start-up; each input lists its nearest "
                  "entries (with --serve: POST /search)")
    add_flag(serve, "api-key", default=None, help="require this key ('Authorization: Bearer KEY' or 'X-API-Key: KEY'); "
                  "default: the TOOLKIT_API_KEY environment variable, else no key")
    add_flag(serve, "max-queue", type=bounded(int, minimum=1), default=None,
             help="requests that may wait for the model (default 256); past it a new one gets 429 at once")
    add_flag(serve, "max-batch-tokens", type=bounded(int, minimum=1), default=None,
             help="tokens per batch of merged requests (default 16384, as TEI); a longer request runs alone")
    add_flag(serve, "workers", type=bounded(int, minimum=1), default=1,
             help="server processes on the one port, each with its own copy of the model and its share of the "
                  "CPU cores (docs/infer.md: replicas behind a load balancer)")
    return parser


# --help answers before the imports below: they load torch, which takes seconds (common/cli.py)
if __name__ == "__main__":
    exit_on_help(build_parser)

import numpy as np  # noqa: E402

from common import data, files, generation, inference, problem_types, sharding  # noqa: E402


# ---------------------------------------------------------------- inputs

@dataclass
class InputItem:
    """One input and where it came from; ``pair`` is its --text-pair; ``error`` is set when it cannot be
    processed."""
    locator: str
    text: str | None = None
    context: str | None = None
    error: str | None = None
    pair: str | None = None


def collect_inputs(args, task=None):
    """Every --text, --prompt and --file input, in order, with bad ones marked (``task`` of the model)."""
    items = [InputItem(f"--text {index}", text, args.context) for index, text in enumerate(args.text, start=1)]
    items += [InputItem(f"--prompt {index}", text) for index, text in enumerate(args.prompt, start=1)]
    if args.file:
        items += read_file_inputs(args.file, args.text_field, task)
    if not items:
        raise UserError("no input: give --text, --prompt or --file (or --serve)")
    for item in items:
        if item.error is None and (not isinstance(item.text, str) or not item.text.strip()):
            item.error = "empty or whitespace-only text"
    attach_text_pairs(args, items)
    return items


def attach_text_pairs(args, items):
    """Give each input its --text-pair (one for all, or one each), counted over every input: pairing them
    with the valid inputs only, after a bad one is dropped, would name the wrong count or mispair them."""
    if not args.text_pair:
        return
    if len(args.text_pair) not in (1, len(items)):
        raise UserError(f"--text-pair: give one, or one per input ({len(items)}), not {len(args.text_pair)}")
    pairs = args.text_pair if len(args.text_pair) == len(items) else args.text_pair * len(items)
    for index, (item, pair) in enumerate(zip(items, pairs)):
        item.pair = pair
        if item.error is None and not pair.strip():
            number = index + 1 if len(args.text_pair) > 1 else 1
            item.error = f"--text-pair {number}: empty or whitespace-only text"


def read_file_inputs(path, text_field=None, task=None):
    """Inputs of a .txt file (one per line; one document for a long-document model), of records, or of
    standard input (``path`` "-")."""
    if path == STDIN:
        return read_stream_inputs(read_standard_input(), text_field, task)
    file_path = Path(path)
    if file_path.is_file() and file_path.suffix.lower() in PLAIN_TEXT_SUFFIXES:
        return read_text_inputs(data.read_text_file(file_path), str(file_path), task)
    return record_inputs(data.read_records(path, skip_invalid=True), path, text_field, task)


def read_stream_inputs(text, text_field=None, task=None, source=STDIN_NAME):
    """Inputs of text read from a stream: JSON records when it starts with { or [, else as a .txt file."""
    if not text.strip():
        raise UserError(f"no input: {source} is empty (give --text, --prompt or --file, or pipe inputs in)")
    if text.lstrip()[0] not in "{[":
        return read_text_inputs(text, source, task)
    return record_inputs(data.parse_records(source, text, skip_invalid=True), source, text_field, task)


def record_inputs(records, path, text_field=None, task=None):
    """One input per record; a record that cannot be used is kept in its place, marked with the reason."""
    unreadable = [InputItem(_locator_of(message, path), error=message) for message in records.skipped]
    record_format = data.detect_format(records[0], text_field)
    items = []
    for record in records:
        try:
            example = data.parse_text_example(record, record_format, text_field or "text", require_label=False)
            if example.context and task in ("vector", "longdoc"):
                raise data.RecordError(f"{record.where('context')}: a {task} model takes no context")
            check_record_encodable(record, example, record_format, text_field)
            items.append(InputItem(record.where(), example.text, example.context))
        except data.RecordError as error:
            items.append(InputItem(record.where(), error=str(error)))
    return sorted(unreadable + items, key=_position)


def check_record_encodable(record, example, record_format, text_field=None):
    """A lone surrogate ("\\ud800" is legal JSON) makes the tokenizer raise: refuse the record, not the run."""
    text_name = {"chat": "messages", "message": "message"}.get(record_format, text_field or "text")
    for name, value in ((text_name, example.text), ("context", example.context)):
        position = inference.unencodable_position(value) if isinstance(value, str) else None
        if position is not None:
            raise data.RecordError(f"{record.where(name)}: {inference.describe_unencodable(position)}")


# Piped inputs are read whole before the first answer, and short lines take about 25x their size in
# memory: the cap keeps an endless stream (`< /dev/zero`, `yes |`) from taking the machine down.
MAX_STDIN_BYTES = 256 * 2**20


def read_standard_input():
    """All of standard input as text (UTF-8; a byte-order mark is dropped)."""
    if sys.stdin is None:  # started with standard input closed (`<&-`)
        raise UserError("no input: standard input is closed (give --text, --prompt or --file)")
    raw = getattr(sys.stdin, "buffer", sys.stdin).read(MAX_STDIN_BYTES + 1)
    if len(raw) > MAX_STDIN_BYTES:
        raise UserError(f"{STDIN_NAME}: more than {MAX_STDIN_BYTES // 2**20} MiB without an end (an endless stream, "
                        "such as `yes |`?); write the inputs to a file and give --file")
    if isinstance(raw, str):  # a text stream without a byte buffer underneath
        return raw.removeprefix("\ufeff")
    return data.decode_utf8(raw, STDIN_NAME)


def read_text_inputs(text, source, task=None):
    """One input per line; a long-document model reads the whole text as one document (an article's
    paragraphs and blank lines belong to it, not to many inputs)."""
    if not text.strip():
        raise UserError(f"{source}: the file is empty")
    if task == "longdoc":
        return [InputItem(source, text)]
    lines = text.splitlines()
    while lines and not lines[-1].strip():  # a trailing newline does not make an empty last input
        lines.pop()
    return [InputItem(f"{source} line {number}", line) for number, line in enumerate(lines, start=1)]


def _locator_of(message, path):
    match = re.search(r"(line|record|row) (\d+)", message)
    return f"{path} {match.group(0)}" if match else str(path)


def _position(item):
    match = re.search(r"(line|record|row) (\d+)$", item.locator)
    return int(match.group(2)) if match else 0


def resolve_input_source(args):
    """True for the interactive loop: no input flag, and a terminal on standard input.

    With no input flag and standard input piped or redirected, it is read as ``--file -``.
    """
    if args.text or args.prompt or args.file or args.serve:
        return False
    if sys.stdin is not None and sys.stdin.isatty():
        if args.output:
            raise UserError("--output needs inputs: give --text, --prompt or --file, or pipe them in "
                            "(with none, on a terminal, infer.py answers interactively)")
        return True
    args.file = STDIN
    return False


# ---------------------------------------------------------------- running each task

@dataclass
class Runner:
    """One loaded model, ready to answer inputs; ``kind`` is its task, or "generation" for a causal LM."""
    kind: str
    loaded: object = None  # inference.LoadedModel (classification, longdoc, vector)
    language_model: tuple = None  # (model, tokenizer) of a causal LM
    options: object = None  # generation.GenerationOptions
    corpus: object = None  # server.Corpus: vector results list their nearest entries

    def run(self, items, args, progress=False):
        """Results of the valid ``items``, in order; an input that fails later is marked on its item."""
        if self.kind == "generation":
            return run_generation(self.language_model, items, self.options, progress)
        if self.kind == "vector":
            return run_vectors(self.loaded, items, args, self.corpus, progress)
        if self.kind == "rerank":
            return run_reranker(self.loaded, items, args, progress)
        return run_classification(self.loaded, items, args, progress)


def run_classification(loaded, items, args, progress=False):
    texts = [item.text for item in items]
    contexts = [item.context for item in items] if any(item.context for item in items) else None
    if loaded.task == "longdoc":
        return inference.predict_long_documents(loaded, texts, args.temperature, args.batch_size, args.explain,
                                                args.top_k, progress, args.threshold,
                                                input_name=lambda index: items[index].locator)
    return inference.classify(loaded, texts, contexts, args.temperature, args.batch_size, args.top_k,
                              args.sort_by_length, progress, args.threshold)


def run_reranker(loaded, items, args, progress=False):
    """Each input is a query, scored against its --text-pair document: sigmoid of the reranker's logit."""
    from common import reranking
    documents = [item.pair for item in items]
    scores = reranking.score_pairs(loaded, [item.text for item in items], documents, args.batch_size, progress)
    return [{"query": item.text, "document": document, "score": round(float(score), 6)}
            for item, document, score in zip(items, documents, scores)]


def run_vectors(loaded, items, args, corpus=None, progress=False):
    embeddings = inference.embed(loaded, [item.text for item in items], args.batch_size,
                                 sort_by_length=args.sort_by_length, progress=progress, dim=args.dim)
    results = [{"input": item.text, "dim": int(vector.shape[0]), "norm": round(float(np.linalg.norm(vector)), 6),
                "embedding": [round(float(value), 6) for value in vector]} for item, vector in zip(items, embeddings)]
    if args.text_pair:
        pairs = [item.pair for item in items]
        pair_embeddings = inference.embed(loaded, pairs, args.batch_size, side="doc", dim=args.dim)
        for result, pair, vector, pair_vector in zip(results, pairs, embeddings, pair_embeddings):
            result.update(text_pair=pair, cosine_similarity=round(inference.cosine_similarity(vector, pair_vector), 6))
    if corpus is not None:
        nearest = inference.nearest_rows(corpus.matrix, embeddings, args.top_k or DEFAULT_HITS)
        for result, hits in zip(results, nearest):
            result["hits"] = [{"id": corpus.ids[row], "score": round(score, 6), "text": corpus.texts[row]}
                              for row, score in hits]
    return results


def load_search_corpus(loaded, args):
    """The --corpus entries, encoded once on the document side, for each input's nearest entries."""
    from common import server
    ids, texts = server.load_corpus_records(args.corpus)
    service = inference.VectorService(loaded, args.batch_size)
    return server.build_corpus(service, ids, texts, show_progress=sys.stderr.isatty())


def generation_options(args):
    """The decoding settings, checked together (greedy with several sequences) before the model loads."""
    return generation.GenerationOptions(
        max_new_tokens=args.max_new_tokens, temperature=1.0 if args.temperature is None else args.temperature,
        top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
        num_return_sequences=args.num_return_sequences, seed=args.seed).check()


def run_generation(language_model, items, options, progress=False):
    """Continue each prompt; a prompt that cannot be continued is marked on its item, the others still run."""
    model, tokenizer = language_model
    prompts = inference.progress_bar([item.text for item in items], "generation", enabled=progress, unit="prompt")
    results = generation.generate_texts(model, tokenizer, prompts, options, skip_errors=True)
    for item, result in zip(items, results):
        if "error" in result:
            item.error = result["error"]
    return [result for result in results if "error" not in result]


# ---------------------------------------------------------------- the interactive loop

def interactive_loop(answer, lines, output=None):
    """Print ``answer(line)`` for each line until an empty line, the end of ``lines`` or Ctrl-C; returns 0.

    A problem with one line (a UserError) is printed as one ``error:`` line and the loop goes on.
    """
    output = output or sys.stdout
    try:
        for line in lines:
            if not line.strip():
                break
            try:
                print(answer(line), file=output, flush=True)
            except UserError as error:
                print(f"error: {error}", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        print(file=output)  # Ctrl-C leaves the cursor after the prompt: the shell's prompt gets its own line
    return 0


def prompt_lines(prompt=PROMPT):
    """Lines typed at the terminal, until Ctrl-D."""
    if sys.stdin is sys.__stdin__:
        try:
            importlib.import_module("readline")  # imported for its effect: line editing and history in input()
        except ImportError:
            pass
    while True:
        try:
            yield input(prompt)
        except EOFError:
            print()
            return
        except UnicodeDecodeError:
            print(f"error: the line is not valid {sys.stdin.encoding or 'UTF-8'} text", file=sys.stderr)


def answer_line(runner, args, text):
    """The interactive loop's answer to one typed line: --json's object, or the short text form."""
    position = inference.unencodable_position(text)
    if position is not None:
        raise UserError(inference.describe_unencodable(position))
    item = InputItem("input", text, args.context)
    attach_text_pairs(args, [item])
    if item.error:
        raise UserError(item.error)
    results = runner.run([item], args)
    if item.error:
        raise UserError(item.error)
    return json_line(results[0]) if args.json else format_answer(results[0], runner.kind)


def run_interactive(runner, args, lines=None):
    """Answer lines typed at the terminal (``lines`` for tests) until an empty line, Ctrl-D or Ctrl-C."""
    what = "a prompt" if runner.kind == "generation" else "a text"
    print(f"{args.model_path} ({runner.kind}): type {what} and press Enter; an empty line, Ctrl-D or Ctrl-C "
          "quits", file=sys.stderr)
    return interactive_loop(lambda text: answer_line(runner, args, text), prompt_lines() if lines is None else lines)


# ---------------------------------------------------------------- printing

def preview(text, limit=PREVIEW_CHARACTERS):
    """``text`` for a one-line echo: a long or multi-line document is flattened and clipped."""
    if len(text) <= limit and "\n" not in text:
        return text
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else f"{flat[:limit]}… ({len(text)} characters)"


def chunk_lines(result):
    """--explain's chunks, one line each."""
    return [f"  chunk {chunk['chunk_idx']} (score {chunk['score']:.4f}, characters {chunk['char_start']}-"
            f"{chunk['char_end']}): {' '.join(chunk['text'].split())}" for chunk in result.get("top_chunks", [])]


def format_classification(result):
    """Input, the prediction, every label's probability (a long input is clipped)."""
    lines = [f"input: {preview(result['input'])}"]
    if result.get("context"):
        lines.append(f"context: {preview(result['context'])}")
    lines += problem_types.of_result(result).decision_lines(result)  # the label, the labels or the score
    if "probabilities" not in result:  # a score
        return "\n".join(lines)
    ranked = result.get("top_k") or [{"label": name, "probability": p} for name, p in result["probabilities"].items()]
    lines.append("probabilities:" if "top_k" not in result else f"top {len(ranked)}:")
    width = max(len(str(entry["label"])) for entry in ranked)
    thresholds = result.get("thresholds", {})
    lines += [f"  {str(entry['label']):<{width}}  {entry['probability']:.4f}" +
              (f"  (threshold {thresholds[entry['label']]:.4f})" if entry["label"] in thresholds else "")
              for entry in ranked]
    if "num_chunks" in result:
        lines.append(f"chunks: {result['num_chunks']} of {result['num_windows']} windows")
    return "\n".join(lines + chunk_lines(result))


def embedding_line(result):
    shown = ", ".join(f"{value:.4f}" for value in result["embedding"][:EMBEDDING_VALUES_SHOWN])
    return f"embedding (dim {result['dim']}): [{shown}, ...]"


def hit_lines(result):
    return [f"  {rank}. {hit['score']:.4f}  {hit['id']}  {preview(hit['text'], 80)}"
            for rank, hit in enumerate(result["hits"], start=1)]


def format_vector(result):
    lines = [f"input: {preview(result['input'])}", embedding_line(result), f"norm: {result['norm']:.4f}"]
    if "text_pair" in result:
        lines += [f"text pair: {result['text_pair']}", f"cosine similarity: {result['cosine_similarity']:.4f}"]
    if "hits" in result:
        lines += [f"nearest {len(result['hits'])} of --corpus:"] + hit_lines(result)
    return "\n".join(lines)


def format_generation(result):
    lines = [f"prompt: {result['prompt']}"]
    for index, text in enumerate(result["generations"], start=1):
        lines.append(f"[{index}] {result['prompt']}{text}")
    return "\n".join(lines)


def format_rerank(result):
    return (f"query: {preview(result['query'])}\ndocument: {preview(result['document'])}\n"
            f"score: {result['score']:.4f}")


def format_result(result, kind):
    if kind == "vector":
        return format_vector(result)
    if kind == "rerank":
        return format_rerank(result)
    if kind == "generation":
        return format_generation(result)
    return format_classification(result)


def format_answer(result, kind):
    """The interactive loop's short form: the answer alone, not an echo of the line just typed."""
    if kind == "generation":
        texts = [result["prompt"] + text for text in result["generations"]]
        return texts[0] if len(texts) == 1 else "\n".join(f"[{index}] {text}" for index, text in
                                                           enumerate(texts, start=1))
    if kind == "rerank":
        return f"score {result['score']:.4f}"
    if kind == "vector":
        lines = hit_lines(result) if "hits" in result else [embedding_line(result)]
        if "cosine_similarity" in result:
            lines.append(f"cosine similarity to the text pair: {result['cosine_similarity']:.4f}")
        return "\n".join(lines)
    if "problem_type" in result:  # multi-label or regression: the labels or the score
        return "\n".join(problem_types.of_result(result).decision_lines(result))
    lines = [f"{result['label']} (probability {result['probability']:.4f})"]
    lines += [f"  {entry['label']}  {entry['probability']:.4f}" for entry in result.get("top_k", [])[1:]]
    return "\n".join(lines + chunk_lines(result))


def emit(items, results, kind, args):
    """Print (text or --json) and write --output JSONL, with failed inputs in their place."""
    by_index = iter(results)
    rows = []
    for item in items:
        if item.error:
            rows.append({"source": item.locator, "error": item.error})
        else:
            rows.append(dict(next(by_index), source=item.locator))
    if args.output:
        written = files.write_output_file(args.output, "".join(json_line(row) + "\n" for row in rows))
        print(f"wrote {len(rows)} results to {written}", file=sys.stderr)
        return
    try:
        for row in rows:
            if args.json:
                print(json_line(row))
            elif "error" not in row:
                print(format_result(row, kind) + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        # the reader went away (`| head -1`): point stdout at /dev/null so the exit flush cannot raise again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise UserError("standard output was closed before every result was printed (broken pipe)") from None


def json_line(row):
    """One row as JSON. Non-ASCII stays readable; a file name that is not valid UTF-8 is escaped instead
    of failing the write. allow_nan=False: NaN and Infinity are not JSON."""
    line = json.dumps(row, ensure_ascii=False, allow_nan=False)
    return line if inference.unencodable_position(line) is None else json.dumps(row, allow_nan=False)


def check_output(args):
    """Refuse an --output that would overwrite an input or cannot be written, before the model loads."""
    files.refuse_overwriting_inputs(args.output, input_paths(args))
    files.check_output_path(args.output)


def input_paths(args):
    """(flag, path) of everything this run reads: --output must not replace any of them."""
    paths = [("--file", None if args.file == STDIN else args.file), ("--model-path", args.model_path),
             ("--tokenizer-path", args.tokenizer_path), ("--corpus", args.corpus)]
    if Path(args.model_path).suffix == ".onnx":
        paths += [("--model-path", companion) for companion in inference.onnx_companions(args.model_path)]
    return paths


def report_failures(items):
    failed = [item for item in items if item.error]
    for item in failed:
        # a record's error already names its file and line
        where = "" if item.error.startswith(item.locator) else f"{item.locator}: "
        print(f"skipped {where}{item.error}", file=sys.stderr)
    if failed:
        print(f"{len(failed)} of {len(items)} input(s) could not be processed", file=sys.stderr)
    return EXIT_SOME_FAILED if failed else 0


# ---------------------------------------------------------------- main

def serve(runner, args):
    """Serve the runner's model; with --workers, each worker process loads its own copy (the corpus is
    encoded once, here) and this process lets go of its copy, which served to check the flags."""
    from common import server
    corpus_entries = server.load_corpus_records(args.corpus) if args.corpus else None
    service = inference.build_service(runner.loaded, args.temperature, args.batch_size, args.threshold)
    corpus = server.build_corpus(service, *corpus_entries) if corpus_entries else None
    if args.workers > 1:
        runner.loaded = service = None
        has_key = server.resolve_api_key(args.api_key) is not None
        return server.serve(functools.partial(build_app, args, corpus), args.host, args.port, workers=args.workers,
                            has_key=has_key)
    app = server.create_app(service, api_key=args.api_key, corpus=corpus, **server.work_limit_options(args))
    server.serve(app, args.host, args.port)
    return 0


def build_app(args, corpus=None):
    """The server app for ``args``, with a model of its own (what each --workers process runs)."""
    from common import server
    service = inference.build_service(load_model(args), args.temperature, args.batch_size, args.threshold)
    return server.create_app(service, api_key=args.api_key, corpus=corpus, **server.work_limit_options(args))


def check_args(args):
    """Combinations of flags, paths and command-line texts (ranges are the flag types' job)."""
    if args.output and args.serve:
        raise UserError("--output is for batch runs; --serve answers over HTTP")
    if args.serve:
        from common import server
        server.resolve_api_key(args.api_key)  # a bad key fails before the model loads
    check_path_flags(args)
    check_command_line_texts(args)


def check_path_flags(args):
    """Paths no loader should ever be handed: empty, with a NUL byte, or a --file that never ends."""
    if args.output is not None and not args.output.strip():
        raise UserError("--output: empty path")
    for flag in ("model_path", "file", "output", "tokenizer_path", "corpus"):
        if "\0" in (getattr(args, flag) or ""):  # os calls raise ValueError on it, not OSError
            raise UserError(f"--{flag.replace('_', '-')}: a path cannot contain a NUL byte")
    file_path = Path(args.file) if args.file and args.file != STDIN else None
    if file_path is not None and file_path.exists() and not (file_path.is_file() or file_path.is_dir()):
        raise UserError(f"--file {args.file}: not a regular file (a FIFO or device could be read forever)")


def check_command_line_texts(args):
    """Bytes that are not UTF-8 in argv arrive as lone surrogates, which the tokenizer refuses."""
    for flag, texts in (("--text", args.text), ("--prompt", args.prompt), ("--text-pair", args.text_pair),
                        ("--context", [args.context] if args.context else [])):
        for index, text in enumerate(texts, start=1):
            position = inference.unencodable_position(text)
            if position is not None:
                raise UserError(f"{flag} {index}: {inference.describe_unencodable(position)}")


def check_temperature(args, causal):
    """0 means greedy decoding for a language model; a classifier's softmax cannot divide by it."""
    if args.temperature == 0 and not causal:
        raise UserError("--temperature 0: a classifier's softmax temperature must be > 0 "
                        "(0 means greedy decoding, for causal language models)")


def check_task_flags(args, task, loaded_toolkit=None):
    """A flag given for a kind of model it does nothing for is a mistake worth saying, not ignoring."""
    for name, tasks in TASK_FLAGS.items():
        if getattr(args, name) and task not in tasks:
            flag = "--" + name.replace("_", "-")
            raise UserError(f"{flag} is for {' and '.join(tasks)} models; {args.model_path} is a {task} model")
    if task == "vector" and args.dim and (args.serve or args.corpus):
        raise UserError("--dim is for embeddings printed by infer.py; with --corpus or --serve the full size is "
                        "used (POST /v1/embeddings takes 'dimensions')")
    problem_type = (loaded_toolkit or {}).get("problem_type") or "single_label"
    for name, owners in PROBLEM_TYPE_FLAGS.items():
        value = getattr(args, name)
        given = value is not None and not (name == "explain" and value == 0)
        if given and problem_type not in owners and task in ("classification", "longdoc"):
            raise UserError(f"--{name.replace('_', '-')} is for {' and '.join(owners)} models; "
                            f"{args.model_path} is a {problem_type} model")
    if task == "vector" and args.top_k and (args.serve or not args.corpus):
        raise UserError("--top-k for a vector model is the number of --corpus entries listed per input: give "
                        "--corpus" + (" (with --serve, POST /search takes top_k)" if args.serve else ""))


def load_model(args):
    """The model, with --max-length applied (and said, when it differs from the stored value)."""
    loaded = inference.load_model(args.model_path, args.backend, args.device, args.tokenizer_path)
    check_task_flags(args, model_kind(loaded), loaded.toolkit)
    if model_kind(loaded) == "rerank" and not args.text_pair and not args.serve:
        raise UserError(f"{args.model_path} is a reranker: give the document to score with --text-pair "
                        "(--text is the query)")
    if args.max_length is not None:
        changed = inference.override_max_length(loaded, args.max_length)
        if changed:
            stored = ", ".join(f"{name} {value}" for name, value in changed.items())
            print(f"--max-length {args.max_length} overrides the model's stored {stored} "
                  "(the rest of the preprocessing still comes from the model)", file=sys.stderr)
    return loaded


def load_runner(args, generation_settings=None):
    """A causal LM (with its ``generation_settings``), or any model this toolkit writes."""
    if generation_settings is not None:
        return Runner("generation", language_model=generation.load_causal_lm(args.model_path, args.device),
                      options=generation_settings)
    loaded = load_model(args)
    if args.prompt:
        raise UserError(f"--prompt is for causal language models; {args.model_path} is a {loaded.task} model "
                        "(use --text)")
    return Runner(model_kind(loaded), loaded)


def model_kind(loaded):
    """The model's task, or "rerank" for a classification directory trained as a reranker."""
    from common.reranking import is_reranker
    return "rerank" if is_reranker(loaded.toolkit) else loaded.task


@report_user_errors
def main(argv=None):
    args = build_parser().parse_args(argv)
    check_args(args)
    interactive = resolve_input_source(args)
    if args.output:  # before any work: a bad path must not cost a whole run
        check_output(args)
    args.device = inference.resolve_device(args.device)
    context = sharding.start_file_run(args)  # under torchrun: this process's share of --file
    causal = generation.is_causal_lm_directory(args.model_path)
    check_temperature(args, causal)
    options, items = None, None
    if causal:  # everything is checked and read before the model loads
        if args.serve:
            raise UserError("--serve is for classifiers and vector models, not causal language models")
        check_task_flags(args, "generation")
        options = generation_options(args)
        items = None if interactive else collect_inputs(args)
    # other models load first: a long-document model reads a text file as one document, not as lines
    runner = load_runner(args, options)
    if args.serve:
        return serve(runner, args)
    if runner.kind == "vector" and args.corpus:
        runner.corpus = load_search_corpus(runner.loaded, args)
    if interactive:
        return run_interactive(runner, args)
    items = items or collect_inputs(args, runner.kind)
    valid = [item for item in items if not item.error]
    results = sharding.run_sharded(context, lambda share: runner.run(share, args, progress=bool(args.file) and context.is_main), valid)
    if not context.is_main:
        return 0  # the main process writes every share's results
    emit(items, results, runner.kind, args)
    return report_failures(items)


if __name__ == "__main__":
    raise SystemExit(main())
