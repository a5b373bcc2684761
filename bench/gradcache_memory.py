"""GradCache memory: peak resident memory of one InfoNCE training step at batch 32, at batch 512, and
at batch 512 with ``--grad-cache-chunk 32`` (common/gradcache.py), each in a fresh process; and how
far the GradCache gradients are from the plain batch-512 gradients.

    python bench/gradcache_memory.py --model ../shared/models/all-MiniLM-L6-v2

A step is: embed B queries and their B positive documents (in-batch negatives), InfoNCE, backward;
the train_vector.py code path (PairEncoder, compute_pair_loss, grad_cache_backward). "Step memory" is
the peak RSS during the step minus the RSS before it (model, optimizer-free, data already loaded).
Dropout is off (model.eval()) so the plain and cached runs see the same network; the gradients of
the two batch-512 runs are compared element by element.

Each run is measured twice: with glibc's default allocator, which keeps memory freed by one chunk's
tensors in its arenas (GradCache allocates and frees many differently sized buffers, so RSS grows
past what is live), and with glibc told to return freed memory (MALLOC_ARENA_MAX=1,
MALLOC_TRIM_THRESHOLD_=0, MALLOC_MMAP_THRESHOLD_=65536), where RSS follows the live tensors.
"""
import os
import argparse
import contextlib
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import describe_machine, toolkit_commit  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
RUNS = {"plain-32": (32, 0), "plain-512": (512, 0), "gradcache-512-chunk-32": (512, 32)}
ALLOCATORS = {"glibc-default": {},
              "glibc-returning": {"MALLOC_ARENA_MAX": "1", "MALLOC_TRIM_THRESHOLD_": "0",
                                  "MALLOC_MMAP_THRESHOLD_": "65536"}}


def current_rss_kib():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def texts_for(count, words):
    """``count`` distinct texts of ``words`` words (the token count is what costs memory)."""
    vocabulary = ("the model reads every query and each document then ranks the passages by their cosine "
                  "similarity so that the answer comes first").split()
    return [" ".join(vocabulary[(index * 7 + position) % len(vocabulary)] for position in range(words)) + f" {index}"
            for index in range(count)]


def run_worker(args):
    sys.path.insert(0, str(REPO_ROOT))
    import torch

    from common import data
    from common.gradcache import grad_cache_backward
    from common.pair_losses import compute_pair_loss
    from common.pairs import encode_text_features
    from common.vector import BertVectorModel, PairEncoder
    torch.manual_seed(0)
    batch_size, chunk = RUNS[args.worker]
    model = BertVectorModel.from_backbone(args.model, pooling="mean", max_length=args.max_length)
    encoder = PairEncoder(model).eval()  # no dropout: plain and cached runs compute the same function
    pad = data.PaddingCollator(model.tokenizer.pad_token_id)
    query = pad(encode_text_features(model.tokenizer, texts_for(batch_size, 12), args.max_length, model.preprocessing))
    document = pad(encode_text_features(model.tokenizer, texts_for(batch_size, 40), args.max_length,
                                        model.preprocessing))
    batch = {"rel": torch.ones(batch_size), "weight": torch.ones(batch_size), "doc_id": torch.arange(batch_size)}

    def loss_of(query_embeddings, doc_embeddings):
        return compute_pair_loss("infonce", query_embeddings, doc_embeddings, batch, 0.05)
    before = current_rss_kib()
    started = time.perf_counter()
    if chunk:
        loss = grad_cache_backward(encoder, query, document, chunk, loss_of, lambda value: value.backward(),
                                   contextlib.nullcontext, lambda last: contextlib.nullcontext(), torch.device("cpu"))
    else:
        loss = loss_of(*encoder(query, document))
        loss.backward()
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    gradient = torch.cat([p.grad.flatten() for p in encoder.parameters() if p.grad is not None])
    torch.save(gradient, Path(args.run_dir) / "gradient.pt")
    result = {"run": args.worker, "batch_size": batch_size, "chunk": chunk, "loss": float(loss.detach()),
              "rss_before_mib": before / 1024, "peak_rss_mib": peak / 1024, "step_mib": (peak - before) / 1024,
              "seconds": seconds, "query_tokens": int(query["input_ids"].shape[1]),
              "document_tokens": int(document["input_ids"].shape[1])}
    (Path(args.run_dir) / "run.json").write_text(json.dumps(result, indent=2))
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="../shared/models/all-MiniLM-L6-v2", help="pretrained encoder (path)")
    parser.add_argument("--max-length", type=int, default=64, help="token limit per text")
    parser.add_argument("--work-dir", default="runs/gradcache_memory", help="one directory per run")
    parser.add_argument("--output", default="bench/results/gradcache_memory.json", help="summary JSON")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return run_worker(args)
    import torch
    results = {allocator: {} for allocator in ALLOCATORS}
    for allocator, environment in ALLOCATORS.items():
        for name in RUNS:
            run_dir = Path(args.work_dir).resolve() / allocator / name
            run_dir.mkdir(parents=True, exist_ok=True)
            subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", name, "--run-dir",
                            str(run_dir), "--model", str(Path(args.model).resolve()), "--max-length",
                            str(args.max_length)], check=True, env={**os.environ, **environment})
            run = results[allocator][name] = json.loads((run_dir / "run.json").read_text())
            print(f"{allocator} {name}: step memory {run['step_mib']:.0f} MiB (peak RSS {run['peak_rss_mib']:.0f} "
                  f"MiB), {run['seconds']:.1f} s", flush=True)
    plain, cached = (torch.load(Path(args.work_dir).resolve() / "glibc-default" / name / "gradient.pt")
                     for name in ("plain-512", "gradcache-512-chunk-32"))
    difference = {"max_abs": float((plain - cached).abs().max()), "max_abs_gradient": float(plain.abs().max()),
                  "relative_l2": float((plain - cached).norm() / plain.norm()),
                  "allclose_atol_1e-5_rtol_1e-4": bool(torch.allclose(plain, cached, atol=1e-5, rtol=1e-4))}
    ratio = {allocator: runs["gradcache-512-chunk-32"]["step_mib"] / runs["plain-32"]["step_mib"]
             for allocator, runs in results.items()}
    print(f"batch 512 with GradCache / batch 32, step memory: {ratio}; gradients vs plain 512: {difference}")
    summary = {"machine": describe_machine(), "toolkit_commit": toolkit_commit(str(REPO_ROOT)),
               "command": "python bench/gradcache_memory.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "model": Path(args.model).name, "max_length": args.max_length, "runs": results,
               "gradcache_512_over_plain_32": ratio, "gradient_difference_512": difference}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(summary, indent=2))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
