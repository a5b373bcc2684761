"""Ranking metrics against values computed by hand from their definitions."""
import argparse
import math

import numpy as np
import pytest
from sklearn.metrics import ndcg_score

from common import ranking

# one query, four documents; scores put them in the order 0, 1, 2, 3 (given shuffled)
RELEVANCES = [0.0, 1.0, 3.0, 2.0]
SCORES = [0.7, 0.6, 0.9, 0.8]  # ranked: rel 3, 2, 0, 1


def test_graded_ndcg_uses_gain_rel_and_log2_discount():
    dcg_3 = 3 / math.log2(2) + 2 / math.log2(3) + 0 / math.log2(4)
    ideal_3 = 3 / math.log2(2) + 2 / math.log2(3) + 1 / math.log2(4)
    assert ranking.ndcg_at_k(RELEVANCES, SCORES, 3) == pytest.approx(dcg_3 / ideal_3)
    dcg_4 = dcg_3 + 1 / math.log2(5)
    ideal_4 = ideal_3 + 0 / math.log2(5)  # the fourth ideal document has rel 0
    assert ranking.ndcg_at_k(RELEVANCES, SCORES, 10) == pytest.approx(dcg_4 / ideal_4)
    assert ranking.ndcg_at_k(RELEVANCES, SCORES, 1) == pytest.approx(1.0)


def test_binary_ndcg_counts_rel_above_threshold():
    gains = [1, 1, 0, 1]  # ranked order with rel > 0
    dcg_3 = gains[0] / math.log2(2) + gains[1] / math.log2(3)
    ideal_3 = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert ranking.ndcg_at_k(RELEVANCES, SCORES, 3, binary=True) == pytest.approx(dcg_3 / ideal_3)
    # with threshold 1.5 only rel 3 and 2 are relevant, and both are ranked first
    assert ranking.ndcg_at_k(RELEVANCES, SCORES, 3, binary=True, threshold=1.5) == pytest.approx(1.0)


def test_ndcg_matches_sklearn_and_handles_edge_cases():
    generator = np.random.default_rng(0)
    for _ in range(20):
        relevances = generator.integers(0, 4, size=8).astype(float)
        relevances[0] = 1.0
        scores = generator.random(8)
        expected = ndcg_score(relevances[None], scores[None], k=5)
        order = np.argsort(-scores)
        ideal = np.sort(relevances)[::-1]
        by_hand = ranking.dcg_at_k(relevances[order], 5) / ranking.dcg_at_k(ideal, 5)
        assert ranking.ndcg_at_k(relevances, scores, 5) == pytest.approx(expected) == pytest.approx(by_hand)
    assert ranking.ndcg_at_k([0.0, 0.0], [0.1, 0.2], 5) is None
    assert ranking.ndcg_at_k([0.5], [0.1], 5) == 1.0


def test_mrr_map_recall_by_hand():
    relevances, scores = [0, 0, 1, 0], [0.9, 0.8, 0.7, 0.6]
    assert ranking.reciprocal_rank_at_k(relevances, scores, 10) == pytest.approx(1 / 3)
    assert ranking.reciprocal_rank_at_k(relevances, scores, 2) == 0.0
    # ranked binary relevance 1, 1, 0, 1 (R = 3)
    assert ranking.average_precision_at_k(RELEVANCES, SCORES, 4) == pytest.approx((1 + 1 + 3 / 4) / 3)
    assert ranking.average_precision_at_k(RELEVANCES, SCORES, 2) == pytest.approx((1 + 1) / 2)
    assert ranking.average_precision_at_k([1, 0, 1, 1], [0.9, 0.8, 0.7, 0.6], 4) == pytest.approx(
        (1 + 2 / 3 + 3 / 4) / 3)
    assert ranking.recall_at_k([1, 0, 1, 1], [0.9, 0.8, 0.7, 0.6], 2) == pytest.approx(1 / 3)
    assert ranking.recall_at_k(RELEVANCES, SCORES, 3) == pytest.approx(2 / 3)
    assert ranking.reciprocal_rank_at_k([0, 0], [1, 2], 5) is None


def test_ranking_metrics_averages_and_skips_queries_without_relevant_documents():
    queries = [([0, 1], [0.9, 0.1]), ([1, 0], [0.9, 0.1]), ([0, 0], [0.5, 0.4])]
    metrics = ranking.ranking_metrics(queries, ks=(1, 2))
    assert metrics["queries"] == 2 and metrics["queries_without_relevant"] == 1
    assert metrics["mrr@1"] == pytest.approx(0.5)
    assert metrics["mrr@2"] == pytest.approx((1 / 2 + 1) / 2)
    assert metrics["recall@1"] == pytest.approx(0.5)
    assert metrics["ndcg@2"] == pytest.approx((1 / math.log2(3) + 1) / 2)
    assert set(metrics) >= {"ndcg_binary@1", "map@2"}


def test_parse_ks():
    assert ranking.parse_ks("1,3,5,10") == (1, 3, 5, 10)
    for bad in ("0,1", "a", ""):  # argparse shows an ArgumentTypeError's message (a ValueError's it hides)
        with pytest.raises(argparse.ArgumentTypeError, match="expected comma-separated positive integers"):
            ranking.parse_ks(bad)


def test_mean_scores_split_relevant_from_other_pairs_at_the_threshold():
    queries = [([1.0, 0.0, 0.2], [0.9, 0.1, 0.3]), ([0.5, 0.0], [0.7, -0.5])]
    assert ranking.mean_scores(queries, threshold=0.3) == pytest.approx(
        {"mean_score_relevant": 0.8, "mean_score_other": -0.1 / 3})
    assert ranking.mean_scores([([0.0], [0.4])]) == {"mean_score_relevant": None, "mean_score_other": 0.4}
