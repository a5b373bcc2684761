"""What a classification head predicts: one label of several, any number of labels, or a score.

One class per problem type holds every piece that differs between them: reading a record's
label, the label set, the training target, the loss, the evaluation metrics, the decision
rule and the shape of a prediction. The trainers (train_classifier.py, train_longdoc.py),
inference, the server and the ONNX export ask the model's problem type for these instead
of branching themselves. ``PROBLEM_TYPES`` maps the name stored as ``toolkit["problem_type"]``
to its class; a model directory without that field is ``single_label``. A new problem type
is one more class with the same methods and one more entry in ``PROBLEM_TYPES`` (and in
common/choices.py).
"""
import json
import math
import sys

import numpy as np
import torch
import torch.nn.functional as F

from common import data, techniques
from common.choices import METRICS_BY_PROBLEM_TYPE
from common.errors import UserError, short_repr
from common.metrics import classification_metrics, multilabel_metrics, regression_metrics
from common.reranking import Rerank

DEFAULT_THRESHOLD = 0.5
GLOBAL_THRESHOLD_CANDIDATES = 512  # probability quantiles tried by --threshold-strategy global
CO_OCCURRING_PAIRS_SHOWN = 5


class SingleLabel:
    """One label per example: softmax, cross-entropy, argmax (the toolkit's original task)."""
    name = "single_label"
    parse_label = None  # data.py's single-label rules (an integer id or a name)
    logged_metrics = ("loss", "accuracy", "macro_f1")  # in every evaluation row of train_log.jsonl

    def __init__(self, settings=None):
        self.settings = {}

    def check_options(self, args):
        """Refuse flags that mean nothing here (the other problem types' own flags)."""
        _refuse_foreign_flags(args, self.name)

    def toolkit_settings(self):
        """What config.json's toolkit block stores about the problem type."""
        return {"problem_type": self.name}

    def num_outputs(self, label_set):
        return len(label_set.names)

    # ---- data
    def build_label_set(self, examples, fixed_names, label_field):
        return data.LabelSet.from_examples(examples, fixed_names, label_field)

    def resolve(self, label_set, examples, skip_invalid, label_field):
        return data.resolve_labels(label_set, examples, skip_invalid, label_field)

    def split_validation(self, examples, val_ratio, seed, label_set):
        """(train, validation) with the class shares of the whole; ``label_set`` names a class it cannot split."""
        return data.stratified_split(examples, val_ratio, seed, label_set)

    def check_coverage(self, train_examples, val_examples, label_set):
        data.check_label_coverage(train_examples, val_examples, label_set)

    def target(self, label, num_labels):
        """The training target of a resolved label: here its id."""
        return label if label is not None else -100

    def summarize_labels(self, examples, label_set):
        counts = np.bincount([e.label for e in examples if e.label is not None], minlength=len(label_set.names))
        total = int(counts.sum()) or 1
        return {"classes": {label_set.names[i]: {"count": int(c), "share": round(float(c) / total, 4)}
                            for i, c in enumerate(counts)}}

    # ---- training and evaluation
    headline_metrics = ("accuracy", "macro_f1", "weighted_f1")  # the final log line and --eval-only's output

    def fit_training_data(self, train_examples, args):
        """Settings learned from the training data before training (regression's target scaling)."""

    def fit_validation_data(self, logits, targets, label_names, args):
        """Settings tuned on the best model's validation outputs (multi-label thresholds); returns a line
        saying what was fitted, or None. Single-label calibration lives in train_classifier.finish."""
        return None

    def build_training_loss(self, args, train_targets, num_labels):
        """Cross-entropy or focal loss with the class-weight and smoothing flags (common/techniques.py)."""
        counts = np.bincount(train_targets, minlength=num_labels)
        scheme = _flag(args, "class_weights")
        class_weights = techniques.compute_class_weights(counts, scheme, _flag(args, "class_weights_beta"))
        if class_weights is not None:
            print(f"class weights ({scheme}): " + ", ".join(f"{w:.3f}" for w in class_weights.tolist()))
            class_weights = class_weights.to(args.device_obj)
        return techniques.build_loss(_flag(args, "loss"), class_weights, _flag(args, "label_smoothing"),
                                     _flag(args, "focal_gamma"))

    def consistency(self, logits_a, logits_b):
        """R-Drop's term between two dropout passes: the symmetric KL of the two softmaxes."""
        return techniques.symmetric_kl(logits_a, logits_b)

    def evaluation_metrics(self, logits, targets, label_names, loss_fn=None):
        """Metrics of logits (examples, labels) against target ids, with the plain (or given) loss."""
        probs = torch.softmax(logits, dim=-1)
        metrics = classification_metrics(targets.numpy(), probs.argmax(-1).numpy(), label_names, probs.numpy())
        metrics["loss"] = float(F.cross_entropy(logits, targets) if loss_fn is None else loss_fn(logits, targets))
        return metrics

    # ---- inference
    def comparable_outputs(self, outputs):
        """What the ONNX parity gate compares: the logits themselves."""
        return outputs

    def decisions(self, outputs, threshold=None, label_names=None):
        """(examples, k) decisions the ONNX gate checks torch and onnxruntime agree on."""
        return np.asarray(outputs).argmax(-1)[:, None]

    def result(self, text, context, logits, label_names, temperature=1.0, top_k=None, threshold=None):
        """One prediction (see inference.classification_result)."""
        from common.inference import classification_result, softmax  # inference imports this module
        return classification_result(text, context, softmax(logits[None], temperature)[0], label_names, temperature,
                                     top_k)

    @staticmethod
    def decision_lines(result):
        """What infer.py prints for the prediction itself."""
        fused = [f"fused with the TF-IDF baseline: its share {result['baseline_weight']:g}"] \
            if result.get("baseline_weight") else []
        return [f"temperature: {result['temperature']}", *fused,
                f"predicted: {result['label']} (id {result['label_id']}, probability {result['probability']:.4f})"]


class MultiLabel(SingleLabel):
    """Any number of labels per example (none included): a sigmoid per label, binary cross-entropy,
    and a decision threshold per label tuned on the validation set (``thresholds`` in the toolkit)."""
    name = "multi_label"
    logged_metrics = ("loss", "micro_f1", "macro_f1")
    headline_metrics = ("micro_f1", "macro_f1", "samples_f1", "subset_accuracy", "hamming_loss")

    def __init__(self, settings=None):
        settings = settings or {}
        self.thresholds = settings.get("thresholds") or {}  # {label name: threshold}
        self.threshold_strategy = settings.get("threshold_strategy", "per_label")
        self.separator = settings.get("label_separator", ",")

    def check_options(self, args):
        _refuse_foreign_flags(args, self.name)
        refused = {"--loss focal": _flag(args, "loss") == "focal",
                   "--class-weights effective": _flag(args, "class_weights") == "effective",
                   "--sampler weighted": _flag(args, "sampler") == "weighted"}
        _refuse(refused, "multi-label training (binary cross-entropy per label; --class-weights balanced "
                         "gives each label a pos_weight)")

    def toolkit_settings(self):
        return {"problem_type": self.name, "thresholds": dict(self.thresholds),
                "threshold_strategy": self.threshold_strategy, "label_separator": self.separator}

    # ---- data
    def parse_label(self, where, raw_label):
        """A list of label names (JSON), or one string of names joined by the label separator (CSV,
        chat); an empty list or string means "none of them". Names are stripped, and a name given
        twice (["a", "a"], "a, a ") is kept once: a label is either on a record or not."""
        if raw_label is None:
            raise data.RecordError(f"{where}: missing (an empty list [] means none of the labels)")
        if isinstance(raw_label, str):
            items = [part.strip() for part in raw_label.split(self.separator)] if self.separator else [raw_label]
            items = [item for item in items if item]
        elif isinstance(raw_label, list):
            items = raw_label
        else:
            raise data.RecordError(f"{where}: expected a list of labels (or names joined by "
                                   f"{self.separator!r}), got {type(raw_label).__name__}")
        names = []
        for item in items:
            if isinstance(item, bool) or not isinstance(item, (str, int)) or (isinstance(item, str) and not item.strip()):
                raise data.RecordError(f"{where}: expected label names (strings), got {short_repr(item)} in the list")
            names.append(data.check_encodable(where, str(item).strip()))
        return list(dict.fromkeys(names))  # a repeated name is one label

    def build_label_set(self, examples, fixed_names, label_field):
        names = fixed_names or sorted({name for example in examples for name in example.raw_label})
        if not names:
            raise UserError(f"field '{label_field}': no training record carries any label")
        if len(names) < 2:  # one sigmoid is a yes/no classifier, and the multi-label metrics need two columns
            found = (f"--labels {names[0]!r}: one name" if fixed_names
                     else f"field '{label_field}': every training record's labels are {names[0]!r} or none")
            raise UserError(f"{found}; multi_label needs two or more label names (for one yes/no label train "
                            "--problem-type single_label)")
        return data.LabelSet(names)

    def resolve(self, label_set, examples, skip_invalid, label_field):
        def resolve(example):
            example.label = sorted(label_set.id_of(name, example.locator, label_field) for name in example.raw_label)
            return example
        return data.parse_each(examples, resolve, skip_invalid)

    def split_validation(self, examples, val_ratio, seed, label_set):
        """A random split: per-class stratification has no single class to follow here."""
        return random_split(examples, val_ratio, seed)

    def check_coverage(self, train_examples, val_examples, label_set):
        """Warn about labels no training (or validation) record carries: they cannot be learned (or tuned)."""
        for split, examples in (("training", train_examples), ("validation", val_examples)):
            present = {label for example in examples for label in example.label}
            missing = [name for index, name in enumerate(label_set.names) if index not in present]
            if missing:
                print(f"warning: the {split} set has no records of: {', '.join(missing)}", file=sys.stderr)

    def target(self, label, num_labels):
        """Multi-hot floats (num_labels,)."""
        row = [0.0] * num_labels
        for index in label:
            row[index] = 1.0
        return row

    def summarize_labels(self, examples, label_set):
        """Per-label counts (share of records), labels per example and the most frequent label pairs."""
        matrix = np.array([self.target(e.label, len(label_set.names)) for e in examples]).reshape(
            len(examples), len(label_set.names))
        total = len(examples) or 1
        per_example = matrix.sum(1).astype(int)
        co_occurrence = matrix.T @ matrix  # (labels, labels): records carrying both
        pairs = sorted(((int(co_occurrence[i, j]), label_set.names[i], label_set.names[j])
                        for i in range(len(label_set.names)) for j in range(i + 1, len(label_set.names))
                        if co_occurrence[i, j] > 0), reverse=True)[:CO_OCCURRING_PAIRS_SHOWN]
        return {"classes": {name: {"count": int(count), "share": round(float(count) / total, 4)}
                            for name, count in zip(label_set.names, matrix.sum(0))},
                "labels_per_example": {"mean": round(float(per_example.mean()), 3) if len(examples) else 0.0,
                                       **{str(k): int((per_example == k).sum()) for k in range(3)},
                                       "3+": int((per_example >= 3).sum())},
                "co_occurring_pairs": [[first, second, count] for count, first, second in pairs]}

    # ---- training and evaluation
    def build_training_loss(self, args, train_targets, num_labels):
        """BCE with --label-smoothing; --class-weights balanced gives each label a pos_weight."""
        pos_weight = self.balanced_pos_weight(train_targets) if _flag(args, "class_weights") == "balanced" else None
        if pos_weight is not None:
            print("pos_weight (balanced): " + ", ".join(f"{w:.3f}" for w in pos_weight.tolist()))
        return self.build_loss(_flag(args, "label_smoothing"), pos_weight)

    def build_loss(self, label_smoothing=0.0, pos_weight=None):
        """Binary cross-entropy per label; smoothing moves each 0/1 target ``label_smoothing / 2`` inwards."""
        def loss_fn(logits, targets):
            targets = targets.float() * (1.0 - label_smoothing) + label_smoothing / 2
            weight = None if pos_weight is None else pos_weight.to(logits.device)
            return F.binary_cross_entropy_with_logits(logits.float(), targets, pos_weight=weight)
        return loss_fn

    @staticmethod
    def balanced_pos_weight(targets):
        """Per-label ``negatives / positives`` of the training targets (examples, labels): BCE's
        counterpart of balanced class weights (a label with no positives is weighted as if it had one)."""
        targets = torch.as_tensor(np.asarray(targets), dtype=torch.float32)
        positives = targets.sum(0)
        return (len(targets) - positives) / positives.clamp(min=1.0)

    def consistency(self, logits_a, logits_b):
        """R-Drop for sigmoids: the symmetric KL of the two passes' Bernoulli distributions, summed over
        labels, averaged over the batch."""
        p, q = torch.sigmoid(logits_a.float()), torch.sigmoid(logits_b.float())
        log_p, log_q = F.logsigmoid(logits_a.float()), F.logsigmoid(logits_b.float())
        log_not_p, log_not_q = F.logsigmoid(-logits_a.float()), F.logsigmoid(-logits_b.float())
        kl = (p - q) * (log_p - log_q) + (q - p) * (log_not_p - log_not_q)  # KL(p||q) + KL(q||p)
        return kl.sum(-1).mean() / 2

    def threshold_array(self, label_names, override=None):
        """(labels,) thresholds: ``override`` for every label, else the stored ones, else 0.5."""
        if override is not None:
            return np.full(len(label_names), float(override))
        return np.array([float(self.thresholds.get(name, DEFAULT_THRESHOLD)) for name in label_names])

    def evaluation_metrics(self, logits, targets, label_names, loss_fn=None, threshold=None):
        """Metrics at the stored thresholds (0.5 before tuning, or ``threshold`` for every label)."""
        probs = torch.sigmoid(logits.float()).numpy()
        decisions = probs >= self.threshold_array(label_names, threshold)
        metrics = multilabel_metrics(targets.numpy(), decisions, probs, label_names)
        metrics["loss"] = float(F.binary_cross_entropy_with_logits(logits.float(), targets.float()))
        return metrics

    def fit_validation_data(self, logits, targets, label_names, args):
        thresholds = self.tune_thresholds(logits, targets, label_names, args.threshold_strategy)
        return (f"thresholds tuned on validation ({args.threshold_strategy}): " +
                ", ".join(f"{name} {value:.3f}" for name, value in thresholds.items()))

    def reference_metrics(self, logits, targets, label_names):
        """(name, metrics) of the obvious alternative to the tuned thresholds: 0.5 for every label."""
        return "at_threshold_0.5", self.evaluation_metrics(logits, targets, label_names, threshold=DEFAULT_THRESHOLD)

    def constant_baseline(self, train_targets, eval_targets, label_names):
        """Micro/macro-F1 of always predicting the training set's most frequent label set."""
        import sklearn.metrics as skm
        rows, counts = np.unique(np.asarray(train_targets, dtype=int), axis=0, return_counts=True)
        constant = np.tile(rows[counts.argmax()], (len(eval_targets), 1))
        eval_targets = np.asarray(eval_targets, dtype=int)
        return {"rule": "the most frequent training label set",
                "labels": [name for name, on in zip(label_names, rows[counts.argmax()]) if on],
                **{f"{average}_f1": float(skm.f1_score(eval_targets, constant, average=average, zero_division=0))
                   for average in ("micro", "macro", "samples")}}

    def format_metrics(self, results, split_name):
        """The report lines: headline metrics at the tuned thresholds and at 0.5, then per label."""
        metrics, fixed = results[split_name], results.get(f"{split_name}_at_threshold_0.5", {})
        lines = ["  " + ", ".join(f"{name} {metrics[name]:.4f}" for name in self.headline_metrics) + " (stored thresholds)"]
        if fixed:
            lines.append("  " + ", ".join(f"{name} {fixed[name]:.4f}" for name in self.headline_metrics) + " (0.5)")
        width = max(len(name) for name in metrics["per_label"])
        lines += [f"  {name:<{width}}  precision {m['precision']:.4f}  recall {m['recall']:.4f}  f1 {m['f1']:.4f}  "
                  f"support {m['support']}" for name, m in metrics["per_label"].items()]
        return "\n".join(lines)

    def error_rows(self, examples, logits, targets, label_names):
        """errors.jsonl: each record whose predicted label set differs, with missed and spurious labels."""
        probs = torch.sigmoid(logits.float()).numpy()
        decisions = probs >= self.threshold_array(label_names)
        for example, row, target, decided in zip(examples, probs, targets.numpy().astype(bool), decisions):
            if (target == decided).all():
                continue
            yield {"where": example.locator, "text": example.text, "context": example.context,
                   "true_labels": [n for n, on in zip(label_names, target) if on],
                   "predicted_labels": [n for n, on in zip(label_names, decided) if on],
                   "missed": [n for n, t, d in zip(label_names, target, decided) if t and not d],
                   "spurious": [n for n, t, d in zip(label_names, target, decided) if d and not t],
                   "probabilities": {n: round(float(p), 4) for n, p in zip(label_names, row)}}

    def tune_thresholds(self, logits, targets, label_names, strategy="per_label"):
        """Store thresholds that maximise each label's F1 (``per_label``) or the micro-F1 of one shared
        threshold (``global``) on these (validation) logits; returns them as {name: threshold}."""
        probs = torch.sigmoid(logits.float()).numpy()
        targets = np.asarray(targets, dtype=int)
        if strategy == "global":
            best = best_global_threshold(probs, targets)
            thresholds = [best] * len(label_names)
        else:
            thresholds = [best_label_threshold(probs[:, index], targets[:, index]) for index in range(len(label_names))]
        self.threshold_strategy = strategy
        self.thresholds = {name: round(float(value), 6) for name, value in zip(label_names, thresholds)}
        return self.thresholds

    # ---- inference
    def comparable_outputs(self, outputs):
        """The ONNX parity gate compares the probabilities users see."""
        from common.inference import sigmoid  # inference imports this module
        return sigmoid(outputs)

    def decisions(self, outputs, threshold=None, label_names=None):
        probs = self.comparable_outputs(outputs)
        names = label_names or list(self.thresholds) or [str(i) for i in range(probs.shape[-1])]
        return probs >= self.threshold_array(names, threshold)

    def result(self, text, context, logits, label_names, temperature=1.0, top_k=None, threshold=None):
        """Every label at or above its threshold, with each label's probability and threshold."""
        probs = self.comparable_outputs(logits)
        thresholds = self.threshold_array(label_names, threshold)
        chosen = [index for index in range(len(label_names)) if probs[index] >= thresholds[index]]
        result = {"input": text}
        if context:
            result["context"] = context
        result.update({"problem_type": self.name, "labels": [label_names[i] for i in chosen], "label_ids": chosen,
                       "probabilities": {name: round(float(p), 6) for name, p in zip(label_names, probs)},
                       "thresholds": {name: round(float(t), 6) for name, t in zip(label_names, thresholds)}})
        if top_k:
            ranked = np.argsort(-probs, kind="stable")[:top_k]
            result["top_k"] = [{"label": label_names[i], "label_id": int(i), "probability": round(float(probs[i]), 6)}
                               for i in ranked]
        return result

    @staticmethod
    def decision_lines(result):
        return [f"predicted labels: {', '.join(result['labels']) or '(none above threshold)'}"]


def random_split(examples, val_ratio, seed):
    """(train, validation) at random, at least one record in each (scikit-learn)."""
    from sklearn.model_selection import train_test_split
    if len(examples) < 2:
        raise UserError("one record cannot be split into training and validation: add data or pass --val-path")
    val_size = min(max(1, math.ceil(val_ratio * len(examples))), len(examples) - 1)
    return train_test_split(examples, test_size=val_size, random_state=seed)


def best_label_threshold(probs, targets):
    """The threshold that maximises one label's F1, halfway between the lowest probability it keeps
    and the highest it drops (the same decisions on these examples, a margin either side); 0.5 when
    the examples are all one way (nothing to tune on)."""
    from sklearn.metrics import precision_recall_curve
    if targets.sum() in (0, len(targets)):
        return DEFAULT_THRESHOLD
    precision, recall, cuts = precision_recall_curve(targets, probs)
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
    cut = cuts[int(np.argmax(f1[:-1]))]  # the last (precision 1, recall 0) point has no threshold
    below = probs[probs < cut]
    return float((cut + below.max()) / 2) if len(below) else float(cut)


def best_global_threshold(probs, targets):
    """One threshold for every label that maximises micro-F1, among probability quantiles."""
    candidates = np.unique(np.quantile(probs, np.linspace(0, 1, GLOBAL_THRESHOLD_CANDIDATES)))
    positives = targets.sum()
    best, best_f1 = DEFAULT_THRESHOLD, -1.0
    for candidate in candidates:
        decisions = probs >= candidate
        true_positives = (decisions & (targets == 1)).sum()
        f1 = 2 * true_positives / max(decisions.sum() + positives, 1)
        if f1 > best_f1:
            best, best_f1 = float(candidate), f1
    return best


class Regression(SingleLabel):
    """A score per example: one output, MSE or Huber loss, optionally on standardized targets
    (``target_scaling`` in the toolkit; predictions are always given in the original scale)."""
    name = "regression"
    SCORE_NAME = "score"
    logged_metrics = ("loss", "rmse", "mae", "spearman")
    headline_metrics = ("mae", "rmse", "pearson", "spearman")

    def __init__(self, settings=None):
        settings = settings or {}
        self.scaling = settings.get("target_scaling")  # {"mean", "std"} or None
        self.loss_name = settings.get("regression_loss", "mse")
        self.huber_delta = settings.get("huber_delta", 1.0)

    def check_options(self, args):
        _refuse_foreign_flags(args, self.name)
        refused = {"--loss focal": _flag(args, "loss") == "focal",
                   f"--class-weights {_flag(args, 'class_weights')}": _flag(args, "class_weights") != "none",
                   "--sampler weighted": _flag(args, "sampler") == "weighted",
                   "--label-smoothing": _flag(args, "label_smoothing") > 0, "--labels": bool(args.labels)}
        _refuse(refused, "regression (a score per example, no classes)")

    def toolkit_settings(self):
        return {"problem_type": self.name, "target_scaling": self.scaling, "regression_loss": self.loss_name,
                "huber_delta": self.huber_delta}

    def num_outputs(self, label_set):
        return 1

    # ---- data
    def parse_label(self, where, raw_label):
        if raw_label is None or raw_label == "":
            raise data.RecordError(f"{where}: missing")
        return data.parse_number(where, raw_label)

    def build_label_set(self, examples, fixed_names, label_field):
        return data.LabelSet([self.SCORE_NAME])

    def resolve(self, label_set, examples, skip_invalid, label_field):
        for example in examples:
            example.label = float(example.raw_label)
        return examples

    def split_validation(self, examples, val_ratio, seed, label_set):
        return random_split(examples, val_ratio, seed)

    def check_coverage(self, train_examples, val_examples, label_set):
        if len({example.label for example in train_examples}) < 2:
            raise UserError("every training score is the same: there is nothing to learn")

    def target(self, label, num_labels):
        return float(label)

    def summarize_labels(self, examples, label_set):
        scores = np.array([e.label for e in examples], dtype=float)
        if not len(scores):
            return {"scores": {}}
        return {"scores": {"mean": round(float(scores.mean()), 4), "std": round(float(scores.std()), 4),
                           "min": float(scores.min()), "p50": float(np.median(scores)), "max": float(scores.max())}}

    # ---- training and evaluation
    def fit_training_data(self, train_examples, args):
        scaling = self.fit_scaling([example.label for example in train_examples], args.standardize_targets)
        if scaling:
            print(f"targets standardized: mean {scaling['mean']:.4f}, std {scaling['std']:.4f} (stored with the model)")

    def reference_metrics(self, logits, targets, label_names):
        return None

    def constant_baseline(self, train_targets, eval_targets, label_names):
        """MAE and RMSE of always predicting the training mean."""
        mean = float(np.mean(train_targets))
        metrics = regression_metrics(eval_targets, np.full(len(eval_targets), mean))
        return {"rule": f"the training mean ({mean:.4f})", "mae": metrics["mae"], "rmse": metrics["rmse"]}

    def format_metrics(self, results, split_name):
        line = ", ".join(f"{name} {results[split_name][name]:.4f}" for name in self.headline_metrics)
        baseline = results.get("constant_baseline")
        if baseline:
            line += f"; {baseline['rule']}: mae {baseline['mae']:.4f}, rmse {baseline['rmse']:.4f}"
        return line

    def error_rows(self, examples, logits, targets, label_names):
        """errors.jsonl: every record, largest absolute error first."""
        predictions = self.unscale(logits.float()[:, 0].numpy())
        rows = [{"where": example.locator, "text": example.text, "context": example.context,
                 "true_score": float(target), "predicted_score": round(float(predicted), 6),
                 "absolute_error": round(abs(float(predicted) - float(target)), 6)}
                for example, target, predicted in zip(examples, targets.numpy(), predictions)]
        return sorted(rows, key=lambda row: -row["absolute_error"])

    def fit_scaling(self, train_scores, standardize):
        """Keep the training scores' mean and standard deviation when standardizing (else none)."""
        scores = np.asarray(train_scores, dtype=float)
        self.scaling = {"mean": float(scores.mean()), "std": float(scores.std()) or 1.0} if standardize else None
        return self.scaling

    def scale(self, scores):
        """Original-scale scores -> what the model is trained to output."""
        return scores if self.scaling is None else (scores - self.scaling["mean"]) / self.scaling["std"]

    def unscale(self, outputs):
        """Model outputs -> scores in the original scale."""
        return outputs if self.scaling is None else outputs * self.scaling["std"] + self.scaling["mean"]

    def build_training_loss(self, args, train_targets, num_labels):
        return self.build_loss(args.regression_loss, args.huber_delta)

    def build_loss(self, loss_name="mse", huber_delta=1.0):
        self.loss_name, self.huber_delta = loss_name, huber_delta

        def loss_fn(outputs, scores):
            predicted, wanted = outputs.float().squeeze(-1), self.scale(scores.float())
            if loss_name == "huber":
                return F.huber_loss(predicted, wanted, delta=huber_delta)
            return F.mse_loss(predicted, wanted)
        return loss_fn

    def consistency(self, outputs_a, outputs_b):
        """R-Drop for a score: the squared difference of the two passes."""
        return F.mse_loss(outputs_a.float(), outputs_b.float())

    def evaluation_metrics(self, logits, targets, label_names, loss_fn=None):
        metrics = regression_metrics(targets.numpy(), self.unscale(logits.float()[:, 0].numpy()))
        metrics["loss"] = float((loss_fn or self.build_loss(self.loss_name, self.huber_delta))(logits, targets))
        return metrics

    # ---- inference
    def comparable_outputs(self, outputs):
        """The ONNX parity gate compares the scores users see (original scale)."""
        return self.unscale(np.asarray(outputs, dtype=np.float64))

    def decisions(self, outputs, threshold=None, label_names=None):
        return None  # a score has no discrete decision: the gate compares the scores themselves

    def result(self, text, context, logits, label_names, temperature=1.0, top_k=None, threshold=None):
        result = {"input": text}
        if context:
            result["context"] = context
        result.update({"problem_type": self.name, "score": round(float(self.comparable_outputs(logits)[0]), 6)})
        return result

    @staticmethod
    def decision_lines(result):
        return [f"score: {result['score']:.6g}"]


PROBLEM_TYPES = {"single_label": SingleLabel, "multi_label": MultiLabel, "regression": Regression,
                 "rerank": Rerank}


def of_result(result):
    """The problem type (class) of a prediction ``result``: single-label results name none."""
    return PROBLEM_TYPES[result.get("problem_type", "single_label")]


def from_toolkit(toolkit):
    """The problem type a model directory (or export) was trained for, with its stored settings."""
    toolkit = toolkit or {}
    return PROBLEM_TYPES[toolkit.get("problem_type") or "single_label"](toolkit)


def from_args(args):
    """The problem type a training run asks for (--problem-type), its options checked."""
    problem = PROBLEM_TYPES[args.problem_type]({"label_separator": getattr(args, "label_separator", ","),
                                                 "threshold_strategy": getattr(args, "threshold_strategy", "per_label")})
    problem.check_options(args)
    return problem


def resolve_problem_type(args, stored=None):
    """--problem-type, else the model's stored one (--eval-only), else single_label; checks the metric."""
    if stored and args.problem_type and args.problem_type != stored:
        raise UserError(f"--problem-type {args.problem_type}: {args.model_path} is a {stored} model")
    args.problem_type = stored or args.problem_type or "single_label"
    check_metric(args)
    return from_args(args)


def final_results(problem, results, evaluated, label_names, train_targets, args, tune, log=print):
    """After training (multi-label and regression): tune on validation, score every split, add the
    reference and the constant baseline, log the report; returns the reporting split's name.

    ``evaluated``: {"validation": (logits, targets)[, "test": (...)]} of the best model; ``tune``: fit
    the multi-label thresholds (not for --eval-only, which keeps the model's own). ``results`` gets
    ``<split>`` (merged over what is there), ``<split>_at_threshold_0.5`` and ``constant_baseline``.
    """
    fitted = problem.fit_validation_data(*evaluated["validation"], label_names, args) if tune else None
    if fitted:
        log(fitted)
    for split_name, (logits, targets) in evaluated.items():
        results[split_name] = {**results.get(split_name, {}), **problem.evaluation_metrics(logits, targets, label_names)}
        reference = problem.reference_metrics(logits, targets, label_names)
        if reference is not None:
            results[f"{split_name}_{reference[0]}"] = reference[1]
    report_split = "test" if "test" in evaluated else "validation"
    if train_targets is not None:
        results["constant_baseline"] = problem.constant_baseline(train_targets, evaluated[report_split][1].numpy(),
                                                                 label_names)
    log(f"\n{report_split}: " + problem.format_metrics(results, report_split))
    return report_split


def write_error_rows(path, rows):
    """errors.jsonl: one JSON object per row."""
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def check_metric(args):
    """--metric-for-best-model must be one of this problem type's metrics; unset, its first."""
    allowed = METRICS_BY_PROBLEM_TYPE[args.problem_type]
    if args.metric_for_best_model is None:
        args.metric_for_best_model = allowed[0]
    elif args.metric_for_best_model not in allowed:
        raise UserError(f"--metric-for-best-model {args.metric_for_best_model}: not a {args.problem_type} metric "
                        f"(choose from {', '.join(allowed)})")


# flags that belong to one problem type, with their defaults: set for another, they are refused
FOREIGN_FLAGS = {"threshold_strategy": ("multi_label", "per_label"), "label_separator": ("multi_label", ","),
                 "standardize_targets": ("regression", False), "regression_loss": ("regression", "mse"),
                 "huber_delta": ("regression", 1.0), "rerank_loss": ("rerank", "pointwise"),
                 "rerank_group_size": ("rerank", 8), "retriever": ("rerank", None), "rerank_top": ("rerank", 50)}


# the technique flags train_longdoc.py does not have, at the values that mean "off"
TECHNIQUE_DEFAULTS = {"loss": "ce", "class_weights": "none", "class_weights_beta": 0.999, "sampler": "random",
                      "label_smoothing": 0.0, "focal_gamma": 2.0}


def _flag(args, name):
    return getattr(args, name, TECHNIQUE_DEFAULTS[name])


def _refuse_foreign_flags(args, problem_type):
    for name, (owner, default) in FOREIGN_FLAGS.items():
        if owner != problem_type and getattr(args, name, default) != default:
            raise UserError(f"--{name.replace('_', '-')} is for --problem-type {owner}, not {problem_type}")


def _refuse(refused, what):
    for flag, is_set in refused.items():
        if is_set:
            raise UserError(f"{flag} does not apply to {what}; drop it")
