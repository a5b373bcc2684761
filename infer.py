"""Run a trained model: classify, embed, classify long documents, generate text, or serve.

    python infer.py --model-path output/checkpoint-best --text "今天天气真好啊"
    python infer.py --model-path models/model.onnx --file data/test.jsonl --output predictions.jsonl
    python infer.py --model-path gpt2-chinese --prompt "今天" --max-new-tokens 40 --top-p 0.9 --seed 1
    python infer.py --model-path output/checkpoint-best --serve --port 8000
    python infer.py --model-path output/vector-best --serve --corpus data/corpus.jsonl

--model-path is a model directory written by this toolkit's trainers, an .onnx export from
export_onnx.py, or a causal language model directory (GPT-2 style) for generation. The
task and every preprocessing setting (normalization, max length, truncation side, context
pair) come from the model; --max-length alone may override the stored max length. Exit
codes: 0 every input processed, 1 some inputs could not be processed (each reported with
its line), 2 a usage error.

--output is written whole or not at all (a temporary file beside it, then a rename) when
it is a regular file or a new path; a symlink is followed; /dev/null, a FIFO or
/dev/stdout is written to directly, never replaced. An --output that is one of the inputs
(--file, the model's files) is refused.
"""
import argparse
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common import data, files, generation, inference
from common.cli import SEED_LIMIT, ArgumentParser, add_flag, bounded, parse_bool, parse_device
from common.errors import UserError, report_user_errors

EXIT_SOME_FAILED = 1
PLAIN_TEXT_SUFFIXES = (".txt", ".text", "")
EMBEDDING_VALUES_SHOWN = 8
# flags that mean something only for some kinds of model: given for another kind they are an error,
# never silently ignored ("generation" is a causal language model)
TASK_FLAGS = {"context": ("classification",), "text_pair": ("vector",), "corpus": ("vector",),
              "explain": ("longdoc",), "max_length": ("classification", "vector", "longdoc"),
              "top_k": ("classification", "longdoc", "generation"),
              "temperature": ("classification", "longdoc", "generation")}


def build_parser():
    parser = ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
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
             help="vector models: second text(s) for the cosine similarity (one, or one per --text)")
    add_flag(inputs, "file", default=None,
             help="inputs: .txt (one per line; long-document models: the whole file is one document) "
                  "or JSON/JSONL/CSV/TSV records (text, message/context, messages), one input per record")
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
    add_flag(outputs, "top-k", type=bounded(int, minimum=0), default=None,
             help="show the k most probable labels; generation: top-k sampling (default 50, 0 = off)")
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
    add_flag(generate, "num-return-sequences", type=bounded(int, minimum=1, maximum=generation.MAX_RETURN_SEQUENCES),
             default=1, help=f"continuations per prompt (1 to {generation.MAX_RETURN_SEQUENCES})")
    add_flag(generate, "seed", type=bounded(int, minimum=0, below=SEED_LIMIT), default=None,
             help="seed for reproducible sampling")
    serve = parser.add_argument_group("serving")
    add_flag(serve, "serve", action="store_true", help="serve the model over HTTP (common.server)")
    add_flag(serve, "host", default="127.0.0.1", help="address to listen on")
    add_flag(serve, "port", type=bounded(int, minimum=1, maximum=65535), default=8000, help="port to listen on")
    add_flag(serve, "corpus", default=None,
             help="vector models: JSONL of {id, text} encoded at start-up for POST /search")
    add_flag(serve, "api-key", default=None, help="require this key ('Authorization: Bearer KEY' or 'X-API-Key: KEY'); "
                  "default: the TOOLKIT_API_KEY environment variable, else no key")
    return parser


# ---------------------------------------------------------------- inputs

@dataclass
class InputItem:
    """One input and where it came from; ``error`` is set when it cannot be processed."""
    locator: str
    text: str | None = None
    context: str | None = None
    error: str | None = None


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
    return items


def read_file_inputs(path, text_field=None, task=None):
    """Inputs of a .txt file (one per line; one document for a long-document model) or of records."""
    file_path = Path(path)
    if file_path.is_file() and file_path.suffix.lower() in PLAIN_TEXT_SUFFIXES:
        # an article's paragraphs and blank lines belong to one document, not to many inputs
        return read_text_document(file_path) if task == "longdoc" else read_text_lines(file_path)
    try:
        records = data.read_records(path, skip_invalid=True)
    except RecursionError:
        raise UserError(f"{path}: invalid JSON (nested too deeply)") from None
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


def read_utf8(path):
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise UserError(f"{path}: not valid UTF-8 ({error.reason}); re-encode the file as UTF-8") from None


def read_text_document(path):
    """The whole file as one input (long-document models)."""
    text = read_utf8(path)
    if not text.strip():
        raise UserError(f"{path}: the file is empty")
    return [InputItem(str(path), text)]


def read_text_lines(path):
    """One input per line; a trailing newline does not make an empty last input."""
    lines = read_utf8(path).splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise UserError(f"{path}: the file is empty")
    return [InputItem(f"{path} line {number}", line) for number, line in enumerate(lines, start=1)]


def _locator_of(message, path):
    match = re.search(r"(line|record|row) (\d+)", message)
    return f"{path} {match.group(0)}" if match else str(path)


def _position(item):
    match = re.search(r"(line|record|row) (\d+)$", item.locator)
    return int(match.group(2)) if match else 0


# ---------------------------------------------------------------- running each task

def run_classification(loaded, items, args):
    texts = [item.text for item in items]
    contexts = [item.context for item in items] if any(item.context for item in items) else None
    if loaded.task == "longdoc":
        return inference.predict_long_documents(loaded, texts, args.temperature, args.batch_size, args.explain,
                                                args.top_k)
    return inference.classify(loaded, texts, contexts, args.temperature, args.batch_size, args.top_k,
                              args.sort_by_length)


def run_vectors(loaded, items, args):
    embeddings = inference.embed(loaded, [item.text for item in items], args.batch_size,
                                 sort_by_length=args.sort_by_length)
    results = [{"input": item.text, "dim": int(vector.shape[0]), "norm": round(float(np.linalg.norm(vector)), 6),
                "embedding": [round(float(value), 6) for value in vector]} for item, vector in zip(items, embeddings)]
    if args.text_pair:
        if len(args.text_pair) not in (1, len(items)):
            raise UserError(f"--text-pair: give one, or one per input ({len(items)}), not {len(args.text_pair)}")
        pairs = args.text_pair if len(args.text_pair) == len(items) else args.text_pair * len(items)
        pair_embeddings = inference.embed(loaded, pairs, args.batch_size, side="doc")
        for result, pair, vector, pair_vector in zip(results, pairs, embeddings, pair_embeddings):
            result.update(text_pair=pair, cosine_similarity=round(inference.cosine_similarity(vector, pair_vector), 6))
    return results


def generation_options(args):
    """The decoding settings, checked together (greedy with several sequences) before the model loads."""
    return generation.GenerationOptions(
        max_new_tokens=args.max_new_tokens, temperature=1.0 if args.temperature is None else args.temperature,
        top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
        num_return_sequences=args.num_return_sequences, seed=args.seed).check()


def run_generation(args, items, options):
    """Continue each prompt; a prompt that cannot be continued is marked on its item, the others still run."""
    model, tokenizer = generation.load_causal_lm(args.model_path, args.device)
    results = generation.generate_texts(model, tokenizer, [item.text for item in items], options, skip_errors=True)
    for item, result in zip(items, results):
        if "error" in result:
            item.error = result["error"]
    return [result for result in results if "error" not in result]


# ---------------------------------------------------------------- printing

def format_classification(result):
    """Seed 002's output: input, temperature, predicted label and id, every label's probability."""
    lines = [f"input: {result['input']}"]
    if result.get("context"):
        lines.append(f"context: {result['context']}")
    lines += [f"temperature: {result['temperature']}",
              f"predicted: {result['label']} (id {result['label_id']}, probability {result['probability']:.4f})"]
    ranked = result.get("top_k") or [{"label": name, "probability": p} for name, p in result["probabilities"].items()]
    lines.append("probabilities:" if "top_k" not in result else f"top {len(ranked)}:")
    width = max(len(str(entry["label"])) for entry in ranked)
    lines += [f"  {str(entry['label']):<{width}}  {entry['probability']:.4f}" for entry in ranked]
    if "num_chunks" in result:
        lines.append(f"chunks: {result['num_chunks']} of {result['num_windows']} windows")
    for chunk in result.get("top_chunks", []):
        lines.append(f"  chunk {chunk['chunk_idx']} (score {chunk['score']:.4f}, "
                     f"characters {chunk['char_start']}-{chunk['char_end']}): {chunk['text']}")
    return "\n".join(lines)


def format_vector(result):
    shown = ", ".join(f"{value:.4f}" for value in result["embedding"][:EMBEDDING_VALUES_SHOWN])
    lines = [f"input: {result['input']}", f"embedding (dim {result['dim']}): [{shown}, ...]",
             f"norm: {result['norm']:.4f}"]
    if "text_pair" in result:
        lines += [f"text pair: {result['text_pair']}", f"cosine similarity: {result['cosine_similarity']:.4f}"]
    return "\n".join(lines)


def format_generation(result):
    lines = [f"prompt: {result['prompt']}"]
    for index, text in enumerate(result["generations"], start=1):
        lines.append(f"[{index}] {result['prompt']}{text}")
    return "\n".join(lines)


def format_result(result, kind):
    if kind == "vector":
        return format_vector(result)
    if kind == "generation":
        return format_generation(result)
    return format_classification(result)


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
    paths = [("--file", args.file), ("--model-path", args.model_path), ("--tokenizer-path", args.tokenizer_path)]
    if Path(args.model_path).suffix == ".onnx":
        paths += [("--model-path", companion) for companion in inference.onnx_companions(args.model_path)]
    return paths


def report_failures(items):
    failed = [item for item in items if item.error]
    for item in failed:
        print(f"skipped {item.locator}: {item.error}", file=sys.stderr)
    if failed:
        print(f"{len(failed)} of {len(items)} input(s) could not be processed", file=sys.stderr)
    return EXIT_SOME_FAILED if failed else 0


# ---------------------------------------------------------------- main

def serve(loaded, args):
    from common import server
    corpus_entries = server.load_corpus_records(args.corpus) if args.corpus else None
    service = inference.build_service(loaded, args.temperature, args.batch_size)
    corpus = server.build_corpus(service, *corpus_entries) if corpus_entries else None
    app = server.create_app(service, api_key=args.api_key, corpus=corpus)
    server.serve(app, args.host, args.port)
    return 0


def check_args(args):
    """Combinations of flags, paths and command-line texts (ranges are the flag types' job)."""
    if args.corpus and not args.serve:
        raise UserError("--corpus needs --serve (it enables POST /search)")
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
    file_path = Path(args.file) if args.file else None
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


def check_task_flags(args, task):
    """A flag given for a kind of model it does nothing for is a mistake worth saying, not ignoring."""
    for name, tasks in TASK_FLAGS.items():
        if getattr(args, name) and task not in tasks:
            flag = "--" + name.replace("_", "-")
            raise UserError(f"{flag} is for {' and '.join(tasks)} models; {args.model_path} is a {task} model")


def load_model(args):
    """The model, with --max-length applied (and said, when it differs from the stored value)."""
    loaded = inference.load_model(args.model_path, args.backend, args.device, args.tokenizer_path)
    check_task_flags(args, loaded.task)
    if args.max_length is not None:
        changed = inference.override_max_length(loaded, args.max_length)
        if changed:
            stored = ", ".join(f"{name} {value}" for name, value in changed.items())
            print(f"--max-length {args.max_length} overrides the model's stored {stored} "
                  "(the rest of the preprocessing still comes from the model)", file=sys.stderr)
    return loaded


@report_user_errors
def main(argv=None):
    args = build_parser().parse_args(argv)
    check_args(args)
    if args.output:  # before any work: a bad path must not cost a whole run
        check_output(args)
    args.device = inference.resolve_device(args.device)
    causal = generation.is_causal_lm_directory(args.model_path)
    check_temperature(args, causal)
    if causal:
        if args.serve:
            raise UserError("--serve is for classifiers and vector models, not causal language models")
        check_task_flags(args, "generation")
        options = generation_options(args)
        items = collect_inputs(args)
        results = run_generation(args, [item for item in items if not item.error], options)
        emit(items, results, "generation", args)
        return report_failures(items)
    loaded = load_model(args)
    if args.serve:
        return serve(loaded, args)
    if args.prompt:
        raise UserError(f"--prompt is for causal language models; {args.model_path} is a {loaded.task} model "
                        "(use --text)")
    items = collect_inputs(args, loaded.task)
    valid = [item for item in items if not item.error]
    if loaded.task == "vector":
        results = run_vectors(loaded, valid, args) if valid else []
    else:
        results = run_classification(loaded, valid, args) if valid else []
    emit(items, results, loaded.task, args)
    return report_failures(items)


if __name__ == "__main__":
    raise SystemExit(main())
