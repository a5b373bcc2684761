"""Multi-label decision thresholds tuned on validation against a fixed 0.5, on the same trained models.

Trains train_classifier.py --problem-type multi_label once per seed (the data from
bench/prepare_kaomoji.py) and reads each run's metrics.json: the test set at the per-label
thresholds tuned on validation ("test") and at 0.5 for every label ("test_at_threshold_0.5"),
beside the constant baseline (the most frequent training label set). Prints mean ± spread and
writes the figures as JSON.

    flock /work/heavy.lock python bench/multilabel_thresholds.py --data-dir data/kaomoji \
        --model-name ../shared/models/all-MiniLM-L6-v2 --output bench/results/multilabel_thresholds.json
"""
import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

METRICS = ("micro_f1", "macro_f1", "samples_f1")


def train_once(args, seed, output_dir):
    import train_classifier
    data_dir = Path(args.data_dir)
    argv = ["--data-path", data_dir / "train.jsonl", "--val-path", data_dir / "val.jsonl", "--test-path",
            data_dir / "test.jsonl", "--problem-type", "multi_label", "--model-name", args.model_name,
            "--output-dir", output_dir, "--max-length", args.max_length, "--epochs", args.epochs,
            "--batch-size", "32", "--learning-rate", args.learning_rate, "--seed", seed, "--device", "cpu",
            "--precision", "fp32", "--save-strategy", "no", "--logging-steps", "50", "--baseline", "none"]
    started = time.time()
    if train_classifier.main([str(value) for value in argv]) != 0:
        raise SystemExit(f"seed {seed}: training failed")
    metrics = json.loads((Path(output_dir) / "metrics.json").read_text(encoding="utf-8"))
    return {"seed": seed, "seconds": round(time.time() - started, 1),
            "tuned": {name: metrics["test"][name] for name in METRICS},
            "fixed_0.5": {name: metrics["test_at_threshold_0.5"][name] for name in METRICS},
            "constant_baseline": metrics["constant_baseline"]}


def summarize(runs, key):
    return {name: {"mean": statistics.mean(run[key][name] for run in runs),
                   "stdev": statistics.stdev(run[key][name] for run in runs) if len(runs) > 1 else 0.0}
            for name in METRICS}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--model-name", required=True)
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--epochs", default="2")
    parser.add_argument("--max-length", default="32")
    parser.add_argument("--learning-rate", default="5e-5")
    parser.add_argument("--output", required=True, help="results JSON")
    args = parser.parse_args(argv)
    runs = []
    for seed in args.seeds.split(","):
        with tempfile.TemporaryDirectory() as output_dir:
            runs.append(train_once(args, int(seed), Path(output_dir) / "run"))
        print(json.dumps(runs[-1]), flush=True)
    results = {"command": "python bench/multilabel_thresholds.py " + " ".join(
                   f"--{name.replace('_', '-')} {value}" for name, value in vars(args).items()
                   if name not in ("data_dir", "model_name", "output")),
               "data": "bench/prepare_kaomoji.py defaults (2000/500/1000, 12 labels, seed 0)",
               "model": Path(args.model_name).name, "runs": runs,
               "tuned": summarize(runs, "tuned"), "fixed_0.5": summarize(runs, "fixed_0.5")}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2), encoding="utf-8")
    for key in ("tuned", "fixed_0.5"):
        print(key, ", ".join(f"{name} {v['mean']:.4f} ± {v['stdev']:.4f}" for name, v in results[key].items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
