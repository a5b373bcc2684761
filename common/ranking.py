"""Ranking metrics for retrieval evaluation: NDCG (graded and binary), MRR, MAP and Recall at k.

Every per-query function takes the query's candidate documents as two parallel
sequences, ``relevances`` (the labelled rel of each document) and ``scores`` (the
model's similarity), and ranks by score, highest first (ties keep input order).

Definitions (rank r counts from 1; ``rel_r`` is the relevance at rank r):
  DCG@k  = sum_{r<=k} gain(rel_r) / log2(r + 1)
  NDCG@k = DCG@k / DCG@k of the ideal order (documents sorted by relevance)
  graded NDCG: gain = rel (linear gain, as sklearn's ``ndcg_score``)
  binary NDCG: gain = 1 if rel > threshold else 0 (threshold 0 by default)
  MRR@k    = 1 / rank of the first relevant document within the top k, else 0
  AP@k     = (1 / min(R, k)) * sum_{r<=k} precision@r * relevant_r, R = relevant documents
  Recall@k = relevant documents in the top k / R
MRR, MAP and Recall use binary relevance (rel > threshold). A query with no relevant
document has no defined NDCG, MRR, AP or Recall: ``ranking_metrics`` leaves it out and
counts it.
"""
import argparse

import numpy as np

DEFAULT_KS = (1, 3, 5, 10)


def ranked_relevances(relevances, scores):
    """Relevances reordered by descending score (stable: ties keep input order)."""
    relevances = np.asarray(relevances, dtype=float)
    order = np.argsort(-np.asarray(scores, dtype=float), kind="stable")
    return relevances[order]


def dcg_at_k(gains_in_rank_order, k):
    """Discounted cumulative gain of the first k gains: sum gain_r / log2(r + 1)."""
    gains = np.asarray(gains_in_rank_order, dtype=float)[:k]
    discounts = np.log2(np.arange(2, len(gains) + 2))
    return float(np.sum(gains / discounts))


def ndcg_at_k(relevances, scores, k, binary=False, threshold=0.0):
    """NDCG@k of one query: graded gain = rel, or binary gain = (rel > threshold).

    Uses sklearn's ``ndcg_score`` (which averages over tied scores) when there are at
    least two documents; returns None when no document has a positive gain.
    """
    gains = np.asarray(relevances, dtype=float)
    if binary:
        gains = (gains > threshold).astype(float)
    if gains.max(initial=0.0) <= 0:
        return None
    if len(gains) == 1:  # sklearn refuses a single document; its NDCG is 1 by definition
        return 1.0
    from sklearn.metrics import ndcg_score  # imported here: ~2 s that --help should not wait for
    return float(ndcg_score(gains[None, :], np.asarray(scores, dtype=float)[None, :], k=k))


def reciprocal_rank_at_k(relevances, scores, k, threshold=0.0):
    """1 / rank of the first relevant document in the top k (0 if none); None without relevant documents."""
    relevant = ranked_relevances(relevances, scores) > threshold
    if not relevant.any():
        return None
    hits = np.flatnonzero(relevant[:k])
    return 1.0 / (hits[0] + 1) if len(hits) else 0.0


def average_precision_at_k(relevances, scores, k, threshold=0.0):
    """AP@k = sum over relevant ranks r <= k of precision@r, divided by min(R, k)."""
    relevant = ranked_relevances(relevances, scores) > threshold
    total_relevant = int(relevant.sum())
    if total_relevant == 0:
        return None
    top = relevant[:k]
    precision_at_rank = np.cumsum(top) / np.arange(1, len(top) + 1)
    return float(np.sum(precision_at_rank * top) / min(total_relevant, k))


def recall_at_k(relevances, scores, k, threshold=0.0):
    """Share of the relevant documents that appear in the top k; None without relevant documents."""
    relevant = ranked_relevances(relevances, scores) > threshold
    total_relevant = int(relevant.sum())
    if total_relevant == 0:
        return None
    return float(relevant[:k].sum() / total_relevant)


def mean_scores(queries, threshold=0.0):
    """``{"mean_score_relevant", "mean_score_other"}``: where a model's scores sit for pairs with rel above
    ``threshold`` and for the rest (None for an empty side). A tuned model's cosines often all move, which
    changes any score threshold a user relies on without changing the ranking."""
    relevant, other = [], []
    for relevances, scores in queries:
        for rel, score in zip(relevances, scores):
            (relevant if rel > threshold else other).append(score)
    return {"mean_score_relevant": float(np.mean(relevant)) if relevant else None,
            "mean_score_other": float(np.mean(other)) if other else None}


def ranking_metrics(queries, ks=DEFAULT_KS, threshold=0.0):
    """Mean metrics over queries; ``queries`` is a list of (relevances, scores) pairs.

    Returns ``{"ndcg@k", "ndcg_binary@k", "mrr@k", "map@k", "recall@k"}`` for each k,
    plus ``queries`` (evaluated) and ``queries_without_relevant`` (left out).
    """
    metric_functions = {
        "ndcg": lambda rel, score, k: ndcg_at_k(rel, score, k),
        "ndcg_binary": lambda rel, score, k: ndcg_at_k(rel, score, k, binary=True, threshold=threshold),
        "mrr": lambda rel, score, k: reciprocal_rank_at_k(rel, score, k, threshold),
        "map": lambda rel, score, k: average_precision_at_k(rel, score, k, threshold),
        "recall": lambda rel, score, k: recall_at_k(rel, score, k, threshold),
    }
    usable = [(rel, score) for rel, score in queries if np.max(np.asarray(rel, dtype=float)) > threshold]
    results = {}
    for name, function in metric_functions.items():
        for k in ks:
            values = [function(rel, score, k) for rel, score in usable]
            values = [value for value in values if value is not None]
            results[f"{name}@{k}"] = float(np.mean(values)) if values else 0.0
    results["queries"] = len(usable)
    results["queries_without_relevant"] = len(queries) - len(usable)
    return results


def parse_ks(value):
    """``--k 1,3,5,10`` -> (1, 3, 5, 10); each a positive integer.

    An ArgumentTypeError, not a ValueError: argparse shows its message, where for a ValueError it
    says only "invalid parse_ks value".
    """
    expected = f"expected comma-separated positive integers (like 1,3,10), got {value!r}"
    try:
        ks = tuple(int(part) for part in str(value).split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(expected) from None
    if not ks or min(ks) < 1:
        raise argparse.ArgumentTypeError(expected)
    return ks
