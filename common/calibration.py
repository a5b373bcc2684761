"""Confidence calibration: temperature scaling (Guo et al. 2017), ECE, NLL, reliability diagram.

A fine-tuned classifier is usually over-confident: it says 0.99 where it is right 80%
of the time. Dividing the logits by one temperature T, fitted on the validation set
by minimising the negative log-likelihood, fixes most of that without changing any
prediction (argmax is unchanged for T > 0).

A temperature fitted on too little data does harm: on a 12-record validation set the
NLL can fall all the way to T = 20, and every prediction then comes out near uniform.
So ``calibration_report`` applies the fitted temperature only when

- the validation set has at least ``MIN_EXAMPLES`` (100) examples, at least two classes,
  and at least ``MIN_EXAMPLES_PER_CLASS`` (20) of every class it contains (a class with
  fewer says nothing reliable about its own confidence), and
- the fit lands inside its bounds: an optimum at ``MIN_TEMPERATURE`` or
  ``MAX_TEMPERATURE`` (within 1%) means the NLL kept falling toward "always certain"
  or "always uniform", i.e. the set is separable or the model is near chance on it, and
- it lowers the validation NLL.

Otherwise the temperature stays 1.0 and the report says why.
"""
import numpy as np
import torch
import torch.nn.functional as F

MIN_TEMPERATURE, MAX_TEMPERATURE = 0.05, 20.0
MIN_EXAMPLES = 100
MIN_EXAMPLES_PER_CLASS = 20
BOUND_TOLERANCE = 0.01  # a fit within 1% of a bound counts as at the bound
TEMPERATURE_DIGITS = 4  # the applied temperature is stored and reported rounded to this


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
    return _clamp_temperature(_fit_unclamped_temperature(logits, labels, max_iterations))


def _fit_unclamped_temperature(logits, labels, max_iterations=100):
    """The L-BFGS optimum of T (possibly outside the bounds, or not finite); 1.0 for an empty set."""
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
    return float(log_temperature.detach().exp())


def _clamp_temperature(temperature):
    """``temperature`` clamped to [MIN_TEMPERATURE, MAX_TEMPERATURE]; 1.0 when not finite."""
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


def calibration_support(labels, min_examples=MIN_EXAMPLES, min_per_class=MIN_EXAMPLES_PER_CLASS):
    """Why ``labels`` cannot support a temperature fit, or None when they can."""
    labels = np.asarray(labels)
    counts = np.bincount(labels) if len(labels) else np.zeros(0, dtype=int)
    present = counts[counts > 0]
    if len(labels) < min_examples:
        return f"only {len(labels)} validation examples (need at least {min_examples})"
    if len(present) < 2:
        return "the validation set has a single class"
    if present.min() < min_per_class:
        sparse = int(np.flatnonzero((counts > 0) & (counts < min_per_class))[0])
        return (f"class id {sparse} has only {int(counts[sparse])} validation examples "
                f"(need at least {min_per_class} of every class present)")
    return None


def calibration_report(logits, labels, n_bins=15, min_examples=MIN_EXAMPLES,
                       min_per_class=MIN_EXAMPLES_PER_CLASS):
    """Fit a temperature, decide whether to apply it, and report ECE and NLL before and after.

    Keys: ``applied`` (bool), ``reason`` (str: why it was or was not applied),
    ``temperature`` (the temperature to use: the fit, rounded to 4 decimals, when
    applied, else 1.0), ``fitted_temperature`` (the optimizer's result clamped to
    [0.05, 20], rounded, whether applied or not), ``ece_before``, ``ece_after``,
    ``nll_before``, ``nll_after`` ("after" at ``temperature``, so equal to "before"
    when not applied; NLL is None for an empty set), ``n_bins``, ``num_examples``,
    ``min_class_count`` (fewest examples of a class present; 0 for an empty set).
    """
    logits, labels = _as_tensor(logits, torch.float64), _as_tensor(labels, torch.long)
    raw_temperature = _fit_unclamped_temperature(logits, labels)
    if len(labels) and np.isfinite(raw_temperature):
        # L-BFGS stops where the gradient vanishes, which on a separated set can be well inside the
        # bounds (NLL ~ 1e-9 at T = 0.15): when a bound is no worse than the fit, the optimum lies there
        nll_fit = negative_log_likelihood(logits, labels, _clamp_temperature(raw_temperature))
        for bound in (MIN_TEMPERATURE, MAX_TEMPERATURE):
            if negative_log_likelihood(logits, labels, bound) < nll_fit:
                raw_temperature = bound
                break
    fitted = round(_clamp_temperature(raw_temperature), TEMPERATURE_DIGITS)
    nll_before = negative_log_likelihood(logits, labels) if len(labels) else None
    reason = calibration_support(labels.numpy(), min_examples, min_per_class)
    if reason is None and not np.isfinite(raw_temperature):
        reason = "the fit did not converge to a finite temperature"
    elif reason is None and raw_temperature <= MIN_TEMPERATURE * (1 + BOUND_TOLERANCE):
        reason = (f"the fit reached its lower bound ({MIN_TEMPERATURE}): the validation set is separated "
                  f"with full confidence, so the fit would make every prediction certain")
    elif reason is None and raw_temperature >= MAX_TEMPERATURE * (1 - BOUND_TOLERANCE):
        reason = (f"the fit reached its upper bound ({MAX_TEMPERATURE}): confidence does not track "
                  f"correctness on the validation set, so the fit would make every prediction near uniform")
    elif reason is None and negative_log_likelihood(logits, labels, fitted) > nll_before:
        reason = f"temperature {fitted} does not lower the validation NLL"
    applied = reason is None
    temperature = fitted if applied else 1.0
    if applied:
        reason = f"fitted on {len(labels)} validation examples"
    counts = np.bincount(labels.numpy()) if len(labels) else np.zeros(0, dtype=int)
    return {
        "applied": applied,
        "reason": reason,
        "temperature": temperature,
        "fitted_temperature": fitted,
        "ece_before": expected_calibration_error(torch.softmax(logits, -1).numpy(), labels.numpy(), n_bins),
        "ece_after": expected_calibration_error(torch.softmax(logits / temperature, -1).numpy(), labels.numpy(),
                                                n_bins),
        "nll_before": nll_before,
        "nll_after": negative_log_likelihood(logits, labels, temperature) if len(labels) else None,
        "n_bins": n_bins,
        "num_examples": int(len(labels)),
        "min_class_count": int(counts[counts > 0].min()) if counts.any() else 0,
    }


def format_calibration(report):
    """One log line for a ``calibration_report``, values rounded."""
    def number(value, digits=4):
        return "-" if value is None else f"{value:.{digits}f}"
    figures = (f"ECE {number(report['ece_before'])} -> {number(report['ece_after'])}, "
               f"NLL {number(report['nll_before'])} -> {number(report['nll_after'])}")
    if report["applied"]:
        return f"calibration: temperature {report['temperature']:.3f} applied ({report['reason']}); {figures}"
    return (f"calibration: not applied, temperature stays 1.0 (the fit gave {report['fitted_temperature']:.3f}): "
            f"{report['reason']}; ECE {number(report['ece_before'])}, NLL {number(report['nll_before'])}")


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
