"""The server's model calls without HTTP: resident memory and cost per batch when each batch hands its
freed memory back (the server's ``run_and_release``), when it does not, and with glibc's mmap threshold
fixed instead.

Each variant runs in a fresh process: the vector service's ``encode`` on the same seeded batches of
1 to --max-texts reviews, on one worker thread as the server's MicroBatcher runs them (a queue limit of
8 gives batches of up to 9 one-text requests). It reports CPU and system time and minor page faults
per batch (the cost of handing pages back and faulting them in again), and the RSS every 20 batches.

    python bench/serve_memory.py --base-model ../shared/models/all-MiniLM-L6-v2 --texts-file data/test.jsonl
    python bench/serve_memory.py --model-dir export/model.onnx --texts-file data/test.jsonl --variants none,trim

Variants: none (the call alone), trim (``common.server.run_and_release``: glibc ``malloc_trim(0)``
after the call), mmap (no trim; ``mallopt(M_MMAP_THRESHOLD, 128 KiB)`` at start, which stops glibc
from raising the threshold, so every tensor over 128 KiB gets its own mapping, returned when freed).
"""
import argparse
import ctypes
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("none", "trim", "mmap")
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
RSS_EVERY = 20


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model-dir", "--model_dir", help="vector model directory, or an .onnx export, to run")
    source.add_argument("--base-model", "--base_model",
                        help="pretrained encoder: run an untuned vector model on it (mean pooling, 128 tokens)")
    parser.add_argument("--texts-file", "--texts_file", required=True, help="JSONL whose 'text' fields are sent")
    parser.add_argument("--batches", type=int, default=100, help="batches per variant")
    parser.add_argument("--max-texts", "--max_texts", type=int, default=9, help="texts per batch: 1 to this")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--output", help="write the results as JSON here")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)  # one variant, in its own process
    return parser


def resident_mb():
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def run_worker(args):
    """One variant in this process: the batches, then one JSON line on standard output."""
    if args.worker == "mmap":
        ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, 128 * 1024)  # before the model allocates anything
    sys.path.insert(0, str(REPO))
    from common import inference, server
    service = inference.VectorService(inference.load_model(args.model_dir), batch_size=64)
    call = server.run_and_release if args.worker == "trim" else lambda function, items: function(items)
    texts = [json.loads(line)["text"] for line in Path(args.texts_file).read_text(encoding="utf-8").splitlines()
             if line.strip()]
    rng = random.Random(0)
    model_thread = ThreadPoolExecutor(max_workers=1)
    model_thread.submit(call, service.encode, texts[:4]).result()  # warm-up
    before, resident = resource.getrusage(resource.RUSAGE_SELF), []
    for index in range(args.batches):
        batch = rng.sample(texts, rng.randint(1, args.max_texts))
        model_thread.submit(call, service.encode, batch).result()
        if (index + 1) % RSS_EVERY == 0:
            resident.append(round(resident_mb(), 1))
    after = resource.getrusage(resource.RUSAGE_SELF)
    per_batch = 1000 / args.batches
    print(json.dumps({"variant": args.worker,
                      "cpu_ms_per_batch": round((after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
                                                * per_batch, 1),
                      "system_ms_per_batch": round((after.ru_stime - before.ru_stime) * per_batch, 1),
                      "minor_faults_per_batch": round((after.ru_minflt - before.ru_minflt) / args.batches),
                      f"rss_mb_every_{RSS_EVERY}_batches": resident}))
    return 0


def run_variant(args, variant):
    command = [sys.executable, __file__, "--model-dir", str(args.model_dir), "--texts-file", args.texts_file,
               "--batches", str(args.batches), "--max-texts", str(args.max_texts), "--worker", variant]
    completed = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    if completed.returncode:
        raise SystemExit(f"{variant} failed: {completed.stderr[-2000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.worker:
        return run_worker(args)
    variants = [variant.strip() for variant in args.variants.split(",")]
    if any(variant not in VARIANTS for variant in variants):
        parser.error(f"--variants {args.variants}: each must be one of {', '.join(VARIANTS)}")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from serve_load import build_untuned_model
    results = []
    with tempfile.TemporaryDirectory(prefix="serve-memory-") as scratch:
        if args.base_model:
            args.model_dir = build_untuned_model(args.base_model, Path(scratch) / "untuned-vector", 128)
        for variant in variants:
            results.append(run_variant(args, variant))
            print(json.dumps(results[-1]), flush=True)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        model = Path(args.base_model or args.model_dir).name + (" (untuned)" if args.base_model else "")
        Path(args.output).write_text(json.dumps({"model": model, "texts_file": Path(args.texts_file).name,
                                                 "batches": args.batches, "max_texts": args.max_texts,
                                                 "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
