"""Load-test the vector server: requests/s and latency at several concurrency levels,
with micro-batching by text count (--max_batch_size 64), by text count and a token budget
(--max-batch-tokens), and off (one forward pass per request).

Starts ``train_vector.py --mode deploy`` on a free loopback port for each batching setting,
sends a bounded number of POST /encode requests (stopping early at --time-limit seconds per
level), prints a table and writes JSON. Stops its servers itself. Each row counts the answers
by status (2xx, 429, any other) and reads the server's /metrics for the batches it ran (texts
and tokens per batch) and its resident memory (before, peak while loaded, after). With
--max-queue below the concurrency, it checks backpressure: every request should get a 2xx or a
429, never a 5xx, and a level repeated (--concurrency 128,128,128) shows whether memory stays flat.
--base-model serves an untuned vector model built on a pretrained encoder (throughput does not
depend on training), so no fine-tuning run is needed.

    python bench/serve_load.py --model-dir output/vector_model/checkpoint-step-200 \
        --concurrency 1,8,32 --requests 256 --time-limit 60 --output bench/results/serve_load.json
    python bench/serve_load.py --model-dir ... --concurrency 64 --batch-sizes 64 --max-queue 16  # 4x the queue
    python bench/serve_load.py --base-model ../shared/models/all-MiniLM-L6-v2 --texts-file data/test.jsonl \
        --concurrency 32 --batch-sizes 64 --max-batch-tokens none,2048
    python bench/serve_load.py --base-model ... --texts-file data/test.jsonl --text-chars 10000 \
        --texts-per-request 64 --concurrency 150 --requests 150 --batch-sizes 64 --max-queue 2  # a flood
"""
import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model-dir", "--model_dir", help="vector model directory to serve")
    source.add_argument("--base-model", "--base_model",
                        help="pretrained encoder: serve an untuned vector model on it (mean pooling, --max-length)")
    parser.add_argument("--max-length", "--max_length", type=int, default=128,
                        help="with --base-model: the query and document max length in tokens")
    parser.add_argument("--texts-file", "--texts_file", default=str(REPO / "examples" / "corpus.jsonl"),
                        help="JSONL whose 'text' or 'query' fields are sent")
    parser.add_argument("--text-chars", "--text_chars", type=int, default=None,
                        help="send --texts-per-request texts of this many characters, each the texts file's texts "
                             "joined in order and cut (10000 with 64 per request: the largest request served)")
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated concurrency levels")
    parser.add_argument("--requests", type=int, default=256, help="requests per level")
    parser.add_argument("--texts-per-request", "--texts_per_request", type=int, default=1, help="texts per request")
    parser.add_argument("--time-limit", "--time_limit", type=float, default=60.0,
                        help="seconds per level; the level stops early when reached")
    parser.add_argument("--batch-sizes", "--batch_sizes", default="64,1",
                        help="server --max_batch_size settings to compare (1: one forward per request)")
    parser.add_argument("--max-batch-tokens", "--max_batch_tokens", default="none,2048",
                        help="server token budgets to compare for each batch size above 1 (none: text count only)")
    parser.add_argument("--max-queue", "--max_queue", type=int, default=None,
                        help="server --max-queue (default: the server's); below the concurrency, some requests get 429")
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


def joined_texts(texts, chars, count):
    """``count`` texts of ``chars`` characters: the texts in order (cycling), joined and cut."""
    joined, position = [], 0
    while len(joined) < count:
        text = ""
        while len(text) < chars:
            text += texts[position % len(texts)]
            position += 1
        joined.append(text[:chars])
    return joined


def build_untuned_model(base_model, directory, max_length):
    """An untuned vector model (mean pooling, no projection) on ``base_model``, saved under ``directory``."""
    sys.path.insert(0, str(REPO))
    from common.vector import BertVectorModel
    model = BertVectorModel.from_backbone(base_model, pooling="mean", projection_dim=0, max_length=max_length,
                                          query_max_length=max_length, doc_max_length=max_length)
    model.save_pretrained(str(directory))
    return directory


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# a budget no batch reaches: the server then merges by text count alone
NO_TOKEN_BUDGET = 10 ** 9


def start_server(model_dir, max_batch_size, device, max_batch_tokens=None, max_queue=None):
    port = free_port()
    command = [sys.executable, str(REPO / "train_vector.py"), "--mode", "deploy", "--model_dir", str(model_dir),
               "--port", str(port), "--max_batch_size", str(max_batch_size), "--device", device,
               "--max-batch-tokens", str(max_batch_tokens or NO_TOKEN_BUDGET)]
    if max_queue is not None:
        command += ["--max-queue", str(max_queue)]
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


def read_metrics(base_url):
    """{sample name: value summed over labels} of the server's /metrics."""
    totals = {}
    for family in text_string_to_metric_families(httpx.get(f"{base_url}/metrics", timeout=30).text):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


def read_batch_metrics(base_url):
    """(batches, texts, tokens) the server has run so far."""
    totals = read_metrics(base_url)
    return (totals.get("toolkit_batch_size_count", 0.0), totals.get("toolkit_batch_size_sum", 0.0),
            totals.get("toolkit_batch_tokens_sum", 0.0))


def read_memory_mb(base_url):
    """The server process's resident memory (prometheus-client's process collector), in MB."""
    return read_metrics(base_url).get("process_resident_memory_bytes", 0.0) / 2 ** 20


async def sample_peak_memory(base_url, stop, interval=0.5):
    """The highest resident memory seen every ``interval`` seconds until ``stop`` is set."""
    peak = 0.0
    while not stop.is_set():
        peak = max(peak, await asyncio.to_thread(read_memory_mb, base_url))
        try:
            await asyncio.wait_for(stop.wait(), interval)
        except asyncio.TimeoutError:
            pass
    return peak


async def run_level(base_url, texts, concurrency, request_count, texts_per_request, time_limit):
    """Send up to request_count requests with ``concurrency`` in flight; stop at time_limit."""
    latencies, statuses = [], {"2xx": 0, "429": 0, "other": 0}
    next_request = 0
    started = time.perf_counter()

    async def worker(client):
        nonlocal next_request
        while next_request < request_count and time.perf_counter() - started < time_limit:
            index = next_request
            next_request += 1
            body = {"texts": [texts[(index * texts_per_request + j) % len(texts)] for j in range(texts_per_request)]}
            sent = time.perf_counter()
            try:
                status = (await client.post("/encode", json=body)).status_code
                kind = "2xx" if 200 <= status < 300 else "429" if status == 429 else "other"
            except httpx.HTTPError:
                kind = "other"
            latencies.append(time.perf_counter() - sent)
            statuses[kind] += 1

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits) as client:
        await client.post("/encode", json={"texts": texts[:1]})  # warm-up
        batches_before = await asyncio.to_thread(read_batch_metrics, base_url)
        memory_before = await asyncio.to_thread(read_memory_mb, base_url)
        stop = asyncio.Event()
        sampler = asyncio.create_task(sample_peak_memory(base_url, stop))
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
        stop.set()
        memory_peak = await sampler
    memory_after = await asyncio.to_thread(read_memory_mb, base_url)
    batches, batch_texts, batch_tokens = (after - before for after, before in
                                          zip(read_batch_metrics(base_url), batches_before))
    values = np.asarray(latencies) * 1000
    return {"concurrency": concurrency, "requests": len(latencies), "seconds": round(elapsed, 2),
            "requests_per_second": round(statuses["2xx"] / elapsed, 2),
            "p50_ms": round(float(np.percentile(values, 50)), 1), "p99_ms": round(float(np.percentile(values, 99)), 1),
            "ok": statuses["2xx"], "rejected_429": statuses["429"], "errors": statuses["other"],
            "batches": int(batches), "texts_per_batch": round(batch_texts / max(batches, 1), 1),
            "tokens_per_batch": round(batch_tokens / max(batches, 1), 1),
            "rss_before_mb": round(memory_before, 1), "rss_peak_mb": round(max(memory_peak, memory_after), 1),
            "rss_after_mb": round(memory_after, 1)}


def server_settings(batch_sizes, token_budgets):
    """(max_batch_size, max_batch_tokens or None) per server to start; one forward per request has no budget."""
    budgets = [None if budget.strip().lower() == "none" else int(budget) for budget in token_budgets.split(",")]
    settings = []
    for size in (int(size) for size in batch_sizes.split(",")):
        settings += [(size, None)] if size == 1 else [(size, budget) for budget in budgets]
    return settings


def label_of(max_batch_size, max_batch_tokens):
    if max_batch_size == 1:
        return "one forward/request"
    return f"<= {max_batch_size} texts" + (f", {max_batch_tokens} tok" if max_batch_tokens else "")


def main(argv=None):
    args = build_parser().parse_args(argv)
    texts = read_texts(args.texts_file)
    if args.text_chars:
        texts = joined_texts(texts, args.text_chars, args.texts_per_request)
    with tempfile.TemporaryDirectory(prefix="serve-load-") as scratch:
        if args.base_model:
            args.model_dir = build_untuned_model(args.base_model, Path(scratch) / "untuned-vector", args.max_length)
        results = run_settings(args, texts)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        model = Path(args.base_model or args.model_dir).name + (" (untuned)" if args.base_model else "")
        # names only: a result file carries no machine paths
        Path(args.output).write_text(json.dumps({"model": model, "texts_file": Path(args.texts_file).name,
                                                 "text_chars": args.text_chars, "results": results}, indent=2))
    return 0


def run_settings(args, texts):
    """Each batching setting's server, loaded at each concurrency level in turn; the rows."""
    levels = [int(level) for level in args.concurrency.split(",")]
    results = []
    print(f"{'batching':>26} {'conc.':>5} {'requests':>8} {'ok/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'429':>5} "
          f"{'errors':>6} {'texts/batch':>11} {'tok/batch':>9} {'RSS MB before/peak/after':>24}")
    for max_batch_size, max_batch_tokens in server_settings(args.batch_sizes, args.max_batch_tokens):
        process, base_url = start_server(args.model_dir, max_batch_size, args.device, max_batch_tokens,
                                         args.max_queue)
        label = label_of(max_batch_size, max_batch_tokens)
        try:
            for concurrency in levels:
                row = asyncio.run(run_level(base_url, texts, concurrency, args.requests, args.texts_per_request,
                                            args.time_limit))
                row.update(max_batch_size=max_batch_size, max_batch_tokens=max_batch_tokens, max_queue=args.max_queue)
                results.append(row)
                print(f"{label:>26} {concurrency:>5} {row['requests']:>8} {row['requests_per_second']:>8} "
                      f"{row['p50_ms']:>8} {row['p99_ms']:>8} {row['rejected_429']:>5} {row['errors']:>6} "
                      f"{row['texts_per_batch']:>11} {row['tokens_per_batch']:>9} "
                      f"{row['rss_before_mb']:>8}/{row['rss_peak_mb']}/{row['rss_after_mb']}", flush=True)
        finally:
            stop_server(process)
    return results


if __name__ == "__main__":
    raise SystemExit(main())
