"""infer.py --file in one process against the same run sharded by torchrun: same output, and the time.

    python bench/infer_sharded.py --model-path models/model.onnx --texts-file data/reviews/test.jsonl

Writes a --file-lines file (the texts repeated as needed), then runs, in turns, --repeats times:
``infer.py --file`` as one process (all cores to one onnxruntime/torch session), and ``torchrun
--nproc-per-node N infer.py --file`` (N processes, each a contiguous share, OMP_NUM_THREADS=cores/N).
Each run is a fresh process, so model loading and process start-up are counted, as a user pays them.
Every sharded output must equal the one-process output byte for byte; the bench stops if it does not.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from infer_overhead import read_texts
from quality import describe_machine, toolkit_commit

REPO_ROOT = Path(__file__).resolve().parent.parent


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--model-path", required=True, help="a model directory or an export_onnx.py .onnx export")
    add("--texts-file", required=True, help="JSONL records with a text field (or .txt, one per line)")
    add("--file-lines", type=int, default=5000, help="lines of the input file")
    add("--processes", type=int, default=2, help="torchrun --nproc-per-node")
    add("--batch-size", type=int, default=32, help="infer.py --batch-size")
    add("--repeats", type=int, default=3, help="interleaved runs of each launcher")
    add("--output", default="bench/results/infer_sharded.json", help="results JSON")
    return parser


def launchers(args, input_file, work):
    """Each launcher: (name, command, environment overrides, output path)."""
    infer_args = ["--model-path", args.model_path, "--file", str(input_file), "--batch-size", str(args.batch_size)]
    threads_each = str(max(1, (os.cpu_count() or 1) // args.processes))
    one = work / "one.jsonl"
    sharded = work / "sharded.jsonl"
    return [
        ("one process", [sys.executable, "infer.py", *infer_args, "--output", str(one)], {}, one),
        (f"torchrun, {args.processes} processes",
         [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.processes),
          "infer.py", *infer_args, "--output", str(sharded)], {"OMP_NUM_THREADS": threads_each}, sharded),
    ]


def run_timed(command, overrides):
    started = time.perf_counter()
    subprocess.run(command, cwd=REPO_ROOT, env={**os.environ, **overrides}, check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main(argv=None):
    args = build_parser().parse_args(argv)
    lines = read_texts(args.texts_file, args.file_lines)
    work = Path(tempfile.mkdtemp(prefix="infer-sharded-"))
    input_file = work / "inputs.txt"
    input_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    runs = launchers(args, input_file, work)
    seconds = {name: [] for name, *_ in runs}
    for _ in range(args.repeats):
        for name, command, overrides, output in runs:
            seconds[name].append(run_timed(command, overrides))
            print(f"{name}: {seconds[name][-1]:.1f} s", flush=True)
        outputs = [output.read_bytes() for *_, output in runs]
        if any(output != outputs[0] for output in outputs):
            raise SystemExit("the sharded output differs from the one-process output")
    one_process = statistics.median(seconds[runs[0][0]])
    rows = [{"launcher": name, "median_seconds": statistics.median(values), "runs": values,
             "lines_per_second": len(lines) / statistics.median(values),
             "vs_one_process": one_process / statistics.median(values)} for name, values in seconds.items()]
    for row in rows:
        print(f"{row['launcher']:<24} {row['median_seconds']:>7.1f} s  {row['lines_per_second']:>7.1f} lines/s  "
              f"{row['vs_one_process']:.2f}x one process")
    results = {"command": "python bench/infer_sharded.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "machine": describe_machine(), "toolkit_commit": toolkit_commit(str(REPO_ROOT)),
               "date": time.strftime("%Y-%m-%d"), "file_lines": len(lines), "identical_outputs": True, "rows": rows}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2), encoding="utf-8")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
