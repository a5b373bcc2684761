"""Retrieve-then-rerank: a bi-encoder's top 50 reordered by a trained cross-encoder, against the
bi-encoder alone (issue 16's judgement: at least +5 NDCG@10 points).

    python bench/rerank_quality.py                                  # listwise on the retriever's negatives
    python bench/rerank_quality.py --losses pointwise,listwise --seeds 13,14,15
    python bench/rerank_quality.py --negatives-from file            # the file's random negatives instead
    python bench/rerank_quality.py --retriever output/vector-best   # a tuned bi-encoder instead
    python bench/rerank_quality.py --data-dir data/review_retrieval --retriever runs/rr/retriever \
        --extend-vocab 3 --max-length 128 --epochs 1   # the Chinese reviews (bench/retrieval_quality.py's data)
    python bench/rerank_quality.py --source docstrings --device cuda --precision bf16 --max-length 192
        # library APIs: 1,200 training queries (bench/prepare_retrieval.py --source docstrings)

Data: by default the English inverse-cloze set of ``bench/prepare_retrieval.py --source pydoc`` (Python's own
documentation, split by topic; built under --data-dir when missing) with --negatives 76: each test
query lists its paragraph (rel 1.0), 3 same-topic paragraphs (0.2) and up to 76 others (0), so the
retriever's top 50 is a real cut. Training: 2 queries per paragraph, each with its document, one
same-topic and --train-negatives others. Any --data-dir holding train/valid/test.jsonl of the graded
pair format works as it is (nothing is built then), e.g. the Chinese review set of
``bench/retrieval_quality.py`` (50 listed candidates per test query: its top 50 is the whole list).

Training negatives (--negatives-from): ``retriever`` (default) mines them as the reranker meets them
at test time, among the retriever's own top ranks: ``train_vector.py --mode mine`` with the retriever
writes each training query with its paragraph and --mine-negatives documents drawn from ranks
--mine-range of the training documents (FlagEmbedding's recipe for a reranker); ``file`` trains on
the file's own pairs (one same-topic paragraph and random others).

The retriever is the untuned encoder (--model, mean pooling: how all-MiniLM-L6-v2 was trained as a
sentence embedder) unless --retriever names a train_vector.py model directory. Each reranker run
trains ``train_classifier.py --problem-type rerank`` from --model in its own process (cached under
--work-dir, --rerun forces) and reads its metrics.json: NDCG@10 before and after reranking, and the
reranker alone on every listed candidate beside TF-IDF, and the reranker's score fused with the
retriever's (the retriever's share tuned on the validation queries and stored with the reranker).
The table goes to stdout and to --output
(JSON, with machine, command and commit).
"""
import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import (add_worker_args, count_lines, describe_machine, mean_std, run_in_process,  # noqa: E402
                     toolkit_commit)

REPO_ROOT = Path(__file__).resolve().parent.parent
METRICS = ("ndcg@10", "mrr@10", "recall@10")
DEFAULT_MODEL = "../shared/models/all-MiniLM-L6-v2"


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--losses", default="listwise", help="comma-separated --rerank-loss values")
    parser.add_argument("--seeds", default="13", help="comma-separated training seeds")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="pretrained encoder (path), or a model directory of this toolkit (its encoder)")
    parser.add_argument("--retriever", help="bi-encoder model directory (default: the untuned --model, mean pooling)")
    parser.add_argument("--retriever-max-length", type=int, default=256,
                        help="tokens per text of the untuned retriever (all-MiniLM-L6-v2 was trained at 256)")
    parser.add_argument("--source", choices=["pydoc", "docstrings"], default="pydoc",
                        help="prepare_retrieval.py --source when the data is built: Python's documentation, or "
                             "library docstrings (1,200 training APIs, 150 validation, 600 test)")
    parser.add_argument("--data-dir", default=None,
                        help="train/valid/test.jsonl, built when missing (default data/<source>_rerank)")
    parser.add_argument("--negatives", type=int, default=76, help="rel-0 candidates per test query (data build)")
    parser.add_argument("--train-negatives", type=int, default=7, help="rel-0 documents per training query")
    parser.add_argument("--train-file", default="train.jsonl",
                        help="training queries in --data-dir: train.jsonl, or train_all.jsonl (every other sentence "
                             "of each training paragraph as a query too)")
    parser.add_argument("--negatives-from", choices=["retriever", "file"], default="retriever",
                        help="training negatives: mined from the retriever's top ranks, or the file's random ones")
    parser.add_argument("--mine-range", default="2-50",
                        help="--negatives-from retriever: the retriever's ranks negatives are drawn from")
    parser.add_argument("--mine-negatives", type=int, default=15, help="--negatives-from retriever: per query")
    parser.add_argument("--mine-margin", type=float, default=0.05,
                        help="--negatives-from retriever: --negative-margin (-2: none, FlagEmbedding's default; for "
                             "a retriever that ranks the training positives low, the margin removes every candidate)")
    parser.add_argument("--work-dir", default=None,
                        help="one directory per run (default runs/rerank_quality, runs/rerank_quality_docstrings)")
    parser.add_argument("--output", default=None,
                        help="summary JSON (default bench/results/rerank_quality.json, rerank_quality_docstrings.json)")
    parser.add_argument("--epochs", type=int, default=4, help="training epochs")
    parser.add_argument("--learning-rate", type=float, default=1e-4, help="peak learning rate")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="pairs per step (pointwise); listwise: groups of --group-size pairs, batch / group size")
    parser.add_argument("--group-size", type=int, default=8, help="listwise: pairs per group")
    parser.add_argument("--max-length", type=int, default=48, help="tokens per query/document pair (reranker)")
    parser.add_argument("--pooling", default="cls", help="the reranker head's --pooling (cls, mean, max, pooler)")
    parser.add_argument("--extend-vocab", type=int, default=0,
                        help="the reranker's --extend-vocab (0: none; 3 for the Chinese reviews)")
    parser.add_argument("--precision", default="fp32", help="the reranker's --precision (fp32, bf16, auto)")
    parser.add_argument("--rerank-top", type=int, default=50, help="retrieved documents the reranker reorders")
    parser.add_argument("--rerun", action="store_true", help="retrain runs that already have a run.json")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch's default)")
    parser.add_argument("--device", default="cpu", help="mining and training device (cpu, cuda)")
    parser.add_argument("--train-path", help=argparse.SUPPRESS)  # internal: the mined training file
    add_worker_args(parser)
    return parser


def resolve_paths(args):
    suffix = "" if args.source == "pydoc" else f"_{args.source}"
    args.data_dir = args.data_dir or f"data/{args.source}_rerank"
    args.work_dir = args.work_dir or f"runs/rerank_quality{suffix}"
    args.output = args.output or f"bench/results/rerank_quality{suffix}.json"


def ensure_data(args):
    """(the data directory, how this run built it); None for a --data-dir that was already there, whose
    build settings this run does not know."""
    data_dir = Path(args.data_dir)
    if all((data_dir / name).is_file() for name in (args.train_file, "valid.jsonl", "test.jsonl")):
        return data_dir, None
    # pydoc: every other sentence of a training paragraph as a query too (train_all.jsonl); a docstring has
    # one query, and the CPU budget takes a sample of the APIs
    extra = ["--all-train-sentences"] if args.source == "pydoc" else ["--paragraphs", "1200,150,600"]
    subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "prepare_retrieval.py"), "--source", args.source,
                    "--negatives", str(args.negatives), "--train-negatives", str(args.train_negatives),
                    "--output-dir", str(data_dir), *extra], check=True)
    return data_dir, {"negatives": args.negatives, "train_negatives": args.train_negatives, "extra": extra}


# ---------------------------------------------------------------- workers: one run each, in a fresh process

def save_untuned_retriever(args, run_dir):
    """The pretrained encoder as a vector model directory (mean pooling), for --retriever."""
    from common.vector import BertVectorModel
    model = BertVectorModel.from_backbone(args.model, pooling="mean", max_length=args.retriever_max_length)
    model.save_pretrained(run_dir / "retriever")
    return {"retriever": str(run_dir / "retriever")}


def mine_negatives(args, run_dir):
    """The training queries with negatives from the retriever's ranks --mine-range of the training
    documents. Positives are the rel-1 paragraphs only (threshold 0.5): the same-topic paragraphs (0.2)
    rank below them at test time, so they may be drawn as negatives."""
    import train_vector
    output = run_dir / "train_mined.jsonl"
    argv = ["--mode", "mine", "--model-path", args.retriever, "--data-path", str(Path(args.data_dir) / args.train_file),
            "--relevance-threshold", "0.5", "--range-for-sampling", args.mine_range,
            "--negative-number", str(args.mine_negatives), "--negative-margin", str(args.mine_margin), "--seed", "13", "--device", args.device,
            "--output-path", str(output)]
    if train_vector.main(argv):
        raise SystemExit("train_vector.py --mode mine failed")
    return {"train_path": str(output), "argv": argv}


def train_reranker(args, loss, run_dir):
    import train_classifier
    data_dir = Path(args.data_dir)
    output_dir = run_dir / "output"
    batch_size = args.batch_size if loss == "pointwise" else max(1, args.batch_size // args.group_size)
    argv = ["--problem-type", "rerank", "--rerank-loss", loss, "--rerank-group-size", str(args.group_size),
            "--data-path", args.train_path or str(data_dir / args.train_file),
            "--val-path", str(data_dir / "valid.jsonl"),
            "--test-path", str(data_dir / "test.jsonl"), "--retriever", args.retriever,
            "--rerank-top", str(args.rerank_top), "--model-name", args.model, "--epochs", str(args.epochs),
            "--learning-rate", str(args.learning_rate), "--batch-size", str(batch_size),
            "--max-length", str(args.max_length), "--pooling", args.pooling, "--save-strategy", "no",
            "--precision", args.precision,
            *(["--extend-vocab", str(args.extend_vocab)] if args.extend_vocab else []),
            "--device", args.device, "--seed", str(args.seed), "--output-dir", str(output_dir)]
    started = time.perf_counter()
    if train_classifier.main(argv):
        raise SystemExit("train_classifier.py --problem-type rerank failed")
    seconds = time.perf_counter() - started
    metrics = json.loads((output_dir / "metrics.json").read_text(encoding="utf-8"))
    shutil.rmtree(output_dir / "checkpoint-best")  # the weights: ~90 MB per run
    report = metrics["retrieve_then_rerank"]
    return {"before": pick(report["before"]), "after": pick(report["after"]), "fused": pick(report["fused"]),
            "fusion_retriever_weight": report["fusion_retriever_weight"],
            "reranker_alone": pick(metrics["test"]), "tfidf_alone": pick(metrics["baseline"]),
            "untuned_validation_ndcg@10": (metrics["untuned"]["validation"] or {}).get("eval_ndcg@10"),
            "validation": pick(metrics["validation"]), "lowered_ndcg": report["lowered_ndcg"],
            "candidates_per_query": report["candidates_per_query"], "seconds": seconds, "argv": argv}


def pick(metrics):
    return {key: metrics[key] for key in METRICS}


def run_worker(args):
    sys.path.insert(0, str(REPO_ROOT))
    run_dir = Path(args.run_dir).resolve()
    if args.worker == "retriever":
        result = save_untuned_retriever(args, run_dir)
    elif args.worker == "mine":
        result = mine_negatives(args, run_dir)
    else:
        result = train_reranker(args, args.worker, run_dir)
    result.update({"loss": args.worker, "seed": args.seed})
    (run_dir / "run.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    return 0


# ---------------------------------------------------------------- driver

def launch(args, worker, seed, run_name):
    run_dir = Path(args.work_dir).resolve() / run_name
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", worker, "--seed", str(seed),
               "--run-dir", str(run_dir)]
    paths = ("model", "retriever", "data_dir", "train_path")
    for name in (*paths, "epochs", "learning_rate", "batch_size", "group_size", "max_length", "pooling",
                 "rerank_top", "retriever_max_length", "mine_range", "mine_negatives", "mine_margin", "extend_vocab",
                 "precision", "device", "train_file"):
        value = getattr(args, name)
        if value is not None:
            value = str(Path(value).resolve()) if name in paths else str(value)
            command += ["--" + name.replace("_", "-"), value]
    threads = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)} if args.threads else {}
    return run_in_process(run_dir, command, f"[rerank] {run_name}", args.rerun, threads)


def summarize(loss, results):
    row = {"loss": loss, "seeds": [r["seed"] for r in results],
           "seconds": [round(r["wall_seconds"]) for r in results]}
    for view in ("before", "after", "fused", "reranker_alone", "tfidf_alone"):
        for metric in METRICS:
            values = [r[view][metric] for r in results]
            mean, std = mean_std(values)
            row[f"{view}_{metric}"] = {"mean": mean, "std": std, "values": values}
    gains = [r["after"]["ndcg@10"] - r["before"]["ndcg@10"] for r in results]
    mean, std = mean_std(gains)
    row["ndcg@10_gain"] = {"mean": mean, "std": std, "values": gains}
    gains = [r["fused"]["ndcg@10"] - r["before"]["ndcg@10"] for r in results]
    mean, std = mean_std(gains)
    row["fused_ndcg@10_gain"] = {"mean": mean, "std": std, "values": gains}
    row["fusion_retriever_weights"] = [r["fusion_retriever_weight"] for r in results]
    return row


def format_cell(cell, points=False):
    scale, digits = (100, 1) if points else (1, 3)
    text = f"{scale * cell['mean']:+.{digits}f}" if points else f"{cell['mean']:.{digits}f}"
    return text if len(cell["values"]) == 1 else f"{text} ± {scale * cell['std']:.{digits}f}"


def format_table(rows):
    first = rows[0]
    lines = ["| ranking of each test query's candidates | runs | NDCG@10 | MRR@10 | Recall@10 |", "|---|---|---|---|---|",
             f"| bi-encoder alone | - | {format_cell(first['before_ndcg@10'])} | {format_cell(first['before_mrr@10'])} "
             f"| {format_cell(first['before_recall@10'])} |",
             f"| TF-IDF alone | - | {format_cell(first['tfidf_alone_ndcg@10'])} | "
             f"{format_cell(first['tfidf_alone_mrr@10'])} | {format_cell(first['tfidf_alone_recall@10'])} |"]
    for row in rows:
        lines.append(f"| bi-encoder top {row['rerank_top']} + {row['loss']} reranker | {len(row['seeds'])} | "
                     f"{format_cell(row['after_ndcg@10'])} ({format_cell(row['ndcg@10_gain'], points=True)} points) | "
                     f"{format_cell(row['after_mrr@10'])} | {format_cell(row['after_recall@10'])} |")
        shares = ", ".join(f"{weight:g}" for weight in row["fusion_retriever_weights"])
        lines.append(f"| bi-encoder top {row['rerank_top']} + {row['loss']} reranker fused with the retriever's "
                     f"score (its share {shares}, tuned on validation) | {len(row['seeds'])} | "
                     f"{format_cell(row['fused_ndcg@10'])} ({format_cell(row['fused_ndcg@10_gain'], points=True)} "
                     f"points) | {format_cell(row['fused_mrr@10'])} | {format_cell(row['fused_recall@10'])} |")
        lines.append(f"| {row['loss']} reranker alone (all candidates) | {len(row['seeds'])} | "
                     f"{format_cell(row['reranker_alone_ndcg@10'])} | {format_cell(row['reranker_alone_mrr@10'])} | "
                     f"{format_cell(row['reranker_alone_recall@10'])} |")
    return "\n".join(lines)


def main(argv=None):
    args = build_parser().parse_args(argv)
    resolve_paths(args)
    if args.worker:
        return run_worker(args)
    losses = [loss.strip() for loss in args.losses.split(",") if loss.strip()]
    seeds = [int(seed) for seed in args.seeds.split(",")]
    data_dir, built = ensure_data(args)
    retriever_given = args.retriever is not None
    if not retriever_given:
        args.retriever = launch(args, "retriever", 0, "untuned-retriever")["retriever"]
    retriever_name = Path(args.retriever).name if retriever_given else "untuned"
    queries = "" if args.train_file == "train.jsonl" else "-" + Path(args.train_file).stem  # run names differ by file
    negatives = "file" + queries
    if args.negatives_from == "retriever":
        negatives = (f"mined-{retriever_name}-{args.mine_range}-{args.mine_negatives}"
                     f"{'' if args.mine_margin == 0.05 else f'-margin{args.mine_margin:g}'}{queries}")
        args.train_path = launch(args, "mine", 0, negatives)["train_path"]
    settings = (f"{negatives}-len{args.max_length}-ep{args.epochs}-lr{args.learning_rate:g}-group{args.group_size}"
                f"{'' if args.pooling == 'cls' else '-' + args.pooling}-top{args.rerank_top}-{retriever_name}"
                f"{'' if args.model == DEFAULT_MODEL else '-from-' + Path(args.model).name}"
                f"{f'-extend{args.extend_vocab}' if args.extend_vocab else ''}"
                f"{'' if args.precision == 'fp32' else '-' + args.precision}")
    rows = []
    for loss in losses:
        results = []
        for seed in seeds:
            result = launch(args, loss, seed, f"{loss}-{settings}-seed{seed}")
            print(f"[rerank] {loss} seed {seed}: NDCG@10 {result['before']['ndcg@10']:.4f} -> "
                  f"{result['after']['ndcg@10']:.4f}, fused {result['fused']['ndcg@10']:.4f} "
                  f"({result['wall_seconds']:.0f} s)", flush=True)
            results.append(result)
        rows.append(dict(summarize(loss, results), rerank_top=args.rerank_top,
                         candidates_per_query=results[0]["candidates_per_query"]))
    print(format_table(rows))
    summary = {"machine": describe_machine(), "toolkit_commit": toolkit_commit(str(REPO_ROOT)),
               "data": {"dir": args.data_dir, "built_here": built,
                        "candidates_per_test_query": rows[0]["candidates_per_query"],
                        "train_file": args.train_file, "train": count_lines(data_dir / args.train_file),
                        **{name: count_lines(data_dir / f"{name}.jsonl") for name in ("valid", "test")}},
               "retriever": "given" if retriever_given else "untuned --model, mean pooling",
               "training_negatives": ({"from": "retriever", "ranks": args.mine_range, "per_query": args.mine_negatives,
                                       "margin": args.mine_margin}
                                      if args.negatives_from == "retriever" else {"from": "file"}),
               "settings": {"model": Path(args.model).name, "epochs": args.epochs, "learning_rate": args.learning_rate,
                            "batch_size": args.batch_size, "group_size": args.group_size,
                            "max_length": args.max_length, "pooling": args.pooling,
                            "retriever_max_length": args.retriever_max_length,
                            "rerank_top": args.rerank_top, "precision": args.precision,
                            "extend_vocab": args.extend_vocab,
                            "device": args.device},
               "command": "python bench/rerank_quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "rows": rows}
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
