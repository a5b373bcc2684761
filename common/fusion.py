"""The fine-tuned classifier fused with its TF-IDF baseline (``--fuse-baseline``).

Character n-grams and a fine-tuned encoder make different mistakes: on Chinese reviews read by an
English encoder, a share of the baseline's probabilities lifts accuracy above both. The trainer
fits the baseline on the training split, picks the baseline's share on validation from
FUSION_WEIGHTS (0 when fusing does not help there), and stores the baseline beside the weights as
``baseline.safetensors``: the vocabulary and vectorizer settings in the header, the IDF and the
logistic regression as tensors. No pickle, so loading a model directory runs no code from it.

The fused probabilities are ``(1 - weight) * model + weight * baseline``; the model's come after
its temperature. The baseline reads the raw input (context, a space, then text), as it was fitted.
"""
import json
import time
from pathlib import Path

import numpy as np

from common import baselines, checkpoints, files
from common.calibration import calibration_support
from common.errors import UserError
from common.metrics import classification_metrics, selection_mode

BASELINE_FILE = "baseline.safetensors"  # beside model.safetensors, which loads strictly
ONNX_BASELINE_SUFFIX = ".baseline.safetensors"  # an export's copy: <name>.baseline.safetensors
FUSION_WEIGHTS = tuple(step / 10 for step in range(10))  # 0.0 .. 0.9: the fine-tuned model always keeps a share
FORMAT = "1"
# the TfidfVectorizer settings that decide its features; the rest are sklearn's defaults in every version
VECTORIZER_SETTINGS = ("analyzer", "ngram_range", "token_pattern", "lowercase", "sublinear_tf", "norm", "use_idf",
                       "smooth_idf", "strip_accents", "binary")


def baseline_bytes(baseline):
    """A baselines.TextBaseline as a safetensors file: tensors for the numbers, the header for the
    vocabulary and the vectorizer's settings."""
    from safetensors.numpy import save
    settings = {key: baseline.vectorizer.get_params()[key] for key in VECTORIZER_SETTINGS}
    vocabulary = {term: int(index) for term, index in baseline.vectorizer.vocabulary_.items()}
    metadata = {"format": FORMAT, "name": baseline.name, "vectorizer": json.dumps(settings),
                "vocabulary": json.dumps(vocabulary, ensure_ascii=False)}
    tensors = {"idf": baseline.vectorizer.idf_.astype(np.float32), "coefficients": baseline.coefficients,
               "intercepts": baseline.intercepts, "classes": baseline.classes}
    return save({name: np.ascontiguousarray(value) for name, value in tensors.items()}, metadata)


def load_baseline(path, num_labels):
    """The baseline stored at ``path`` for a model with ``num_labels`` labels; one line naming the file when
    it is missing, unreadable or does not fit the model."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(path), framework="numpy") as stored:
            metadata = stored.metadata() or {}
            tensors = {name: stored.get_tensor(name) for name in ("idf", "coefficients", "intercepts", "classes")}
        settings, vocabulary = json.loads(metadata["vectorizer"]), json.loads(metadata["vocabulary"])
        if not isinstance(settings, dict) or not isinstance(vocabulary, dict):
            raise ValueError("the header's vectorizer and vocabulary must be JSON objects")
    except (SafetensorError, OSError, KeyError, ValueError, TypeError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"{path}: unreadable (config.json's toolkit.baseline_fusion needs it): {reason}") from None
    check_stored_baseline(path, tensors, vocabulary, num_labels)
    try:
        vectorizer = rebuild_vectorizer(settings, vocabulary, tensors["idf"])
        vectorizer.transform(["check"])  # sklearn checks the settings' values only here
    except (TypeError, ValueError, KeyError) as error:  # settings this sklearn does not take
        raise UserError(f"{path}: damaged baseline (vectorizer settings: {str(error).splitlines()[0]})") from None
    return baselines.TextBaseline(vectorizer, tensors["coefficients"], tensors["intercepts"],
                                  tensors["classes"].astype(np.int64), num_labels, metadata.get("name", ""))


def check_stored_baseline(path, tensors, vocabulary, num_labels):
    """Shapes that agree with each other and with the model's labels, whole-number ids, finite numbers."""
    features, rows = len(vocabulary), tensors["coefficients"].shape
    classes = tensors["classes"]
    problems = [
        (tensors["idf"].shape != (features,) or len(rows) != 2 or rows[1] != features,
         f"{features} vocabulary terms, idf {tensors['idf'].shape}, coefficients {rows}"),
        # sklearn keeps one row for two classes, one per class for more
        (len(rows) != 2 or rows[0] == 0 or rows[0] == 2 or tensors["intercepts"].shape != rows[:1]
         or classes.shape != (max(rows[0], 2),), f"coefficients {rows}, intercepts {tensors['intercepts'].shape}, "
                                                 f"classes {classes.shape}"),
        (not np.issubdtype(classes.dtype, np.integer) or classes.size and (classes.min() < 0 or
                                                                          classes.max() >= num_labels)
         or len(set(classes.tolist())) != classes.size, f"class ids {classes.tolist()[:10]} for a model with "
                                                        f"{num_labels} labels"),
        (not all(np.isfinite(tensors[name]).all() for name in ("idf", "coefficients", "intercepts")),
         "NaN or infinite values"),
        (not all(type(index) is int for index in vocabulary.values())
         or sorted(vocabulary.values()) != list(range(features)), "vocabulary indices are not 0..n-1"),
    ]
    for failed, problem in problems:
        if failed:
            raise UserError(f"{path}: damaged baseline ({problem})")


def rebuild_vectorizer(settings, vocabulary, idf):
    """A fitted TfidfVectorizer from stored settings, vocabulary and IDF, without refitting."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    settings = {key: settings[key] for key in VECTORIZER_SETTINGS}  # nothing else: no callables by name
    settings["ngram_range"] = tuple(settings["ngram_range"])
    vectorizer = TfidfVectorizer(vocabulary=vocabulary, dtype=np.float32, **settings)
    vectorizer.idf_ = idf.astype(np.float64)  # the setter also fixes vocabulary_ from the vocabulary given
    return vectorizer


def baseline_inputs(texts, contexts=None):
    """What the baseline reads: the context before the text, as ``baselines.example_texts`` fits it."""
    contexts = contexts or [None] * len(texts)
    return [f"{context} {text}" if context else text for text, context in zip(texts, contexts)]


def fuse(model_probabilities, baseline_probabilities, weight):
    """(1 - weight) * model + weight * baseline, row by row."""
    return (1.0 - weight) * np.asarray(model_probabilities) + weight * np.asarray(baseline_probabilities)


def fused_metrics(model_probabilities, baseline_probabilities, weight, labels, label_names):
    """``classification_metrics`` of the fused probabilities against label ids."""
    fused = fuse(model_probabilities, baseline_probabilities, weight)
    return classification_metrics(np.asarray(labels), fused.argmax(axis=1), label_names, fused)


def tune_weight(model_probabilities, baseline_probabilities, labels, label_names, metric="macro_f1"):
    """The baseline's share in FUSION_WEIGHTS with the best validation ``metric`` (the smallest share of
    equals). Returns (weight, {weight: metric value})."""
    table, key = {}, metric
    for weight in FUSION_WEIGHTS:
        metrics = fused_metrics(model_probabilities, baseline_probabilities, weight, labels, label_names)
        key = metric if metric in metrics else "macro_f1"  # the loss is the model's alone
        table[weight] = metrics[key]
    sign = -1 if selection_mode(key) == "min" else 1
    best = max(table, key=lambda weight: (sign * table[weight], -weight))
    return best, table


def baseline_path_of_onnx(onnx_path):
    """Where an export keeps its copy of the baseline: beside the graph, named after it."""
    onnx_path = Path(onnx_path)
    return onnx_path.with_name(onnx_path.stem + ONNX_BASELINE_SUFFIX)


def load_for_model(toolkit, path, num_labels, where):
    """The baseline a model's toolkit block says it is fused with, checked against its labels; None when the
    model is not fused (the share stays in the toolkit block: ``LoadedModel.baseline_weight``)."""
    settings = toolkit.get("baseline_fusion")
    if not settings:
        return None
    if toolkit.get("problem_type", "single_label") != "single_label":
        raise UserError(f"{where}: field 'toolkit.baseline_fusion': only a single-label classifier is fused "
                        f"with a baseline, not a {toolkit.get('problem_type')} model")
    return load_baseline(path, num_labels)


def fuse_after_training(model_dir, toolkit, train, validation, evaluation, label_names, metric, log):
    """``--fuse-baseline`` at the end of a run: fit the baseline on the training split, tune its share on
    validation, store both with the model in ``model_dir`` (a share of 0 stores nothing) and score the
    fused model on the evaluation split.

    ``train`` is the training examples (label ids in ``label``); ``validation`` and ``evaluation`` are
    (examples, the model's probabilities after its temperature, label ids). Returns ``{"baseline": its
    metrics on the evaluation split, "fusion": {"weight", "baseline", "metric", "validation",
    "evaluation"}}``, or only a skipped baseline when none can be fitted.
    """
    started = time.perf_counter()
    try:
        baseline = baselines.TextBaseline.fit(baselines.example_texts(train), [e.label for e in train],
                                              len(label_names))
    except baselines.BaselineSkipped as skipped:
        log(f"--fuse-baseline: no baseline can be fitted ({skipped}); the model is stored alone")
        return {"baseline": {"name": "tfidf+logreg", "skipped": str(skipped)}}
    val_examples, val_probabilities, val_labels = validation
    eval_examples, eval_probabilities, eval_labels = evaluation
    eval_baseline = baseline.probabilities(baselines.example_texts(eval_examples))
    baseline_metrics = baseline.evaluate(eval_baseline, eval_labels, label_names, started)
    # the share is a choice among ten made on validation: the same support a temperature fit needs
    unsupported = calibration_support(val_labels)
    if unsupported:
        log(f"--fuse-baseline: not applied, the model is stored alone: {unsupported}")
        return {"baseline": baseline_metrics, "fusion": {"weight": 0.0, "skipped": unsupported}}
    weight, table = tune_weight(val_probabilities, baseline.probabilities(baselines.example_texts(val_examples)),
                                val_labels, label_names, metric)
    report = {"weight": weight, "baseline": baseline.name, "metric": metric,
              "validation": {f"{share:g}": round(value, 6) for share, value in table.items()},
              "evaluation": fused_metrics(eval_probabilities, eval_baseline, weight, eval_labels, label_names)}
    store(model_dir, toolkit, baseline, weight)
    log(f"--fuse-baseline: validation {metric} by the baseline's share: " +
        ", ".join(f"{share:g}: {value:.4f}" for share, value in table.items()) +
        (f"; stored {weight:g} with the model" if weight else "; 0 is best, so the model is stored alone"))
    return {"baseline": baseline_metrics, "fusion": report}


def store(model_dir, toolkit, baseline, weight):
    """Write the baseline beside the weights and its share into config.json (checksums refreshed last)."""
    toolkit.pop("baseline_fusion", None)
    if weight > 0:
        files.write_output_file(Path(model_dir) / BASELINE_FILE, baseline_bytes(baseline), "--output-dir")
        toolkit["baseline_fusion"] = {"weight": weight, "baseline": baseline.name}
    checkpoints.rewrite_toolkit(model_dir, toolkit)


def evaluate_stored(model_dir, toolkit, evaluation, label_names):
    """The stored baseline and share applied to ``evaluation`` (examples, the model's probabilities, label
    ids): ``{"weight", "baseline", "evaluation"}``, or None for a model that is not fused."""
    model_dir = Path(model_dir)
    baseline = load_for_model(toolkit, model_dir / BASELINE_FILE, len(label_names), model_dir / "config.json")
    if baseline is None:
        return None
    examples, probabilities, labels = evaluation
    weight = toolkit["baseline_fusion"]["weight"]
    return {"weight": weight, "baseline": baseline.name, "evaluation": fused_metrics(
        probabilities, baseline.probabilities(baselines.example_texts(examples)), weight, labels, label_names)}


def format_fused(split_name, fusion_report, model_metrics, baseline_metrics=None, keys=("accuracy", "macro_f1")):
    """One line: the fused model's figures beside the model's (and the baseline's, when given)."""
    fused = fusion_report["evaluation"]
    cells = [f"{key} {fused[key]:.4f} (model {model_metrics[key]:.4f}" +
             (f", baseline {baseline_metrics[key]:.4f})" if baseline_metrics else ")")
             for key in keys if key in fused and key in model_metrics and key in (baseline_metrics or fused)]
    return f"{split_name}, fused with {fusion_report['baseline']} at share {fusion_report['weight']:g}: " + \
        "; ".join(cells)


def with_model_probabilities(split, toolkit):
    """(examples, logits, label ids) -> (examples, the model's probabilities after its stored temperature, label
    ids), as inference computes them."""
    from common.inference import softmax, stored_temperature  # inference imports this module
    examples, logits, labels = split
    return examples, softmax(np.asarray(logits), stored_temperature(toolkit)), labels


def report_baseline(args, model_dir, toolkit, results, split_name, train, validation, evaluation, label_names, log):
    """The trainers' last step for a single-label model: the TF-IDF baseline beside the model's figures on
    ``split_name`` (``--baseline tfidf``), and with ``--fuse-baseline`` the two fused and stored.

    ``train`` is the training examples (None under --eval-only: then a fusion stored with the model is
    scored); ``validation`` and ``evaluation`` are (examples, the model's logits, label ids)."""
    if train is None:  # --eval-only: the fusion stored with the model, if it has one
        stored = evaluate_stored(model_dir, toolkit, with_model_probabilities(evaluation, toolkit), label_names)
        if stored:
            results["fusion"] = stored
            log(format_fused(split_name, stored, results[split_name]))
        return
    if args.fuse_baseline:
        results.update(fuse_after_training(model_dir, toolkit, train, with_model_probabilities(validation, toolkit),
                                           with_model_probabilities(evaluation, toolkit), label_names,
                                           args.metric_for_best_model, log))
    elif args.baseline != "none":
        results["baseline"] = baselines.example_baseline(train, evaluation[0], evaluation[2], label_names)
    if "baseline" not in results:
        return
    log(f"{split_name}: the model against a TF-IDF baseline on the same data\n" + baselines.format_comparison(
        results[split_name], results["baseline"], ["accuracy", "macro_f1", "weighted_f1"]))
    if "evaluation" in results.get("fusion", {}):
        if split_name == "validation":
            results["fusion"]["on_tuning_split"] = True
        log(format_fused(split_name, results["fusion"], results[split_name], results["baseline"]) +
            (" (on the validation set its share was tuned on)" if split_name == "validation" else ""))


def fused_headline(results):
    """--eval-only's printed figures of a model fused with its baseline: fused_accuracy, fused_macro_f1."""
    fused = results.get("fusion", {}).get("evaluation", {})
    return {f"fused_{key}": fused[key] for key in ("accuracy", "macro_f1") if key in fused}
