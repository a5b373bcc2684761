"""Classification metrics (scikit-learn) and their printed report."""
import numpy as np

# sklearn is imported inside the functions that use it: importing it costs ~2 s, which every
# script's --help and every bad-flag error would otherwise wait for.

# validation metrics that can pick the best model (--metric-for-best-model); "loss" is minimised
SELECTABLE_METRICS = ("macro_f1", "accuracy", "weighted_f1", "loss", "macro_precision", "macro_recall",
                      "weighted_precision", "weighted_recall")
LOGGED_METRICS = ("loss", "accuracy", "macro_f1")  # in every evaluation row of the classification trainers
# a reranker's (train_classifier.py --problem-type rerank): ranking metrics of ranking.py
RERANK_SELECTABLE_METRICS = ("ndcg@10", "mrr@10", "map@10", "recall@10")
RERANK_LOGGED_METRICS = ("loss", "ndcg@10", "mrr@10")


def selection_mode(metric_name):
    """'min' for the loss, 'max' for every other selectable metric (EarlyStopping's mode)."""
    return "min" if metric_name == "loss" else "max"


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
