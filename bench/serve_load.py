"""Load-test the vector server: requests/s and latency at several concurrency levels,
with micro-batching on (--max_batch_size 64) and off (one forward pass per request).

Starts ``train_vector.py --mode deploy`` on a free loopback port for each batching setting,
sends a bounded number of POST /encode requests (stopping early at --time-limit seconds per
level), prints a table and writes JSON. Stops its servers itself.

    python bench/serve_load.py --model-dir output/vector_model/checkpoint-step-200 \
        --concurrency 1,8,32 --requests 256 --time-limit 60 --output bench/results/serve_load.json
"""
import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", "--model_dir", required=True, help="vector model directory to serve")
    parser.add_argument("--texts-file", "--texts_file", default=str(REPO / "examples" / "corpus.jsonl"),
                        help="JSONL whose 'text' or 'query' fields are sent")
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated concurrency levels")
    parser.add_argument("--requests", type=int, default=256, help="requests per level")
    parser.add_argument("--texts-per-request", "--texts_per_request", type=int, default=1, help="texts per request")
    parser.add_argument("--time-limit", "--time_limit", type=float, default=60.0,
                        help="seconds per level; the level stops early when reached")
    parser.add_argument("--batch-sizes", "--batch_sizes", default="64,1",
                        help="server --max_batch_size settings to compare (1: one forward per request)")
    parser.add_argument("--device", default="cpu", help="device of the server")
    parser.add_argument("--output", help="write the results as JSON here")
    return parser


def read_texts(path):
    texts = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            texts.append(record.get("text") or record.get("query"))
    return [text for text in texts if text]


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model_dir, max_batch_size, device):
    port = free_port()
    command = [sys.executable, str(REPO / "train_vector.py"), "--mode", "deploy", "--model_dir", str(model_dir),
               "--port", str(port), "--max_batch_size", str(max_batch_size), "--device", device]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               env=dict(os.environ, HF_HUB_OFFLINE="1"))
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited: {process.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                return process, base_url
        except httpx.HTTPError:
            time.sleep(0.5)
    process.kill()
    raise SystemExit("server did not start within 300 s")


def stop_server(process):
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


async def run_level(base_url, texts, concurrency, request_count, texts_per_request, time_limit):
    """Send up to request_count requests with ``concurrency`` in flight; stop at time_limit."""
    latencies, errors = [], 0
    next_request = 0
    started = time.perf_counter()

    async def worker(client):
        nonlocal next_request, errors
        while next_request < request_count and time.perf_counter() - started < time_limit:
            index = next_request
            next_request += 1
            body = {"texts": [texts[(index * texts_per_request + j) % len(texts)] for j in range(texts_per_request)]}
            sent = time.perf_counter()
            try:
                response = await client.post("/encode", json=body)
                ok = response.status_code == 200
            except httpx.HTTPError:
                ok = False
            latencies.append(time.perf_counter() - sent)
            errors += not ok

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits) as client:
        await client.post("/encode", json={"texts": texts[:1]})  # warm-up
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    values = np.asarray(latencies) * 1000
    return {"concurrency": concurrency, "requests": len(latencies), "seconds": round(elapsed, 2),
            "requests_per_second": round(len(latencies) / elapsed, 2),
            "p50_ms": round(float(np.percentile(values, 50)), 1), "p99_ms": round(float(np.percentile(values, 99)), 1),
            "errors": errors}


def main(argv=None):
    args = build_parser().parse_args(argv)
    texts = read_texts(args.texts_file)
    levels = [int(level) for level in args.concurrency.split(",")]
    results = []
    print(f"{'batching':>22} {'conc.':>5} {'requests':>8} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}")
    for max_batch_size in (int(size) for size in args.batch_sizes.split(",")):
        process, base_url = start_server(args.model_dir, max_batch_size, args.device)
        label = "one forward/request" if max_batch_size == 1 else f"micro-batch <= {max_batch_size}"
        try:
            for concurrency in levels:
                row = asyncio.run(run_level(base_url, texts, concurrency, args.requests, args.texts_per_request,
                                            args.time_limit))
                row["max_batch_size"] = max_batch_size
                results.append(row)
                print(f"{label:>22} {concurrency:>5} {row['requests']:>8} {row['requests_per_second']:>8} "
                      f"{row['p50_ms']:>8} {row['p99_ms']:>8} {row['errors']:>6}", flush=True)
        finally:
            stop_server(process)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps({"model_dir": str(args.model_dir), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
