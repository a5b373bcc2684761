"""Peak memory of long-document training and inference as one document grows from 1k to 100k characters.

Each measurement runs in a fresh Python process (peak RSS is a high-water mark, so processes
must not share it): load the model, chunk one document, then either one training step
(two-pass document loss + AdamW step) or one ``predict_documents`` call, and report the
process's peak RSS. With micro-batches of --chunk-batch-size chunks the peak should stay
flat as the document grows; the "unbounded" rows put every chunk of the document in one
forward pass for comparison.

    python bench/longdoc_memory.py --model-name ../shared/models/all-MiniLM-L6-v2 --num-layers 2 \
        --max-length 128 --stride 32 --chunk-batch-size 8
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
PARAGRAPH = ("The committee met on Tuesday to discuss the budget for the coming year, and the minister said "
             "that spending on schools, hospitals and roads would rise while taxes stayed the same. ")


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-name", "--model_name", dest="model_name",
                        default=str(REPO.parent / "shared" / "models" / "all-MiniLM-L6-v2"),
                        help="encoder (and tokenizer) to measure")
    parser.add_argument("--num-layers", "--num_layers", dest="num_layers", type=int, default=2,
                        help="keep only the first N encoder layers (0: all) so the 100k run finishes on a CPU")
    parser.add_argument("--max-length", "--max_length", dest="max_length", type=int, default=128)
    parser.add_argument("--stride", type=int, default=32)
    parser.add_argument("--chunk-batch-size", "--chunk_batch_size", dest="chunk_batch_size", type=int, default=8)
    parser.add_argument("--sizes", default="1000,10000,100000", help="document lengths in characters")
    parser.add_argument("--unbounded", action="store_true",
                        help="also measure with every chunk in one forward pass (memory grows with length)")
    parser.add_argument("--output", default=None, help="also write the rows as JSON here")
    parser.add_argument("--worker", choices=["train", "infer"], help=argparse.SUPPRESS)
    parser.add_argument("--chars", type=int, help=argparse.SUPPRESS)
    return parser


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_worker(args):
    """One measurement in this (fresh) process; prints a JSON row."""
    import torch
    from transformers import AutoModel
    sys.path.insert(0, str(REPO))
    import train_longdoc
    from common import longdoc, modeldir, optimization, training
    from common.heads import SequenceClassifier
    torch.manual_seed(0)
    overrides = {"num_hidden_layers": args.num_layers} if args.num_layers > 0 else {}
    backbone = AutoModel.from_pretrained(args.model_name, **overrides)
    backbone.pooler = None
    model = SequenceClassifier(backbone, 4, "mean")
    tokenizer = modeldir.load_tokenizer(args.model_name)
    text = (PARAGRAPH * (args.chars // len(PARAGRAPH) + 1))[:args.chars]
    settings = longdoc.LongdocSettings(stride=args.stride)
    baseline = peak_rss_mib()
    started = time.perf_counter()
    if args.worker == "train":
        device = torch.device("cpu")
        precision = training.resolve_precision("fp32", device)
        optimizer = optimization.build_optimizer(model, 1e-5, 0.01, device=device)
        chunks, _ = longdoc.chunk_document(tokenizer, text, args.max_length, settings, label=1)
        options = SimpleNamespace(gradient_accumulation_steps=1, chunk_batch_size=args.chunk_batch_size,
                                  pad_token_id=tokenizer.pad_token_id, aggregation="mean")
        model.train()
        train_longdoc.document_loss_backward(model, chunks, torch.zeros(len(chunks), dtype=torch.long),
                                             torch.tensor([1]), options, optimization.build_grad_scaler(precision, device),
                                             precision, device)
        optimizer.step()
        num_chunks = len(chunks)
    else:
        model.eval()

        def chunk_logits(batch):
            with torch.no_grad():
                return model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        toolkit = {"preprocessing": {"max_length": args.max_length}, "longdoc": settings.to_dict()}
        num_chunks = longdoc.predict_documents(chunk_logits, tokenizer, toolkit, [text],
                                               args.chunk_batch_size)[0]["num_chunks"]
    print(json.dumps({"mode": args.worker, "chars": args.chars, "chunks": num_chunks,
                      "chunk_batch_size": args.chunk_batch_size, "rss_after_load_mib": round(baseline, 1),
                      "peak_rss_mib": round(peak_rss_mib(), 1), "seconds": round(time.perf_counter() - started, 2)}))
    return 0


def measure(args, mode, chars, chunk_batch_size):
    command = [sys.executable, __file__, "--worker", mode, "--chars", str(chars), "--model-name", args.model_name,
               "--num-layers", str(args.num_layers), "--max-length", str(args.max_length), "--stride",
               str(args.stride), "--chunk-batch-size", str(chunk_batch_size)]
    environment = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    result = subprocess.run(command, capture_output=True, text=True, env=environment, cwd=REPO)
    if result.returncode != 0:
        raise SystemExit(f"worker failed ({mode}, {chars} chars):\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.worker:
        return run_worker(args)
    settings = [("bounded", args.chunk_batch_size)] + ([("unbounded", 10 ** 9)] if args.unbounded else [])
    rows = []
    print(f"{'mode':<6} {'batching':<10} {'chars':>7} {'chunks':>6} {'after load MiB':>14} {'peak MiB':>9} "
          f"{'growth MiB':>10} {'seconds':>8}")
    for mode in ("train", "infer"):
        for name, chunk_batch_size in settings:
            for chars in [int(size) for size in args.sizes.split(",")]:
                row = dict(measure(args, mode, chars, chunk_batch_size), batching=name)
                rows.append(row)
                print(f"{mode:<6} {name:<10} {chars:>7} {row['chunks']:>6} {row['rss_after_load_mib']:>14.1f} "
                      f"{row['peak_rss_mib']:>9.1f} {row['peak_rss_mib'] - row['rss_after_load_mib']:>10.1f} "
                      f"{row['seconds']:>8.2f}", flush=True)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
