"""Error-analysis outputs: confusion-matrix and training-curve PNGs, most-confused label pairs.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot, no display, no
global backend switch), so they work on servers and inside tests.
"""
import numpy as np


def _new_figure(width, height):
    """A Figure with its own Agg canvas (inches at 100 dpi)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def most_confused_pairs(matrix, label_names, top=5):
    """``[(true_name, predicted_name, count)]``: the largest off-diagonal cells, most first.

    Ties go to the earlier (true, predicted) pair; cells with count 0 are left out.
    """
    counts = np.asarray(matrix)
    pairs = [(int(counts[true, predicted]), true, predicted)
             for true in range(counts.shape[0]) for predicted in range(counts.shape[1])
             if true != predicted and counts[true, predicted] > 0]
    pairs.sort(key=lambda item: (-item[0], item[1], item[2]))
    return [(label_names[true], label_names[predicted], count) for count, true, predicted in pairs[:top]]


def write_confusion_matrix_png(path, matrix, label_names, title="confusion matrix"):
    """Counts in each cell, coloured by the share of the true class (row-normalised),
    so a rare class's errors are as visible as a frequent one's."""
    counts = np.asarray(matrix, dtype=np.int64)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = max(4.0, 0.6 * len(label_names) + 2.5)
    figure = _new_figure(size + 1, size)
    axes = figure.subplots()
    image = axes.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=axes, label="share of the true class")
    ticks = np.arange(len(label_names))
    axes.set_xticks(ticks, labels=label_names, rotation=45, ha="right")
    axes.set_yticks(ticks, labels=label_names)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title)
    for true in range(counts.shape[0]):
        for predicted in range(counts.shape[1]):
            axes.text(predicted, true, str(counts[true, predicted]), ha="center", va="center",
                      color="white" if shares[true, predicted] > 0.5 else "black")
    figure.tight_layout()
    figure.savefig(str(path), format="png")
    return path


def write_training_curves_png(path, log_rows):
    """Training loss (and evaluation loss) over steps, and the evaluation metrics over steps.

    ``log_rows`` are train_log.jsonl rows: training rows carry ``step`` and ``loss``,
    evaluation rows ``step``, ``eval_loss`` and ``eval_<metric>`` values; metrics whose
    values all lie in [0, 1] are drawn (``eval_num_examples`` and the like are not).
    """
    train = [(row["step"], row["loss"]) for row in log_rows if "loss" in row and "step" in row]
    evaluations = [row for row in log_rows if "eval_loss" in row and "step" in row]
    metric_names = validation_metric_names(evaluations)
    figure = _new_figure(10, 4)
    loss_axes, metric_axes = figure.subplots(1, 2)
    if train:
        loss_axes.plot(*zip(*train), label="training loss")
    if evaluations:
        loss_axes.plot([row["step"] for row in evaluations], [row["eval_loss"] for row in evaluations],
                       marker="o", label="validation loss")
    loss_axes.set_xlabel("step")
    loss_axes.set_ylabel("loss")
    loss_axes.set_title("loss")
    for name in metric_names:
        points = [(row["step"], row[name]) for row in evaluations if _is_number(row.get(name))]
        metric_axes.plot(*zip(*points), marker="o", label=name.removeprefix("eval_"))
    metric_axes.set_xlabel("step")
    metric_axes.set_title("validation metrics")
    for axes in (loss_axes, metric_axes):
        if axes.get_legend_handles_labels()[0]:
            axes.legend()
        else:
            axes.text(0.5, 0.5, "no data logged", ha="center", va="center", transform=axes.transAxes)
    figure.tight_layout()
    figure.savefig(str(path), format="png")
    return path


def validation_metric_names(log_rows):
    """The ``eval_*`` keys (not eval_loss) whose values are all scores in [0, 1]
    (accuracy, F1, AUC), so they share one axis; counts and timings are left out."""
    numeric = {key for row in log_rows for key, value in row.items()
               if key.startswith("eval_") and key != "eval_loss" and _is_number(value)}
    out_of_range = {key for row in log_rows for key, value in row.items()
                    if _is_number(value) and not 0.0 <= value <= 1.0}
    return sorted(numeric - out_of_range)


def _is_number(value):
    """True for ints and floats, not booleans."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)
