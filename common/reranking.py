"""Cross-encoder rerankers: ``train_classifier.py --problem-type rerank``.

A reranker is a classification model directory with ``toolkit["problem_type"] == "rerank"`` and
one logit: it reads ``[CLS] query [SEP] document [SEP]`` and scores the pair ``sigmoid(logit)``.
This module holds what is particular to it: the data (graded ``query/document/rel[/weight]`` pairs,
or ``query/pos/neg`` records), grouping per query, the pointwise and listwise losses, ranking
evaluation and retrieve-then-rerank (a bi-encoder's top N reordered by the reranker), and ``Rerank``,
the problem type (common/problem_types.py) the classifier's loop and the inference code ask.

Training examples are groups of pairs: a pointwise example is one pair, a listwise example is one
positive followed by its negatives. Labels are ``(group, 3)``: each member's relevance target, weight
and query id, so both losses and the per-query evaluation go through the classifier's loop unchanged.
"""
import random
import sys

import numpy as np
import torch
import torch.nn.functional as F

from common import data, ranking
from common.errors import UserError, short_repr
from common.pairs import load_pairs
from common.text import build_normalizer

EVALUATION_KS = (1, 3, 5, 10)
PREPROCESSING_PAIR = "query_document"  # toolkit preprocessing["context"] of a reranker
# the classifier's options that mean nothing to a reranker, at their defaults (set, they are refused)
CLASSIFICATION_ONLY_OPTIONS = {"labels": None, "num_labels": None, "group_field": None, "loss": "ce",
                               "class_weights": "none", "sampler": "random", "label_smoothing": 0.0,
                               "rdrop_alpha": 0.0}


def is_reranker(toolkit):
    """Whether a model directory's toolkit block describes a reranker."""
    return (toolkit or {}).get("problem_type") == "rerank"


class Rerank:
    """The reranker's problem type: one logit per (query, document) pair, trained pointwise or listwise,
    evaluated by ranking each query's documents, read as ``sigmoid(logit)``."""
    name = "rerank"
    parse_label = None
    logged_metrics = ("loss", "ndcg@10", "mrr@10")  # in every evaluation row of train_log.jsonl
    headline_metrics = ("ndcg@10", "mrr@10", "map@10", "recall@10")
    consistency = None  # R-Drop is refused

    def __init__(self, settings=None):
        self.settings = {}

    def check_options(self, args):
        """A reranker trains in train_classifier.py only, without the classifier's label options."""
        from common.problem_types import _refuse_foreign_flags
        if not hasattr(args, "rerank_loss"):
            raise UserError("--problem-type rerank is for train_classifier.py (a reranker reads query/document "
                            "pairs, not documents)")
        _refuse_foreign_flags(args, self.name)
        for name, default in CLASSIFICATION_ONLY_OPTIONS.items():
            if getattr(args, name, default) != default:
                raise UserError(f"--{name.replace('_', '-')} does not apply to --problem-type rerank")

    def toolkit_settings(self):
        return {"problem_type": self.name}

    def num_outputs(self, label_set):
        return 1

    def fit_training_data(self, train_examples, args):
        """Nothing to fit: targets are rel / max rel, set when the data is encoded."""

    def build_training_loss(self, args, train_targets, num_labels):
        return build_loss(args.rerank_loss)

    def evaluation_metrics(self, logits, targets, label_names=None, loss_fn=None):
        return evaluation_metrics(logits, targets)

    def comparable_outputs(self, outputs):
        """What the ONNX parity gate compares: the scores users see, sigmoid(logit)."""
        from common.inference import sigmoid  # inference imports this module
        return sigmoid(outputs)

    def decisions(self, outputs, threshold=None, label_names=None):
        return None  # a score, no label: the gate compares the scores themselves

    def result(self, text, context, logits, label_names=None, temperature=1.0, top_k=None, threshold=None):
        """A pair's score: ``text`` and ``context`` as the classifier's encoder gave them."""
        result = {"input": text, "score": round(float(self.comparable_outputs(logits)[0]), 6), "problem_type": self.name}
        if context:
            result["context"] = context
        return result


# ---------------------------------------------------------------- data

def load_rerank_pairs(path, skip_invalid=False, split=None, default_splits=("train",)):
    """A reranker data file as graded PairExamples, in record order: ``query/document/rel[/weight]`` pairs or
    ``query/pos/neg`` groups (each positive rel 1, each negative rel 0), read by the vector trainer's reader."""
    return load_pairs(path, skip_invalid, split=split, default_splits=default_splits)


def split_by_query(pairs, val_ratio, seed):
    """(train, validation) with whole queries on one side, so no validation query is seen in training."""
    queries = list(dict.fromkeys(pair.query for pair in pairs))
    random.Random(seed).shuffle(queries)
    val_count = max(1, round(len(queries) * val_ratio))
    if val_count >= len(queries):
        raise UserError(f"--data-path: {len(queries)} distinct queries are too few to hold out a validation "
                        "share; give --val-path")
    val_queries = set(queries[:val_count])
    return ([pair for pair in pairs if pair.query not in val_queries],
            [pair for pair in pairs if pair.query in val_queries])


def check_split(pairs, name, threshold=0.0):
    """A split must hold at least one query with a relevant document, or there is nothing to rank."""
    if not any(pair.rel > threshold for pair in pairs):
        raise UserError(f"the {name} data has no relevant pair (rel > {threshold}): nothing to rank")


def query_ids(pairs):
    """One integer per pair naming its query (pairs of the same query text share it)."""
    ids = {}
    return [ids.setdefault(pair.query, len(ids)) for pair in pairs]


def listwise_groups(pairs, group_size, seed, threshold=0.0):
    """[(positive index, [negative indices])]: one group per relevant pair of a query.

    A positive is a pair with its query's highest rel (above ``threshold``); its negatives are
    the query's pairs of lower rel, a sample of ``group_size - 1`` when there are more. A query
    with fewer fills the group with documents of other queries (taken as irrelevant). Drawn once
    with ``seed``, so a resumed run sees the same groups.
    """
    generator = random.Random(seed)
    by_query = {}
    for index, pair in enumerate(pairs):
        by_query.setdefault(pair.query, []).append(index)
    document_count = len({pair.document for pair in pairs})
    groups = []
    for query, indices in by_query.items():
        best = max(pairs[i].rel for i in indices)
        if best <= threshold:
            continue
        negatives = [i for i in indices if pairs[i].rel < best]
        own_documents = {pairs[i].document for i in indices}
        if len(negatives) < group_size - 1 and len(own_documents) == document_count:
            # the filling loop below would draw forever: every document of the file is this query's own
            raise UserError(f"{pairs[indices[0]].locator}: query {short_repr(query)} has {len(negatives)} negatives "
                            f"for a --rerank-group-size {group_size} group and no other query's document to fill "
                            "it; add queries or negatives, or lower --rerank-group-size")
        for positive in (i for i in indices if pairs[i].rel == best):
            chosen = generator.sample(negatives, min(len(negatives), group_size - 1))
            while len(chosen) < group_size - 1:
                other = generator.randrange(len(pairs))
                if pairs[other].document not in own_documents:
                    chosen.append(other)
            groups.append((positive, chosen))
    if not groups:
        raise UserError(f"--rerank-loss listwise: no query has a relevant pair (rel > {threshold})")
    return groups


# ---------------------------------------------------------------- encoding

def encode_pairs(tokenizer, queries, documents, max_length, truncation_side="right"):
    """``[CLS] query [SEP] document [SEP]`` ids with token types 0/1, as lists.

    When the pair is too long the document is cut (on ``truncation_side``); the query is cut too
    only when it would take more than half of the tokens left after the document's share.
    """
    backend = data.backend_tokenizer(tokenizer)
    query_encodings = data.measured_encodings(backend, list(queries), max_length)
    document_encodings = data.measured_encodings(backend, list(documents), max_length,
                                                 keep_end=truncation_side == "left")
    budget = max_length - tokenizer.num_special_tokens_to_add(pair=True)
    encoded = []
    for query, document in zip(query_encodings, document_encodings):
        query_budget = max(budget - len(document.ids), budget // 2)
        if len(query.ids) > query_budget:
            query.truncate(query_budget, direction="right")
        if len(document.ids) > budget - len(query.ids):
            document.truncate(budget - len(query.ids), direction=truncation_side)
        final = backend.post_process(query, document, add_special_tokens=True)
        encoded.append({"input_ids": final.ids, "token_type_ids": final.type_ids})
    return encoded


class RerankDataset(torch.utils.data.Dataset):
    """Groups of encoded pairs: ``{"members": [features], "labels": [[target, weight, query id]], "index"}``;
    ``lengths`` (the longest member) lets the length-grouped sampler batch similar groups."""

    def __init__(self, features):
        self.features = features
        self.lengths = [max(len(member["input_ids"]) for member in f["members"]) for f in features]

    def __len__(self):
        return len(self.features)

    def __getitem__(self, index):
        return self.features[index]


def build_rerank_dataset(tokenizer, pairs, max_length, truncation_side, normalize, rel_scale,
                         groups=None):
    """Tokenize ``pairs`` once; one example per pair (pointwise, evaluation) or per listwise group.

    Targets are ``rel / rel_scale`` (the training split's highest rel), so the top grade is 1.
    """
    encoded = encode_pairs(tokenizer, [normalize(p.query) for p in pairs], [normalize(p.document) for p in pairs],
                           max_length, truncation_side)
    labels = [[pair.rel / rel_scale, pair.weight, float(query)] for pair, query in zip(pairs, query_ids(pairs))]
    if groups is None:
        features = [{"members": [encoded[i]], "labels": [labels[i]], "index": i} for i in range(len(pairs))]
        return RerankDataset(features)
    features = []
    for index, (positive, negatives) in enumerate(groups):
        members = [positive, *negatives]
        features.append({"members": [encoded[i] for i in members], "labels": [labels[i] for i in members],
                         "index": index})
    return RerankDataset(features)


class RerankCollator:
    """Flatten a batch of groups into padded model inputs (batch * group, seq) with labels
    (batch, group, 3) and the examples' indices."""

    def __init__(self, pad_token_id):
        self.pad = data.PaddingCollator(pad_token_id)

    def __call__(self, features):
        batch = self.pad([member for feature in features for member in feature["members"]])
        batch["labels"] = torch.tensor([feature["labels"] for feature in features], dtype=torch.float32)
        batch["index"] = torch.tensor([feature["index"] for feature in features])
        return batch


def summarize(name, pairs, dataset, max_length):
    """One line of the dataset summary for a reranker split."""
    lengths = data.length_percentiles(dataset.lengths)
    queries = len(set(pair.query for pair in pairs))
    relevant = sum(pair.rel > 0 for pair in pairs)
    return (f"  {name}: {len(pairs)} pairs, {queries} queries, {relevant} with rel > 0, {len(dataset)} examples; "
            f"tokens p50={lengths['p50']} p90={lengths['p90']} max={lengths['max']} (max_length={max_length})")


# ---------------------------------------------------------------- losses

def pointwise_loss(logits, labels):
    """Weighted binary cross-entropy of each pair's logit against its graded target in [0, 1].
    logits: (pairs, 1); labels: (..., 3) of (target, weight, query id), one row per pair."""
    targets, weights = labels[..., 0].reshape(-1), labels[..., 1].reshape(-1)
    losses = F.binary_cross_entropy_with_logits(logits.float().reshape(-1), targets, reduction="none")
    return torch.sum(weights * losses) / weights.sum().clamp(min=1e-12)


def listwise_loss(logits, labels):
    """Softmax cross-entropy over each group (the positive first, then its negatives), weighted by
    the positive's weight. logits: (batch * group, 1); labels: (batch, group, 3)."""
    scores = logits.float().reshape(labels.shape[0], labels.shape[1])  # (batch, group)
    targets = torch.zeros(labels.shape[0], dtype=torch.long, device=scores.device)
    weights = labels[:, 0, 1]
    losses = F.cross_entropy(scores, targets, reduction="none")
    return torch.sum(weights * losses) / weights.sum().clamp(min=1e-12)


def build_loss(name):
    """The loss function of ``--rerank-loss`` (choices.RERANK_LOSSES)."""
    return {"pointwise": pointwise_loss, "listwise": listwise_loss}[name]


# ---------------------------------------------------------------- evaluation

def group_scores(relevances, scores, query_of_row):
    """[(relevances, scores)] per query, in order of first appearance, for ranking.ranking_metrics."""
    groups = {}
    for rel, score, query in zip(relevances, scores, query_of_row):
        rels, values = groups.setdefault(query, ([], []))
        rels.append(float(rel))
        values.append(float(score))
    return list(groups.values())


def evaluation_metrics(logits, labels, ks=EVALUATION_KS):
    """Ranking metrics of one evaluation split (pointwise examples in input order) plus its BCE loss.

    logits: (pairs, 1); labels: (pairs, 1, 3) of (target, weight, query id)."""
    query_of_row = labels[:, 0, 2].long().tolist()
    metrics = ranking.ranking_metrics(group_scores(labels[:, 0, 0].tolist(), logits[:, 0].tolist(), query_of_row), ks)
    metrics["loss"] = float(pointwise_loss(logits, labels))
    metrics["num_examples"] = int(len(logits))
    return metrics


def encode_for_model(loaded, queries, documents, max_length=None):
    """Encode (query, document) pairs with a loaded reranker's stored preprocessing (``max_length``
    overrides the stored one)."""
    preprocessing = loaded.preprocessing
    normalize = build_normalizer(preprocessing.get("normalize"))
    return encode_pairs(loaded.tokenizer, [normalize(q) for q in queries], [normalize(d) for d in documents],
                        max_length or preprocessing.get("max_length", 128), preprocessing.get("truncation_side", "right"))


def score_pairs(loaded, queries, documents, batch_size=32, progress=False):
    """Reranker scores sigmoid(logit) of (query, document) pairs, in input order (torch or ONNX)."""
    from common import inference
    if not len(queries):
        return np.zeros(0, dtype=np.float32)
    return inference.sigmoid(inference.rerank_logits(loaded, queries, documents, batch_size, progress=progress))


def score_groups(loaded, pairs, batch_size=32, ks=EVALUATION_KS):
    """(ranking metrics, logits) of a loaded reranker on a pair file's per-query candidate lists.

    Ranked by the logit: the order of the score sigmoid(logit), without the ties float rounding
    makes among saturated sigmoids; fusion with the retriever mixes logits for the same reason."""
    from common import inference
    logits = inference.rerank_logits(loaded, [p.query for p in pairs], [p.document for p in pairs], batch_size)
    return ranking.ranking_metrics(group_scores([p.rel for p in pairs], logits, [p.query for p in pairs]), ks), logits


# ---------------------------------------------------------------- retrieve-then-rerank and score fusion

FUSION_WEIGHTS = tuple(step / 10 for step in range(11))  # the retriever's shares tried on validation


def retrieve(retriever, pairs, pair_scores, batch_size=32):
    """Per query (in order of first appearance): ``{"query", "relevances", "similarities", "reranker"}``,
    arrays over the documents the file lists for it: their labels, the bi-encoder ``retriever``'s cosine
    to the query and the reranker's ``pair_scores`` (one per pair, from ``score_groups``).

    The candidates are the listed documents, every one labelled (a document listed for another query is
    not assumed irrelevant: inverse-cloze paragraphs contain their own queries)."""
    from common import inference
    by_query = {}
    for pair, score in zip(pairs, pair_scores):
        by_query.setdefault(pair.query, []).append((pair, float(score)))
    queries = list(by_query)
    documents = list(dict.fromkeys(pair.document for pair in pairs))
    document_row = {document: row for row, document in enumerate(documents)}
    query_vectors = inference.normalize_rows(inference.embed(retriever, queries, batch_size, side="query"))
    document_vectors = inference.normalize_rows(inference.embed(retriever, documents, batch_size, side="doc"))
    candidates = []
    for row, query in enumerate(queries):
        listed = by_query[query]
        similarities = document_vectors[[document_row[pair.document] for pair, _ in listed]] @ query_vectors[row]
        candidates.append({"query": query, "relevances": np.array([pair.rel for pair, _ in listed]),
                           "similarities": similarities.astype(np.float64),
                           "reranker": np.array([score for _, score in listed], dtype=np.float64)})
    return candidates


def min_max(values):
    """``values`` scaled to [0, 1] (all equal: all 0), so scores of two models can be mixed."""
    span = values.max() - values.min()
    return (values - values.min()) / span if span > 0 else np.zeros_like(values)


def fused_scores(similarities, reranker_scores, retriever_weight):
    """``w * min-max(cosine) + (1 - w) * min-max(reranker score)`` over one query's shortlist
    (linear interpolation of normalized scores, as BM25 or dense retrieval is mixed with a cross-encoder
    in the literature). Weight 0 is the reranker's order alone."""
    if retriever_weight == 0:
        return reranker_scores
    return retriever_weight * min_max(similarities) + (1 - retriever_weight) * min_max(reranker_scores)


def ranking_scores(candidate, top_n, retriever_weight=None):
    """Scores that rank one query's candidates: the retriever's order (``retriever_weight`` None), or its
    top ``top_n`` reordered by ``fused_scores`` above the rest, which keep the retriever's order (so
    Recall counts what the retriever's cut lost)."""
    similarities = candidate["similarities"]
    count = len(similarities)
    order = np.argsort(-similarities, kind="stable")
    scores = np.empty(count)
    scores[order] = np.arange(count, 0, -1)  # rank order as scores
    if retriever_weight is None:
        return scores
    shortlist = order[:min(top_n, count)]
    combined = fused_scores(similarities[shortlist], candidate["reranker"][shortlist], retriever_weight)
    reranked = shortlist[np.argsort(-combined, kind="stable")]
    scores[reranked] = count + np.arange(len(shortlist), 0, -1)  # above the rest, in the new order
    return scores


def rerank_report(candidates, top_n, ks=EVALUATION_KS, retriever_weight=None):
    """Metrics of the retriever's ranking ("before"), of its top ``top_n`` reordered by the reranker
    ("after") and, with ``retriever_weight``, by the fused score ("fused"); NDCG@10 and MRR@10 per query."""
    views = {"before": None, "after": 0.0, **({"fused": retriever_weight} if retriever_weight is not None else {})}
    ranked = {view: [(c["relevances"], ranking_scores(c, top_n, weight)) for c in candidates]
              for view, weight in views.items()}
    per_query = []
    for index, candidate in enumerate(candidates):
        row = {"query": candidate["query"], "candidates": len(candidate["relevances"])}
        for view in views:
            relevances, scores = ranked[view][index]
            row[f"ndcg@10_{view}"] = ranking.ndcg_at_k(relevances, scores, 10)
            row[f"mrr@10_{view}"] = ranking.reciprocal_rank_at_k(relevances, scores, 10)
        per_query.append(row)
    counts = [row["candidates"] for row in per_query]
    report = {"rerank_top": top_n, "candidates_per_query": float(np.mean(counts)),
              "queries_cut_by_retriever": sum(count > top_n for count in counts),
              **{view: ranking.ranking_metrics(ranked[view], ks) for view in views}, "per_query": per_query}
    if retriever_weight is not None:
        report["fusion_retriever_weight"] = retriever_weight
    return report


def retrieve_then_rerank(retriever, pairs, pair_scores, top_n, batch_size=32, ks=EVALUATION_KS,
                         retriever_weight=None):
    """``rerank_report`` of each query's listed documents ranked by the bi-encoder ``retriever``, its top
    ``top_n`` reordered by the reranker's ``pair_scores`` (and fused with ``retriever_weight``)."""
    return rerank_report(retrieve(retriever, pairs, pair_scores, batch_size), top_n, ks, retriever_weight)


def tune_fusion_weight(candidates, top_n, weights=FUSION_WEIGHTS):
    """(the retriever's share with the best mean NDCG@10 over ``candidates``, {share: NDCG@10}); on a tie
    the smallest share (the most reranker) wins. Meant for validation queries, never the test ones."""
    table = {}
    for weight in weights:
        ranked = [(c["relevances"], ranking_scores(c, top_n, weight)) for c in candidates]
        table[weight] = ranking.ranking_metrics(ranked, ks=(10,))["ndcg@10"]
    best = max(table.values())
    return min(weight for weight, value in table.items() if value == best), table


def report_rerank_change(report, log=print, stream=None):
    """A line on the NDCG@10 change (and one on the fused score's); a loud warning when the reranker's own
    order made the ranking worse."""
    before, after = report["before"]["ndcg@10"], report["after"]["ndcg@10"]
    worse = sum(1 for row in report["per_query"]
                if row["ndcg@10_before"] is not None and row["ndcg@10_after"] < row["ndcg@10_before"])
    line = (f"retrieve-then-rerank (the retriever's top {report['rerank_top']} of "
            f"{report['candidates_per_query']:.0f} listed documents per query, reranked): "
            f"NDCG@10 {before:.4f} -> {after:.4f} ({100 * (after - before):+.1f} points); "
            f"MRR@10 {report['before']['mrr@10']:.4f} -> {report['after']['mrr@10']:.4f}; "
            f"worse on {worse} of {len(report['per_query'])} queries")
    log(line)
    if "fused" in report:
        fused = report["fused"]["ndcg@10"]
        log(f"fused with the retriever's score (its share {report['fusion_retriever_weight']:g}, tuned on the "
            f"validation queries): NDCG@10 {before:.4f} -> {fused:.4f} ({100 * (fused - before):+.1f} points); "
            f"MRR@10 {report['before']['mrr@10']:.4f} -> {report['fused']['mrr@10']:.4f}")
    if after < before:
        banner = "!" * 78
        print(f"{banner}\nWARNING: RERANKING LOWERED NDCG@10 from {before:.4f} to {after:.4f}: the retriever "
              f"alone ranks better;\ndo not deploy this reranker in front of it (more data, epochs or the "
              f"listwise loss may help).\n{banner}", file=stream or sys.stderr)
    return after < before
