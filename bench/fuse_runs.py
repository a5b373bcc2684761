"""The TF-IDF fusion of train_classifier.py --fuse-baseline, applied to runs already trained without it.

    python bench/fuse_runs.py --data-dir data/reviews_quality --runs runs/seed13,runs/seed14 \
        --output bench/results/quality_fused.json

For each run directory: its checkpoint-best is copied to --work-dir (the run is left as it was), the
copy's validation and test probabilities come from common.inference.classify (with the stored
temperature), and common.fusion.fuse_after_training, the function train_classifier.py calls at the end
of a --fuse-baseline run, fits the baseline on train.jsonl, tunes its share on val.jsonl and stores both
in the copy. The fused copy is then loaded again and classifies test.jsonl through the same path as
infer.py and the server; its accuracy is checked against the figure fuse_after_training reported.
Prints model, baseline and fused test accuracy per run, then their mean and standard deviation.
"""
import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from common import fusion, inference  # noqa: E402


def read_split(data_dir, name):
    path = Path(data_dir) / f"{name}.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


class Example:
    """What common.baselines.example_texts reads: text, context, and the label id."""

    def __init__(self, record, label_names):
        self.text, self.context = record["text"], record.get("context")
        self.label = label_names.index(record["label"])


def model_probabilities(loaded, examples):
    """(examples, labels) probabilities of the model alone, after its stored temperature."""
    results = inference.classify(loaded, [e.text for e in examples], [e.context for e in examples] if any(
        e.context for e in examples) else None, with_logits=True)
    return inference.softmax(np.array([r["logits"] for r in results]), inference.resolve_temperature(loaded))


def fuse_run(run_dir, data_dir, work_dir, metric):
    copy = Path(work_dir) / Path(run_dir).name / "checkpoint-best"
    if copy.exists():
        shutil.rmtree(copy)
    shutil.copytree(Path(run_dir) / "checkpoint-best", copy)
    loaded = inference.load_model(copy)
    names = loaded.label_names
    splits = {name: [Example(record, names) for record in read_split(data_dir, name)]
              for name in ("train", "val", "test")}
    labels = {name: np.array([e.label for e in examples]) for name, examples in splits.items()}
    probabilities = {name: model_probabilities(loaded, splits[name]) for name in ("val", "test")}
    model_test = float((probabilities["test"].argmax(1) == labels["test"]).mean())
    reported = fusion.fuse_after_training(copy, dict(loaded.toolkit), splits["train"],
                                          (splits["val"], probabilities["val"], labels["val"]),
                                          (splits["test"], probabilities["test"], labels["test"]), names, metric,
                                          print)
    fused_loaded = inference.load_model(copy)  # as infer.py and the server load it
    results = inference.classify(fused_loaded, [e.text for e in splits["test"]])
    through_inference = float(np.mean([names.index(r["label"]) == label for r, label in zip(results,
                                                                                            labels["test"])]))
    return {"run": str(run_dir), "model": model_test, "baseline": reported["baseline"]["accuracy"],
            "fused": reported["fusion"]["evaluation"]["accuracy"], "weight": reported["fusion"]["weight"],
            "validation": reported["fusion"]["validation"], "fused_through_inference": through_inference}


def mean_std(values):
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True, help="train.jsonl, val.jsonl and test.jsonl")
    parser.add_argument("--runs", required=True, help="comma-separated train_classifier.py output directories")
    parser.add_argument("--work-dir", default="runs/fuse_runs", help="where the fused copies go")
    parser.add_argument("--metric", default="macro_f1", help="the validation metric the share is tuned on")
    parser.add_argument("--output", help="JSON results")
    args = parser.parse_args(argv)
    rows = [fuse_run(run, args.data_dir, args.work_dir, args.metric) for run in args.runs.split(",")]
    for row in rows:
        print(f"{row['run']}: model {row['model']:.4f}, baseline {row['baseline']:.4f}, fused {row['fused']:.4f} "
              f"(share {row['weight']:g}; through inference {row['fused_through_inference']:.4f})")
    summary = {key: mean_std([row[key] for row in rows]) for key in ("model", "baseline", "fused")}
    print("; ".join(f"{key} {100 * cell['mean']:.2f} ± {100 * cell['std']:.2f}" for key, cell in summary.items()))
    if args.output:
        Path(args.output).write_text(json.dumps({"command": " ".join(sys.argv), "runs": rows, "summary": summary},
                                                indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
