"""infer.py end to end against a bare onnxruntime session on the same inputs: what tokenization,
batching, result building and JSON cost on top of the model.

    python bench/infer_overhead.py --model-path models/model.onnx --texts-file data/reviews/test.jsonl

Batch 1 (--single-texts texts, one call each): the bare session on pre-tokenized ids; the bare
tokenizer + session (what a hand-written loop pays); infer.py's per-text path (``answer_line`` with
--json: preprocessing from the export, softmax, result, one JSON line). A --file-lines file
(the texts repeated as needed): the bare session over pre-tokenized, length-sorted, padded batches
of --batch-size; tokenizer + session; ``infer.main --file ... --output`` in this process (model
load, reading, writing included). Each measurement is repeated --repeats times, interleaved; the
median is reported.
"""
import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import infer  # noqa: E402
from common import data, inference  # noqa: E402


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--model-path", required=True, help="an export_onnx.py .onnx export (a classifier)")
    add("--texts-file", required=True, help="JSONL records with a text field (or .txt, one per line)")
    add("--single-texts", type=int, default=200, help="texts timed one call each")
    add("--file-lines", type=int, default=5000, help="lines of the file run")
    add("--batch-size", type=int, default=32, help="batch size of the file run (infer.py's default)")
    add("--repeats", type=int, default=3, help="interleaved repeats of every measurement")
    add("--output", default="bench/results/infer_overhead.json", help="results JSON")
    return parser


def read_texts(path, count):
    examples = data.load_text_examples(path, require_label=False)
    texts = [" ".join(example.text.split()) for example in examples if example.text.strip()]
    return (texts * (count // len(texts) + 1))[:count]


def bare_inputs(loaded, texts):
    """What a hand-written loop feeds the session: the tokenizer's own call, truncated at the export's length."""
    encoded = loaded.tokenizer(texts, truncation=True, max_length=loaded.preprocessing.get("max_length", 128),
                               padding=True, return_tensors="np")
    return {name: encoded[name].astype(np.int64) for name in inference.MODEL_INPUTS}


def sorted_batches(texts, batch_size):
    order = sorted(range(len(texts)), key=lambda index: len(texts[index]))
    return [[texts[index] for index in order[start:start + batch_size]] for start in range(0, len(order), batch_size)]


def timed(function):
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def main(argv=None):
    args = build_parser().parse_args(argv)
    loaded = inference.load_onnx_model(args.model_path)
    session = loaded.run.session
    single = read_texts(args.texts_file, args.single_texts)
    lines = read_texts(args.texts_file, args.file_lines)
    pretokenized_single = [bare_inputs(loaded, [text]) for text in single]
    batches = sorted_batches(lines, args.batch_size)
    pretokenized_batches = [bare_inputs(loaded, batch) for batch in batches]
    infer_args = infer.build_parser().parse_args(["--model-path", args.model_path, "--json"])
    runner = infer.Runner(loaded.task, loaded)
    work = Path(tempfile.mkdtemp(prefix="infer-overhead-"))
    input_file = work / "inputs.txt"
    input_file.write_text("\n".join(lines) + "\n", encoding="utf-8")

    measurements = {
        "batch 1: bare session (pre-tokenized)": lambda: [session.run(None, feeds) for feeds in pretokenized_single],
        "batch 1: tokenizer + bare session": lambda: [session.run(None, bare_inputs(loaded, [text])) for text in single],
        "batch 1: infer.py (answer_line --json)": lambda: [infer.answer_line(runner, infer_args, text) for text in single],
        "file: bare session (pre-tokenized)": lambda: [session.run(None, feeds) for feeds in pretokenized_batches],
        "file: tokenizer + bare session": lambda: [session.run(None, bare_inputs(loaded, batch)) for batch in batches],
        "file: infer.main --file --output": lambda: infer.main([
            "--model-path", args.model_path, "--file", str(input_file), "--output", str(work / "out.jsonl"),
            "--batch-size", str(args.batch_size)]),
    }
    for feeds in pretokenized_single[:10] + pretokenized_batches[:2]:  # warm-up: first calls pick kernels
        session.run(None, feeds)
    seconds = {name: [] for name in measurements}
    for _ in range(args.repeats):
        for name, function in measurements.items():
            seconds[name].append(timed(function))
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    rows = []
    for name, value in medians.items():
        scope = name.split(":")[0]
        base = medians[f"{scope}: bare session (pre-tokenized)"]
        count = len(single) if scope == "batch 1" else len(lines)
        rows.append({"measurement": name, "seconds": value, "per_text_ms": value * 1000 / count,
                     "vs_bare_session": value / base, "runs": seconds[name]})
    print(f"{'measurement':<42} {'seconds':>8} {'ms/text':>8} {'vs bare':>8}")
    for row in rows:
        print(f"{row['measurement']:<42} {row['seconds']:>8.2f} {row['per_text_ms']:>8.3f} "
              f"{row['vs_bare_session']:>7.2f}x")
    results = {"command": "python bench/infer_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "machine": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d"),
               "single_texts": len(single), "file_lines": len(lines), "batch_size": args.batch_size, "rows": rows}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2), encoding="utf-8")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
