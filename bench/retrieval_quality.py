"""Retrieval quality: train_vector.py's defaults and variants against the untuned encoder and TF-IDF.

    python bench/retrieval_quality.py                          # defaults, baselines, one seed
    python bench/retrieval_quality.py --configs default,loss-mse --seeds 13,14,15
    python bench/retrieval_quality.py --configs loss-cosent,loss-infonce,pooling-mean --work-dir runs/retrieval_quality

Data: the Chinese review inverse-cloze set of ``bench/prepare_retrieval.py --source reviews`` (built under
--data-dir when missing): ~6k graded training pairs, validation queries, 300 test queries x 50
candidates (rel 1.0 / 0.2 / 0). Every configuration trains in its own process, once per seed, with
train_vector.py's defaults except what the bench fixes for every run: --epochs 1, --max-length,
--precision fp32, --device cpu, --seed. Then ``--mode evaluate --select-best`` scores every checkpoint
on the test set: "selected" is the model the run publishes (lowest validation loss, the untuned encoder
included), "last" the final step. Runs are cached under --work-dir (run.json per run); --rerun forces
them. The table goes to stdout and to --output (JSON, with machine, command and commit).

Configurations (--configs, comma-separated): see CONFIGS below; "default" passes no extra flag.
  untuned-cls, untuned-mean   the pretrained encoder, evaluated as is with that pooling (seedless)
  tfidf                       char 1-3-gram TF-IDF cosine (common/baselines.py, seedless)
"""
import argparse
import json
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import (add_worker_args, count_lines, describe_machine, mean_std, parse_configs,  # noqa: E402
                     run_in_process, toolkit_commit)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIGS = "tfidf,untuned-cls,untuned-mean,default"
EXTEND = ["--extend-vocab", "3"]

# name -> extra train_vector.py flags (None: not a training run). Rows measured under other defaults
# spell out every flag that differs from today's (infonce, mean pooling, 5e-5, new rows at 10x).
SEED_DEFAULTS = ["--loss", "mse", "--pooling", "cls", "--learning-rate", "2e-5"]  # train_vector.py until 2026-12-02
CONFIGS = {
    "untuned-cls": None, "untuned-mean": None, "tfidf": None,
    "default": [],
    "extend": EXTEND + ["--new-token-init", "unk"],  # the default until 2026-12-03: rows start at [UNK]
    "seed-defaults": SEED_DEFAULTS,
    # issue 14's headline run: the seed's defaults with --extend-vocab 3, the added rows at the shared rate
    "seed-defaults-extend": SEED_DEFAULTS + EXTEND + ["--new-token-init", "unk", "--new-token-lr", "2e-5"],
    # one change from today's defaults
    "loss-mse": ["--loss", "mse"],
    "loss-cosent": ["--loss", "cosent"],
    "pooling-cls": ["--pooling", "cls"],
    "lr-2e-5": ["--learning-rate", "2e-5"],
    "lr-1e-4": ["--learning-rate", "1e-4"],
    "extend-mean": EXTEND + ["--new-token-init", "mean"],
    "extend-random": EXTEND + ["--new-token-init", "random"],
    "extend-cooccurrence": EXTEND + ["--new-token-init", "cooccurrence"],
    "extend-same-lr": EXTEND + ["--new-token-lr", "5e-5"],
    # the search from the seed's defaults to today's (all at 2e-5 unless named)
    "cosent-mean-2e-5": ["--loss", "cosent", "--pooling", "mean", "--learning-rate", "2e-5"],
    "infonce-mean-2e-5": ["--loss", "infonce", "--pooling", "mean", "--learning-rate", "2e-5"],
    # InfoNCE's positives are rel > --relevance-threshold: at 0.5 the rel-0.2 pairs are left out
    "infonce-mean-2e-5-positives": ["--loss", "infonce", "--pooling", "mean", "--learning-rate", "2e-5",
                                    "--relevance-threshold", "0.5"],
    "infonce-mean-2e-5-extend-mean": ["--loss", "infonce", "--pooling", "mean", "--learning-rate", "2e-5"] + EXTEND
    + ["--new-token-init", "mean", "--new-token-lr", "2e-5"],
    "infonce-mean-5e-5": ["--loss", "infonce", "--pooling", "mean", "--learning-rate", "5e-5"],
    "infonce-mean-1e-4": ["--loss", "infonce", "--pooling", "mean", "--learning-rate", "1e-4"],
}
METRICS = ("ndcg@10", "mrr@10", "recall@10")


# ---------------------------------------------------------------- arguments

def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help="comma-separated configurations (see above)")
    parser.add_argument("--seeds", default="13", help="comma-separated training seeds")
    parser.add_argument("--model", default="../shared/models/all-MiniLM-L6-v2", help="pretrained encoder (path)")
    parser.add_argument("--data-dir", default="data/review_retrieval", help="train/valid/test.jsonl (built when missing)")
    parser.add_argument("--paragraphs", default="750,60,300",
                        help="reviews in train,valid,test when the data is built (2 queries x 4 pairs per "
                             "training review; 1 query x 50 candidates per test review)")
    parser.add_argument("--data-seed", type=int, default=13, help="sampling seed of prepare_retrieval.py")
    parser.add_argument("--work-dir", default="runs/retrieval_quality", help="one directory per configuration and seed")
    parser.add_argument("--output", default="bench/results/retrieval_quality.json", help="summary JSON")
    parser.add_argument("--epochs", type=int, default=1, help="training epochs")
    parser.add_argument("--max-length", type=int, default=64, help="tokens per query and per document")
    parser.add_argument("--rerun", action="store_true", help="retrain runs that already have a run.json")
    parser.add_argument("--jobs", type=int, default=1, help="runs at the same time (each its own process)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads per run (0: torch's default); on a busy machine 1 thread per run "
                             "wastes less time waiting for the other thread")
    add_worker_args(parser)
    return parser


def ensure_data(args):
    data_dir = Path(args.data_dir)
    if all((data_dir / f"{name}.jsonl").is_file() for name in ("train", "valid", "test")):
        return data_dir
    subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "prepare_retrieval.py"), "--source", "reviews",
                    "--negatives", "46", "--paragraphs", args.paragraphs, "--seed", str(args.data_seed),
                    "--output-dir", str(data_dir)], check=True)
    return data_dir


# ---------------------------------------------------------------- workers: one run each, in a fresh process

def pick(metrics):
    return {key: metrics[key] for key in METRICS}


def run_training(args, flags, run_dir):
    import train_vector
    data_dir = Path(args.data_dir)
    output_dir = run_dir / "output"
    argv = ["--mode", "train", "--data-path", str(data_dir / "train.jsonl"), "--val-path",
            str(data_dir / "valid.jsonl"), "--model-name", args.model, "--epochs", str(args.epochs),
            "--max-length", str(args.max_length), "--precision", "fp32", "--device", "cpu", "--seed", str(args.seed),
            "--output-dir", str(output_dir), *flags]
    started = time.perf_counter()
    if train_vector.main(argv):
        raise SystemExit("train_vector.py --mode train failed")
    train_seconds = time.perf_counter() - started
    results_path = run_dir / "eval_results.json"
    if train_vector.main(["--mode", "evaluate", "--test-path", str(data_dir / "test.jsonl"), "--output-dir",
                          str(output_dir), "--select-best", "--metrics-path", str(results_path), "--device", "cpu",
                          "--precision", "fp32"]):
        raise SystemExit("train_vector.py --mode evaluate failed")
    results = json.loads(results_path.read_text(encoding="utf-8"))
    best = json.loads((output_dir / "best_checkpoint.json").read_text(encoding="utf-8"))
    trained = json.loads((output_dir / "training_args.json").read_text(encoding="utf-8"))
    steps = {name: metrics for name, metrics in results["checkpoints"].items() if name.startswith("checkpoint-step-")}
    last = max(steps, key=lambda name: int(name.rsplit("-", 1)[1]))
    log_rows = [json.loads(line) for line in (output_dir / "train_log.jsonl").read_text().splitlines() if line]
    for directory in output_dir.glob("checkpoint-*"):
        shutil.rmtree(directory)  # optimizer state: ~270 MB each
    return {"reported": pick(results["checkpoints"][results["best"]]), "last": pick(steps[last]),
            "selected": results["best"], "untuned_beaten": best.get("untuned_beaten"),
            "val_losses": {row["step"]: row["eval_loss"] for row in log_rows if "eval_loss" in row},
            "resolved": {key: trained.get(key) for key in ("loss", "pooling", "learning_rate", "extend_vocab",
                                                           "new_token_init", "new_token_lr", "batch_size",
                                                           "warmup_steps")},
            "train_seconds": train_seconds, "argv": argv}


def run_untuned(args, pooling, run_dir):
    import train_vector
    metrics_path = run_dir / "eval_metrics.json"
    if train_vector.main(["--mode", "evaluate", "--test-path", str(Path(args.data_dir) / "test.jsonl"),
                          "--model-path", args.model, "--pooling", pooling, "--max-length", str(args.max_length),
                          "--metrics-path", str(metrics_path), "--device", "cpu", "--precision", "fp32",
                          "--baseline", "none"]):
        raise SystemExit("train_vector.py --mode evaluate failed")
    return {"reported": pick(json.loads(metrics_path.read_text(encoding="utf-8")))}


def run_tfidf(args):
    from common.baselines import retrieval_baseline
    from common.pairs import load_pairs
    pairs = load_pairs(str(Path(args.data_dir) / "test.jsonl"), False, None, None, ("test",))
    return {"reported": pick(retrieval_baseline([p.query for p in pairs], [p.document for p in pairs],
                                                [p.rel for p in pairs], (1, 3, 5, 10)))}


def run_worker(args):
    sys.path.insert(0, str(REPO_ROOT))
    run_dir = Path(args.run_dir).resolve()
    if args.worker == "tfidf":
        result = run_tfidf(args)
    elif args.worker.startswith("untuned-"):
        result = run_untuned(args, args.worker.split("-", 1)[1], run_dir)
    else:
        result = run_training(args, CONFIGS[args.worker], run_dir)
    seedless = CONFIGS[args.worker] is None
    result.update({"config": args.worker, "seed": None if seedless else args.seed,
                   "flags": CONFIGS[args.worker]})
    (run_dir / "run.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    return 0


# ---------------------------------------------------------------- driver

def launch(args, name, seed):
    """Run one configuration and seed in its own process unless its run.json exists; return the result."""
    run_dir = Path(args.work_dir).resolve() / (name if CONFIGS[name] is None else f"{name}-seed{seed}")
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--seed", str(seed),
               "--run-dir", str(run_dir), "--model", str(Path(args.model).resolve()),
               "--data-dir", str(Path(args.data_dir).resolve()), "--epochs", str(args.epochs),
               "--max-length", str(args.max_length)]
    threads = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)} if args.threads else {}
    result = run_in_process(run_dir, command, f"[retrieval] {name} seed {seed}", args.rerun, threads)
    last = f" (last step {result['last']['ndcg@10']:.4f})" if "last" in result else ""
    print(f"[retrieval] {name} seed {seed}: test NDCG@10 {result['reported']['ndcg@10']:.4f}{last} "
          f"({result['wall_seconds']:.0f} s)", flush=True)
    return result


def summarize(name, results):
    row = {"config": name, "flags": CONFIGS[name], "seeds": [r["seed"] for r in results]}
    for view in ("reported", "last"):
        if all(view in r for r in results):
            for metric in METRICS:
                values = [r[view][metric] for r in results]
                mean, std = mean_std(values)
                row[f"{view}_{metric}"] = {"mean": mean, "std": std, "values": values}
    if all("selected" in r for r in results):
        row["selected"] = [r["selected"] for r in results]
        row["resolved"] = results[0]["resolved"]
    return row


def format_cell(cell):
    if cell is None or cell["mean"] is None:
        return "-"
    if len(cell["values"]) == 1:
        return f"{cell['mean']:.3f}"
    return f"{cell['mean']:.3f} ± {cell['std']:.3f}"


def format_table(rows, untuned_row):
    base = untuned_row["reported_ndcg@10"]["mean"] if untuned_row else None
    lines = ["| configuration | flags | runs | NDCG@10 (published model) | vs untuned (mean) | NDCG@10 last step | "
             "MRR@10 | model published |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        cell = row["reported_ndcg@10"]
        delta = "-" if base is None else f"{cell['mean'] - base:+.3f}"
        flags = "-" if row["flags"] is None else (" ".join(row["flags"]) or "(none)")
        selected = ", ".join(sorted(set(row.get("selected", [])))) or "-"
        lines.append(f"| {row['config']} | {flags} | {len(row['seeds'])} | {format_cell(cell)} | {delta} | "
                     f"{format_cell(row.get('last_ndcg@10'))} | {format_cell(row['reported_mrr@10'])} | {selected} |")
    return "\n".join(lines)


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.worker:
        return run_worker(args)
    names = parse_configs(args.configs, CONFIGS)
    seeds = [int(seed) for seed in args.seeds.split(",")]
    ensure_data(args)
    runs = [(name, seed) for name in names for seed in ([seeds[0]] if CONFIGS[name] is None else seeds)]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:  # threads only wait on the run processes
        results = dict(zip(runs, pool.map(lambda run: launch(args, *run), runs)))
    rows = [summarize(name, [results[run] for run in runs if run[0] == name]) for name in names]
    output = Path(args.output)
    previous = json.loads(output.read_text(encoding="utf-8")) if output.is_file() else {}
    merged = {row["config"]: row for row in previous.get("rows", [])}
    merged.update({row["config"]: row for row in rows})  # earlier configurations stay; re-measured ones are replaced
    print(format_table(rows, merged.get("untuned-mean")))  # the untuned encoder as evaluated by default
    data_dir = Path(args.data_dir)
    summary = {"machine": describe_machine(), "toolkit_commit": toolkit_commit(str(REPO_ROOT)),
               "data": {"dir": str(data_dir), "data_seed": args.data_seed, "paragraphs": args.paragraphs,
                        **{name: count_lines(data_dir / f"{name}.jsonl") for name in ("train", "valid", "test")}},
               "settings": {"model": args.model, "epochs": args.epochs, "max_length": args.max_length,
                            "precision": "fp32", "device": "cpu"},
               "command": "python bench/retrieval_quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "rows": list(merged.values())}
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
