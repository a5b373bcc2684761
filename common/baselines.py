"""Cheap, strong baselines fitted on the same split as the model, to print beside its figures.

Classification: TF-IDF + logistic regression (one per label for multi-label, 0.5 thresholds);
scores: TF-IDF + ridge regression. Retrieval: TF-IDF cosine ranking. A user sees at once
whether fine-tuning beat the obvious alternative.

The analyzer follows the script: character 1-3-grams when the texts are mostly CJK
(Chinese and Japanese have no spaces between words, so "words" would be whole
clauses), word 1-2-grams otherwise. "Mostly" means at least ``CJK_SHARE_THRESHOLD``
(0.3) of the letters and digits are CJK: Chinese reviews with English brand names and
digits stay far above it, English text quoting a few CJK names stays far below it.

Every function returns a dict and never raises on awkward data: when no baseline can
be fitted (one training class, nothing to evaluate, no usable text) it returns
``{"name": ..., "skipped": "<reason>"}`` with no metric keys.
"""
import time
import warnings

import numpy as np

from common import ranking
from common.metrics import classification_metrics, multilabel_metrics, regression_metrics, selection_mode

CJK_SHARE_THRESHOLD = 0.3
MAX_FEATURES = 200_000  # bounds memory and the logistic regression's cost per iteration
MAX_TRAIN_EXAMPLES = 200_000  # a larger training set is subsampled (fixed seed) to bound runtime
MAX_CHARACTERS_SAMPLED = 1_000_000  # characters inspected to decide CJK or not
RANDOM_STATE = 0
# Han (with extension A and compatibility ideographs), kana, Hangul syllables and jamo
CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0xF900, 0xFAFF), (0x3040, 0x30FF), (0x31F0, 0x31FF),
              (0xAC00, 0xD7AF), (0x1100, 0x11FF), (0x3130, 0x318F), (0x20000, 0x2FA1F))


def is_cjk(character):
    """Whether one character is a Han ideograph, kana or Hangul."""
    code = ord(character)
    return any(low <= code <= high for low, high in CJK_RANGES)


def cjk_share(texts, max_characters=MAX_CHARACTERS_SAMPLED):
    """Share of CJK characters among the letters and digits of ``texts`` (0.0 when there are none).

    Reads texts in order until ``max_characters`` characters have been seen.
    """
    cjk = alphanumeric = seen = 0
    for text in texts:
        for character in (text or "")[:max(max_characters - seen, 0)]:
            if character.isalnum():
                alphanumeric += 1
                cjk += is_cjk(character)
        seen += len(text or "")
        if seen >= max_characters:
            break
    return cjk / alphanumeric if alphanumeric else 0.0


def build_vectorizer(texts):
    """A TfidfVectorizer for ``texts``, its baseline name stem and the CJK share that chose it."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    share = cjk_share(texts)
    common_options = dict(max_features=MAX_FEATURES, sublinear_tf=True, dtype=np.float32)
    if share >= CJK_SHARE_THRESHOLD:
        vectorizer = TfidfVectorizer(analyzer="char", ngram_range=(1, 3), **common_options)
        return vectorizer, "tfidf-char-1-3", share
    # one-character tokens count too: "5", "a", "I" carry signal in short texts
    vectorizer = TfidfVectorizer(analyzer="word", ngram_range=(1, 2), token_pattern=r"(?u)\b\w+\b",
                                 **common_options)
    return vectorizer, "tfidf-word-1-2", share


def _clean_texts(texts):
    """Texts as strings (None becomes the empty string)."""
    return ["" if text is None else str(text) for text in texts]


class BaselineSkipped(Exception):
    """No baseline can be fitted on this data; the message says why."""


class TextBaseline:
    """TF-IDF + logistic regression, kept as the numbers ``probabilities`` needs (common/fusion.py stores
    them without pickle)."""

    def __init__(self, vectorizer, coefficients, intercepts, classes, num_labels, name, fit_report=None):
        self.vectorizer = vectorizer
        self.coefficients = coefficients  # (1 for two classes, else classes, features)
        self.intercepts = intercepts  # (rows of coefficients,)
        self.classes = classes  # the label ids the regression was fitted on
        self.num_labels = num_labels
        self.name = name
        self.fit_report = fit_report or {}  # cjk_share, train_examples, features, converged

    @classmethod
    def fit(cls, train_texts, train_labels, num_labels):
        """Fitted on training texts and label ids (a set above MAX_TRAIN_EXAMPLES is subsampled); raises
        BaselineSkipped when the data cannot support a classifier (one class, no usable text)."""
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression
        train_texts, train_labels = _clean_texts(train_texts), np.asarray(train_labels, dtype=np.int64)
        vectorizer, stem, share = build_vectorizer(train_texts)
        class_count = len(np.unique(train_labels))
        if class_count < 2:
            raise BaselineSkipped(f"the training set has {class_count} class(es): a classifier needs two")
        if len(train_texts) > MAX_TRAIN_EXAMPLES:
            keep = np.sort(np.random.default_rng(RANDOM_STATE).choice(len(train_texts), MAX_TRAIN_EXAMPLES,
                                                                      replace=False))
            train_texts, train_labels = [train_texts[index] for index in keep], train_labels[keep]
            if len(np.unique(train_labels)) < 2:
                raise BaselineSkipped("the subsampled training set has one class")
        try:
            train_features = vectorizer.fit_transform(train_texts)  # (train, features), sparse
        except ValueError as error:  # every text empty, or only stop-characters: sklearn's "empty vocabulary"
            raise BaselineSkipped(f"no usable text in the training set ({error})") from None
        classifier = LogisticRegression(max_iter=2000, class_weight=None, random_state=RANDOM_STATE)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            classifier.fit(train_features, train_labels)
        converged = not any(issubclass(warning.category, ConvergenceWarning) for warning in caught)
        report = {"cjk_share": round(share, 4), "train_examples": len(train_texts),
                  "features": len(vectorizer.vocabulary_), "converged": converged}
        return cls(vectorizer, classifier.coef_.astype(np.float32), classifier.intercept_.astype(np.float32),
                   classifier.classes_.astype(np.int64), num_labels, stem + "+logreg", report)

    def probabilities(self, texts):
        """(texts, num_labels) probabilities as sklearn's predict_proba gives them; 0 for a label unseen in
        training."""
        features = self.vectorizer.transform(_clean_texts(texts))  # (texts, features), sparse
        scores = np.asarray(features @ self.coefficients.T, dtype=np.float64) + self.intercepts  # (texts, rows)
        if scores.shape[1] == 1:  # two classes: one logistic score, for the second
            positive = 1.0 / (1.0 + np.exp(-scores[:, 0]))
            fitted = np.stack([1.0 - positive, positive], axis=1)
        else:  # multinomial
            shifted = np.exp(scores - scores.max(axis=1, keepdims=True))
            fitted = shifted / shifted.sum(axis=1, keepdims=True)
        probabilities = np.zeros((len(texts), self.num_labels))
        probabilities[:, self.classes] = fitted
        return probabilities

    def evaluate(self, probabilities, eval_labels, label_names, started=None):
        """``classification_metrics`` of its ``probabilities`` of the evaluation texts plus name, the fit
        report and ``seconds`` since ``started`` (a perf_counter value; now when None)."""
        metrics = classification_metrics(np.asarray(eval_labels, dtype=np.int64), probabilities.argmax(axis=1),
                                         label_names, probs=probabilities)
        metrics.update(name=self.name, **self.fit_report,
                       seconds=round(time.perf_counter() - (started or time.perf_counter()), 2))
        return metrics


def text_classification_baseline(train_texts, train_labels, eval_texts, eval_labels, label_names):
    """TF-IDF + logistic regression fitted on the training texts, scored on the evaluation texts.

    Labels are class ids (0..len(label_names)-1); for inputs with a context, pass
    ``f"{context} {text}"``. Returns ``classification_metrics`` of the predictions (the
    keys the model's metrics have: accuracy, macro_f1, weighted_f1, per_class, ...) plus
    ``name`` ("tfidf-char-1-3+logreg" or "tfidf-word-1-2+logreg"), ``cjk_share``,
    ``train_examples``, ``features``, ``converged`` and ``seconds``; or
    ``{"name", "skipped"}`` when no baseline can be fitted.
    """
    started = time.perf_counter()

    def skipped(reason):  # named as a fitted baseline would be (fitting builds its own vectorizer)
        return {"name": build_vectorizer(_clean_texts(train_texts))[1] + "+logreg", "skipped": reason}
    if len(train_texts) != len(train_labels) or len(eval_texts) != len(eval_labels):
        return skipped("texts and labels differ in length")
    if len(eval_texts) == 0:
        return skipped("no evaluation examples")
    try:
        baseline = TextBaseline.fit(train_texts, train_labels, len(label_names))
    except BaselineSkipped as error:
        return skipped(str(error))
    return baseline.evaluate(baseline.probabilities(eval_texts), eval_labels, label_names, started)


def example_texts(examples):
    """The baselines' input of each example: its context (when it has one) before its text."""
    return [f"{e.context} {e.text}" if getattr(e, "context", None) else e.text for e in examples]


def example_baseline(train_examples, eval_examples, eval_labels, label_names):
    """text_classification_baseline on the trainers' examples."""
    return text_classification_baseline(example_texts(train_examples), [e.label for e in train_examples],
                                        example_texts(eval_examples), list(eval_labels), label_names)


def text_multilabel_baseline(train_texts, train_targets, eval_texts, eval_targets, label_names):
    """TF-IDF + one logistic regression per label (sklearn's OneVsRestClassifier), every threshold 0.5:
    ``multilabel_metrics`` keys plus ``name`` and ``seconds``; 0/1 targets are (examples, labels)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier

    def fit(features, targets):
        classifier = OneVsRestClassifier(LogisticRegression(max_iter=2000, random_state=RANDOM_STATE))
        with warnings.catch_warnings():  # a label constant in training is predicted as that constant: fine here
            warnings.simplefilter("ignore")
            return classifier.fit(features, np.asarray(targets, dtype=int))

    def score(classifier, features, targets):
        probs = classifier.predict_proba(features)  # (examples, labels)
        return multilabel_metrics(targets, probs >= 0.5, probs, label_names)
    return _fitted_text_baseline("logreg-per-label", train_texts, train_targets, eval_texts, eval_targets, fit, score)


def text_regression_baseline(train_texts, train_targets, eval_texts, eval_targets):
    """TF-IDF + ridge regression of the scores: ``regression_metrics`` keys plus ``name`` and ``seconds``."""
    from sklearn.linear_model import Ridge

    def fit(features, targets):
        return Ridge(alpha=1.0, random_state=RANDOM_STATE).fit(features, targets)

    def score(regressor, features, targets):
        return regression_metrics(targets, regressor.predict(features))
    return _fitted_text_baseline("ridge", train_texts, train_targets, eval_texts, eval_targets, fit, score)


def _fitted_text_baseline(model_name, train_texts, train_targets, eval_texts, eval_targets, fit, score):
    """Vectorize, ``fit(features, targets)``, ``score(model, features, targets)``; skipped when it cannot be fitted."""
    started = time.perf_counter()
    train_texts, eval_texts = _clean_texts(train_texts), _clean_texts(eval_texts)
    vectorizer, stem, share = build_vectorizer(train_texts)
    name = f"{stem}+{model_name}"
    if len(eval_texts) == 0:
        return {"name": name, "skipped": "no evaluation examples"}
    try:
        train_features = vectorizer.fit_transform(train_texts)  # (train, features), sparse
    except ValueError as error:  # sklearn's "empty vocabulary"
        return {"name": name, "skipped": f"no usable text in the training set ({error})"}
    fitted = fit(train_features, np.asarray(train_targets))
    metrics = score(fitted, vectorizer.transform(eval_texts), np.asarray(eval_targets))
    metrics.update(name=name, cjk_share=round(share, 4), train_examples=len(train_texts),
                   features=len(vectorizer.vocabulary_), seconds=round(time.perf_counter() - started, 2))
    return metrics


def add_problem_baseline(results, split_name, problem, train_examples, train_targets, eval_examples, eval_targets,
                         label_names, log=print):
    """``add_text_baseline`` for multi-label and regression models: ``results["baseline"]`` and the table."""
    train_texts, eval_texts = example_texts(train_examples), example_texts(eval_examples)
    if problem.name == "multi_label":
        results["baseline"] = text_multilabel_baseline(train_texts, train_targets, eval_texts, eval_targets,
                                                       label_names)
        keys = ["micro_f1", "macro_f1", "samples_f1"]
    else:
        results["baseline"] = text_regression_baseline(train_texts, train_targets, eval_texts, eval_targets)
        keys = ["mae", "rmse", "pearson", "spearman"]
    log(f"{split_name}: the model against a TF-IDF baseline on the same data\n" +
        format_comparison(results[split_name], results["baseline"], keys))



def score_pairs(queries, documents, relevances, fit_texts=()):
    """TF-IDF cosine of each (query, document) pair, grouped per query as ``evaluate_pairs`` does.

    ``queries``, ``documents`` and ``relevances`` are parallel (one entry per pair). The
    vectorizer is fitted on the distinct documents (the collection being searched, as a
    search engine computes its IDF; no relevance label is used) plus ``fit_texts``.
    Returns ``(scored, name, share)``: ``scored`` is a list of ``(relevances, scores)``
    per query in first-appearance order, the shape ``ranking.ranking_metrics`` takes.
    Raises ValueError when no document has usable text.
    """
    queries, documents = _clean_texts(queries), _clean_texts(documents)
    distinct_documents = list(dict.fromkeys(documents))
    distinct_queries = list(dict.fromkeys(queries))
    vectorizer, stem, share = build_vectorizer(distinct_queries + distinct_documents)
    vectorizer.fit(distinct_documents + _clean_texts(fit_texts))
    # TfidfVectorizer rows are L2-normalised, so a row-wise dot product is the cosine
    document_vectors = vectorizer.transform(distinct_documents)  # (documents, features)
    query_vectors = vectorizer.transform(distinct_queries)  # (queries, features)
    document_row = {text: row for row, text in enumerate(distinct_documents)}
    query_row = {text: row for row, text in enumerate(distinct_queries)}
    pair_queries = query_vectors[[query_row[query] for query in queries]]  # (pairs, features)
    pair_documents = document_vectors[[document_row[document] for document in documents]]  # (pairs, features)
    cosines = np.asarray(pair_queries.multiply(pair_documents).sum(axis=1)).ravel()  # (pairs,)
    groups = {}
    for query, rel, cosine in zip(queries, relevances, cosines):
        group_relevances, group_scores = groups.setdefault(query, ([], []))
        group_relevances.append(float(rel))
        group_scores.append(float(cosine))
    return list(groups.values()), stem + "-cosine", share


def retrieval_baseline(queries, documents, relevances, ks=ranking.DEFAULT_KS, threshold=0.0, fit_texts=()):
    """TF-IDF cosine ranking of the evaluation pairs, scored by ``ranking.ranking_metrics``.

    Call it with the pairs the model is evaluated on, e.g.
    ``retrieval_baseline([p.query for p in pairs], [p.document for p in pairs], [p.rel for p in pairs],
    args.k, args.relevance_threshold)``. Returns the same keys as the model's ranking
    metrics (ndcg@k, ndcg_binary@k, mrr@k, map@k, recall@k, queries,
    queries_without_relevant) plus ``name`` ("tfidf-char-1-3-cosine" or
    "tfidf-word-1-2-cosine") and ``cjk_share``; or ``{"name", "skipped"}``.
    """
    if not (len(queries) == len(documents) == len(relevances)):
        return {"name": "tfidf-cosine", "skipped": "queries, documents and relevances differ in length"}
    if len(queries) == 0:
        return {"name": "tfidf-cosine", "skipped": "no evaluation pairs"}
    try:
        scored, name, share = score_pairs(queries, documents, relevances, fit_texts)
    except ValueError as error:  # sklearn's "empty vocabulary": no document has usable text
        return {"name": "tfidf-cosine", "skipped": f"no usable text in the documents ({error})"}
    metrics = ranking.ranking_metrics(scored, ks, threshold)
    metrics.update(name=name, cjk_share=round(share, 4))
    return metrics


def format_comparison(model_metrics, baseline_metrics, keys):
    """A short printable table: one row per key with the model's value, the baseline's and the difference.

    Higher is better except for the error metrics (MAE, RMSE, loss: metrics.selection_mode); a last
    line names the keys where the baseline is ahead. A skipped (or None) baseline gives one line.
    """
    if not baseline_metrics or "skipped" in baseline_metrics:
        reason = (baseline_metrics or {}).get("skipped", "not computed")
        return f"baseline {(baseline_metrics or {}).get('name', '')}: skipped ({reason})".replace("  ", " ")
    name = baseline_metrics.get("name", "baseline")
    width = max([len("metric")] + [len(key) for key in keys])
    lines = [f"{'metric':<{width}}  {'model':>8}  {'baseline':>8}  {'diff':>8}   baseline = {name}"]
    behind = []
    for key in keys:
        model_value, baseline_value = model_metrics.get(key), baseline_metrics.get(key)
        cells = [f"{value:.4f}" if isinstance(value, (int, float)) else "-" for value in (model_value, baseline_value)]
        numeric = isinstance(model_value, (int, float)) and isinstance(baseline_value, (int, float))
        difference = f"{model_value - baseline_value:+.4f}" if numeric else "-"
        if numeric and (baseline_value < model_value if selection_mode(key) == "min" else baseline_value > model_value):
            behind.append(key)
        lines.append(f"{key:<{width}}  {cells[0]:>8}  {cells[1]:>8}  {difference:>8}")
    if behind:
        lines.append(f"the baseline beats the model on: {', '.join(behind)}")
    return "\n".join(lines)
