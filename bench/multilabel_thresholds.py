"""Multi-label decision thresholds tuned on validation against a fixed 0.5, on the same trained models.

Trains train_classifier.py --problem-type multi_label once per seed (the data from
bench/prepare_kaomoji.py) and reads each run's metrics.json: the test set at the per-label
thresholds tuned on validation ("test") and at 0.5 for every label ("test_at_threshold_0.5"),
beside the constant baseline (the most frequent training label set) and a TF-IDF baseline
(character 1-3-grams, one logistic regression per label, scikit-learn) scored both ways too.
Prints mean ± spread and writes the figures as JSON.

    python bench/multilabel_thresholds.py --data-dir data/kaomoji \
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


def read_split(data_dir, split):
    rows = [json.loads(line) for line in (Path(data_dir) / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
            if line.strip()]
    return [row["text"] for row in rows], [row["label"] for row in rows]


def tfidf_baseline(data_dir):
    """TF-IDF + one-vs-rest logistic regression: micro/macro/samples-F1 at 0.5 and at per-label
    thresholds tuned on validation (the toolkit's own tuning function)."""
    import numpy as np
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.preprocessing import MultiLabelBinarizer
    from common.problem_types import best_label_threshold
    (train_x, train_y), (val_x, val_y), (test_x, test_y) = (read_split(data_dir, s) for s in ("train", "val", "test"))
    binarizer = MultiLabelBinarizer().fit(train_y + val_y + test_y)
    vectorizer = TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 3), min_df=2, sublinear_tf=True).fit(train_x)
    model = OneVsRestClassifier(LogisticRegression(max_iter=2000)).fit(vectorizer.transform(train_x),
                                                                      binarizer.transform(train_y))
    val_probs, test_probs = (model.predict_proba(vectorizer.transform(x)) for x in (val_x, test_x))
    val_targets, test_targets = binarizer.transform(val_y), binarizer.transform(test_y)
    thresholds = np.array([best_label_threshold(val_probs[:, i], val_targets[:, i]) for i in range(val_targets.shape[1])])

    def scores(decisions):
        return {name: float(f1_score(test_targets, decisions, average=name.split("_")[0],
                                     zero_division=1 if name == "samples_f1" else 0)) for name in METRICS}
    return {"tuned": scores(test_probs >= thresholds), "fixed_0.5": scores(test_probs >= 0.5)}


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
    parser.add_argument("--learning-rate", default="2e-4")
    parser.add_argument("--output", required=True, help="results JSON")
    args = parser.parse_args(argv)
    baseline = tfidf_baseline(args.data_dir)
    print("tfidf", json.dumps(baseline), flush=True)
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
               "tuned": summarize(runs, "tuned"), "fixed_0.5": summarize(runs, "fixed_0.5"), "tfidf": baseline}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2), encoding="utf-8")
    for key in ("tuned", "fixed_0.5"):
        print(key, ", ".join(f"{name} {v['mean']:.4f} ± {v['stdev']:.4f}" for name, v in results[key].items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
