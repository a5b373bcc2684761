"""Classification metrics (scikit-learn) and their printed report."""
import numpy as np

from common.choices import METRICS_BY_PROBLEM_TYPE

# sklearn is imported inside the functions that use it: importing it costs ~2 s, which every
# script's --help and every bad-flag error would otherwise wait for.

# --metric-for-best-model's choices: every problem type's (problem_types.check_metric narrows them)
ALL_SELECTABLE_METRICS = tuple(dict.fromkeys(name for names in METRICS_BY_PROBLEM_TYPE.values() for name in names))
MINIMISED_METRICS = ("loss", "hamming_loss", "mae", "rmse")


def selection_mode(metric_name):
    """'min' for the loss and the error metrics, 'max' for every other selectable metric (EarlyStopping's mode)."""
    return "min" if metric_name in MINIMISED_METRICS else "max"


def classification_metrics(y_true, y_pred, label_names, probs=None):
    """Accuracy, macro and weighted P/R/F1, per-class P/R/F1, confusion matrix; ROC-AUC and PR-AUC
    for binary tasks when probabilities are given."""
    import sklearn.metrics as skm
    labels = list(range(len(label_names)))
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    metrics = {"accuracy": float(skm.accuracy_score(y_true, y_pred)), "num_examples": int(len(y_true))}
    for average in ("macro", "weighted"):
        precision, recall, f1, _ = skm.precision_recall_fscore_support(
            y_true, y_pred, labels=labels, average=average, zero_division=0)
        metrics.update({f"{average}_precision": float(precision), f"{average}_recall": float(recall),
                        f"{average}_f1": float(f1)})
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        y_true, y_pred, labels=labels, average=None, zero_division=0)
    metrics["per_class"] = {name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                            for name, p, r, f, s in zip(label_names, precision, recall, f1, support)}
    metrics["confusion_matrix"] = skm.confusion_matrix(y_true, y_pred, labels=labels).tolist()
    if probs is not None and len(label_names) == 2 and len(set(y_true.tolist())) == 2:
        positive = np.asarray(probs)[:, 1]
        metrics["roc_auc"] = float(skm.roc_auc_score(y_true, positive))
        metrics["pr_auc"] = float(skm.average_precision_score(y_true, positive))
    return metrics


def format_report(y_true, y_pred, label_names, matrix):
    """scikit-learn's classification report followed by a labelled confusion matrix."""
    import sklearn.metrics as skm
    report = skm.classification_report(y_true, y_pred, labels=list(range(len(label_names))),
                                   target_names=label_names, digits=4, zero_division=0)
    width = max(8, max(len(name) for name in label_names) + 1)
    header = "true\\pred".ljust(width) + "".join(name[:width - 1].rjust(width) for name in label_names)
    rows = [name[:width - 1].ljust(width) + "".join(str(count).rjust(width) for count in row)
            for name, row in zip(label_names, matrix)]
    return report + "\nconfusion matrix:\n" + "\n".join([header] + rows)


def majority_baseline(y_train, y_eval, num_labels):
    """Accuracy and macro-F1 of always predicting the most frequent training class."""
    import sklearn.metrics as skm
    majority = int(np.bincount(np.asarray(y_train), minlength=num_labels).argmax())
    predictions = np.full(len(y_eval), majority)
    _, _, macro_f1, _ = skm.precision_recall_fscore_support(y_eval, predictions, labels=list(range(num_labels)),
                                                        average="macro", zero_division=0)
    return {"accuracy": float(skm.accuracy_score(y_eval, predictions)), "macro_f1": float(macro_f1)}


def multilabel_metrics(targets, decisions, probs, label_names):
    """Multi-label metrics from 0/1 ``targets`` and ``decisions`` (examples, labels) and the probabilities:
    micro/macro/weighted/samples P/R/F1, subset accuracy, Hamming loss, and per label P/R/F1, support,
    ROC-AUC and PR-AUC (None for a label whose examples are all one way)."""
    import sklearn.metrics as skm
    targets, decisions, probs = np.asarray(targets, int), np.asarray(decisions, int), np.asarray(probs)
    metrics = {"subset_accuracy": float(skm.accuracy_score(targets, decisions)),
               "hamming_loss": float(skm.hamming_loss(targets, decisions)), "num_examples": int(len(targets)),
               "labels_per_example": float(targets.sum(1).mean()) if len(targets) else 0.0,
               "predicted_labels_per_example": float(decisions.sum(1).mean()) if len(targets) else 0.0}
    for average in ("micro", "macro", "weighted", "samples"):
        # samples: a record with no labels, predicted with none, is right (F1 1), not undefined
        precision, recall, f1, _ = skm.precision_recall_fscore_support(targets, decisions, average=average,
                                                                       zero_division=1 if average == "samples" else 0)
        metrics.update({f"{average}_precision": float(precision), f"{average}_recall": float(recall),
                        f"{average}_f1": float(f1)})
    precision, recall, f1, support = skm.precision_recall_fscore_support(targets, decisions, average=None,
                                                                         zero_division=0)
    metrics["per_label"] = {}
    for index, name in enumerate(label_names):
        both_ways = 0 < targets[:, index].sum() < len(targets)
        metrics["per_label"][name] = {
            "precision": float(precision[index]), "recall": float(recall[index]), "f1": float(f1[index]),
            "support": int(support[index]),
            "roc_auc": float(skm.roc_auc_score(targets[:, index], probs[:, index])) if both_ways else None,
            "pr_auc": float(skm.average_precision_score(targets[:, index], probs[:, index])) if both_ways else None}
    return metrics


def regression_metrics(targets, predictions):
    """MAE, RMSE, R², Pearson and Spearman correlation of predicted scores (a constant side correlates 0:
    it ranks nothing, and early stopping needs a number)."""
    import scipy.stats
    import sklearn.metrics as skm
    targets, predictions = np.asarray(targets, float), np.asarray(predictions, float)
    varied = len(targets) > 1 and np.ptp(targets) > 0 and np.ptp(predictions) > 0
    return {"mae": float(skm.mean_absolute_error(targets, predictions)),
            "rmse": float(np.sqrt(skm.mean_squared_error(targets, predictions))),
            "r2": float(skm.r2_score(targets, predictions)) if len(targets) > 1 else None,
            "pearson": float(scipy.stats.pearsonr(targets, predictions)[0]) if varied else 0.0,
            "spearman": float(scipy.stats.spearmanr(targets, predictions)[0]) if varied else 0.0,
            "num_examples": int(len(targets))}
