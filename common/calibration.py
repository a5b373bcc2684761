"""Confidence calibration: temperature scaling (Guo et al. 2017), ECE, NLL, reliability diagram.

A fine-tuned classifier is usually over-confident: it says 0.99 where it is right 80%
of the time. Dividing the logits by one temperature T, fitted on the validation set
by minimising the negative log-likelihood, fixes most of that without changing any
prediction (argmax is unchanged for T > 0).
"""
import numpy as np
import torch
import torch.nn.functional as F

MIN_TEMPERATURE, MAX_TEMPERATURE = 0.05, 20.0


def _as_tensor(values, dtype):
    """A CPU tensor of ``dtype`` from a tensor, array or list."""
    return torch.as_tensor(np.asarray(values) if not torch.is_tensor(values) else values).detach().cpu().to(dtype)


def negative_log_likelihood(logits, labels, temperature=1.0):
    """Mean cross-entropy of ``softmax(logits / temperature)``; logits (n, K), labels (n,)."""
    logits, labels = _as_tensor(logits, torch.float64), _as_tensor(labels, torch.long)
    return float(F.cross_entropy(logits / temperature, labels))


def fit_temperature(logits, labels, max_iterations=100):
    """The temperature minimising the NLL of ``logits / T`` on (logits, labels).

    Optimises log T with L-BFGS (so T stays positive), starting from T = 1, and clamps
    the result to [0.05, 20]. Returns 1.0 for an empty set.
    """
    logits, labels = _as_tensor(logits, torch.float64), _as_tensor(labels, torch.long)
    if len(labels) == 0:
        return 1.0
    log_temperature = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_temperature], lr=0.5, max_iter=max_iterations,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_temperature.exp(), labels)
        loss.backward()
        return loss
    optimizer.step(closure)
    temperature = float(log_temperature.detach().exp())
    if not np.isfinite(temperature):
        return 1.0
    return float(min(max(temperature, MIN_TEMPERATURE), MAX_TEMPERATURE))


def reliability_bins(probs, labels, n_bins=15):
    """Per confidence bin (equal width over (0, 1]): count, mean confidence, accuracy.

    Confidence is the top probability; a prediction is right when its argmax is the
    label. Returns a dict of numpy arrays ``count``, ``confidence``, ``accuracy`` and
    the bin ``edges`` (empty bins have confidence and accuracy 0).
    """
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    confidences, correct = probs.max(axis=1), (probs.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # bin i holds confidences in (edges[i], edges[i+1]]
    index = np.clip(np.searchsorted(edges, confidences, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(index, minlength=n_bins).astype(np.float64)
    safe = np.maximum(count, 1)
    return {"edges": edges, "count": count,
            "confidence": np.bincount(index, weights=confidences, minlength=n_bins) / safe,
            "accuracy": np.bincount(index, weights=correct, minlength=n_bins) / safe}


def expected_calibration_error(probs, labels, n_bins=15):
    """ECE: the count-weighted mean of |accuracy - confidence| over equal-width bins."""
    bins = reliability_bins(probs, labels, n_bins)
    total = bins["count"].sum()
    if total == 0:
        return 0.0
    return float((bins["count"] * np.abs(bins["accuracy"] - bins["confidence"])).sum() / total)


def calibration_report(logits, labels, n_bins=15):
    """Fit a temperature and report ECE and NLL before and after it.

    Keys: ``temperature``, ``ece_before``, ``ece_after``, ``nll_before``, ``nll_after``,
    ``n_bins``, ``num_examples``.
    """
    logits, labels = _as_tensor(logits, torch.float64), _as_tensor(labels, torch.long)
    temperature = fit_temperature(logits, labels)
    return {
        "temperature": temperature,
        "ece_before": expected_calibration_error(torch.softmax(logits, -1).numpy(), labels.numpy(), n_bins),
        "ece_after": expected_calibration_error(torch.softmax(logits / temperature, -1).numpy(), labels.numpy(),
                                                n_bins),
        "nll_before": negative_log_likelihood(logits, labels),
        "nll_after": negative_log_likelihood(logits, labels, temperature),
        "n_bins": n_bins,
        "num_examples": int(len(labels)),
    }


def write_reliability_diagram(path, probs, labels, n_bins=15, title=None):
    """A PNG: accuracy per confidence bin against the diagonal, with the ECE in the title
    and the share of examples per bin below. Uses matplotlib's Agg canvas (no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    bins = reliability_bins(probs, labels, n_bins)
    ece = expected_calibration_error(probs, labels, n_bins)
    width = 1.0 / n_bins
    centers = bins["edges"][:-1] + width / 2
    figure = Figure(figsize=(5, 6), dpi=100)
    FigureCanvasAgg(figure)
    top, bottom = figure.subplots(2, 1, gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    top.bar(centers, bins["accuracy"], width=width, edgecolor="black", label="accuracy")
    top.bar(centers, bins["confidence"] - bins["accuracy"], bottom=bins["accuracy"], width=width,
            color="tab:red", alpha=0.3, label="gap to confidence")
    top.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfect calibration")
    top.set_ylabel("accuracy")
    top.set_ylim(0, 1)
    top.legend(loc="upper left")
    top.set_title(f"{title + ': ' if title else ''}ECE {ece:.4f} ({n_bins} bins)")
    total = max(bins["count"].sum(), 1)
    bottom.bar(centers, bins["count"] / total, width=width, edgecolor="black", color="tab:gray")
    bottom.set_xlabel("confidence (top probability)")
    bottom.set_ylabel("share")
    bottom.set_xlim(0, 1)
    figure.tight_layout()
    figure.savefig(str(path), format="png")
    return path
