"""common/baselines.py: TF-IDF + logistic regression and TF-IDF cosine baselines."""
import random

import pytest

from common import baselines, ranking
from common.metrics import classification_metrics

LABELS = ["negative", "positive"]
POSITIVE_WORDS = ["great", "excellent", "lovely", "wonderful", "superb"]
NEGATIVE_WORDS = ["awful", "terrible", "broken", "horrible", "useless"]
FILLER = ["the", "room", "was", "and", "staff", "food", "really", "quite", "view", "bed"]
POSITIVE_CHINESE = ["很好", "满意", "推荐", "干净", "喜欢"]
NEGATIVE_CHINESE = ["很差", "失望", "退货", "脏乱", "难吃"]
FILLER_CHINESE = ["酒店", "房间", "服务", "早餐", "位置", "这个", "我们", "前台"]


def make_reviews(count, sentiment_words, filler, separator, seed):
    """``count`` (text, label) pairs per class; each text holds one word of its class's list."""
    generator = random.Random(seed)
    examples = []
    for label, words in enumerate(sentiment_words):
        for _ in range(count):
            tokens = generator.sample(filler, 2) + [generator.choice(words)]
            generator.shuffle(tokens)
            examples.append((separator.join(tokens), label))
    generator.shuffle(examples)
    return [text for text, _ in examples], [label for _, label in examples]


def test_word_baseline_learns_a_separable_english_set():
    train_texts, train_labels = make_reviews(100, [NEGATIVE_WORDS, POSITIVE_WORDS], FILLER, " ", seed=0)
    eval_texts, eval_labels = make_reviews(20, [NEGATIVE_WORDS, POSITIVE_WORDS], FILLER, " ", seed=1)
    result = baselines.text_classification_baseline(train_texts, train_labels, eval_texts, eval_labels, LABELS)
    assert result["name"] == "tfidf-word-1-2+logreg" and result["cjk_share"] == 0.0
    assert result["accuracy"] >= 0.95 and result["macro_f1"] >= 0.95
    assert result["converged"] and result["train_examples"] == 200
    # the same keys the model's metrics have, computed the same way
    assert set(classification_metrics([0, 1], [0, 1], LABELS, probs=[[1, 0], [0, 1]])) <= set(result)


def test_char_baseline_for_chinese_text():
    train_texts, train_labels = make_reviews(100, [NEGATIVE_CHINESE, POSITIVE_CHINESE], FILLER_CHINESE, "", seed=0)
    eval_texts, eval_labels = make_reviews(20, [NEGATIVE_CHINESE, POSITIVE_CHINESE], FILLER_CHINESE, "", seed=1)
    result = baselines.text_classification_baseline(train_texts, train_labels, eval_texts, eval_labels, LABELS)
    assert result["name"] == "tfidf-char-1-3+logreg" and result["cjk_share"] == 1.0
    assert result["accuracy"] >= 0.95


def test_cjk_share_decides_the_analyzer():
    assert baselines.cjk_share(["这个酒店很好 iPhone 12"]) == pytest.approx(6 / 14)
    assert baselines.cjk_share(["The hotel in 北京 was fine"]) < baselines.CJK_SHARE_THRESHOLD
    assert baselines.cjk_share(["", None, "!!!"]) == 0.0
    assert baselines.build_vectorizer(["ホテルはとても良かった"])[1] == "tfidf-char-1-3"
    assert baselines.build_vectorizer(["the hotel was fine"])[1] == "tfidf-word-1-2"


def test_one_training_class_is_skipped_with_a_reason():
    result = baselines.text_classification_baseline(["good", "fine"], [1, 1], ["bad"], [0], LABELS)
    assert set(result) == {"name", "skipped"} and "1 class" in result["skipped"]
    lone = baselines.text_classification_baseline(["good"], [1], ["bad"], [0], LABELS)
    assert "skipped" in lone
    nothing = baselines.text_classification_baseline(["good", "bad"], [1, 0], [], [], LABELS)
    assert "no evaluation examples" in nothing["skipped"]


def test_empty_strings_and_unseen_eval_labels_do_not_raise():
    names = ["a", "b", "c"]
    result = baselines.text_classification_baseline(
        ["good day", "", "bad day", None], [0, 0, 1, 1], ["", "good", "odd"], [0, 0, 2], names)
    assert result["num_examples"] == 3 and result["per_class"]["c"]["support"] == 1
    assert result["per_class"]["c"]["recall"] == 0.0  # never predicted: it was not in training
    empty = baselines.text_classification_baseline(["", ""], [0, 1], ["x"], [0], LABELS)
    assert "no usable text" in empty["skipped"]


def test_retrieval_baseline_ranks_the_exact_match_first():
    documents = ["the cat sat on the mat", "stock prices fell sharply today", "a recipe for tomato soup",
                 "football match ends in a draw"]
    queries, pair_documents, relevances = [], [], []
    for query, relevant in [("stock prices fell", 1), ("tomato soup recipe", 2), ("cat on the mat", 0)]:
        for index, document in enumerate(documents):
            queries.append(query)
            pair_documents.append(document)
            relevances.append(1.0 if index == relevant else 0.0)
    scored, name, _ = baselines.score_pairs(queries, pair_documents, relevances)
    assert name == "tfidf-word-1-2-cosine" and len(scored) == 3
    for group_relevances, group_scores in scored:  # the shape common/vector.py evaluate_pairs returns
        assert len(group_relevances) == len(group_scores) == 4
        assert group_relevances[max(range(4), key=group_scores.__getitem__)] == 1.0
    result = baselines.retrieval_baseline(queries, pair_documents, relevances, ks=(1, 3))
    assert result == {**ranking.ranking_metrics(scored, (1, 3), 0.0), "name": name, "cjk_share": 0.0}
    assert result["ndcg@1"] == result["mrr@3"] == result["recall@1"] == 1.0 and result["queries"] == 3


def test_retrieval_baseline_for_chinese_and_edge_cases():
    queries = ["酒店早餐", "酒店早餐", "房间很脏", "房间很脏"]
    documents = ["这家酒店的早餐很丰富", "机场离市区很远", "机场离市区很远", "房间很脏而且很吵"]
    result = baselines.retrieval_baseline(queries, documents, [1, 0, 0, 1], ks=(1,))
    assert result["name"] == "tfidf-char-1-3-cosine" and result["ndcg@1"] == 1.0
    assert "skipped" in baselines.retrieval_baseline([], [], [])
    assert "no usable text" in baselines.retrieval_baseline(["q"], [""], [1])["skipped"]


def test_format_comparison():
    model = {"accuracy": 0.7295, "macro_f1": 0.70}
    baseline = {"name": "tfidf-char-1-3+logreg", "accuracy": 0.828, "macro_f1": 0.6}
    table = baselines.format_comparison(model, baseline, ["accuracy", "macro_f1", "roc_auc"])
    lines = table.splitlines()
    assert "tfidf-char-1-3+logreg" in lines[0]
    assert lines[1].split() == ["accuracy", "0.7295", "0.8280", "-0.0985"]
    assert lines[2].split() == ["macro_f1", "0.7000", "0.6000", "+0.1000"]
    assert lines[3].split() == ["roc_auc", "-", "-", "-"]
    assert lines[4] == "the baseline beats the model on: accuracy"
    skipped = baselines.format_comparison(model, {"name": "x", "skipped": "one class"}, ["accuracy"])
    assert skipped == "baseline x: skipped (one class)"
    assert "skipped" in baselines.format_comparison(model, None, ["accuracy"])


def topic_texts(count, seed):
    """(texts, multi-hot targets): each text names a random subset of three topics by one word each."""
    generator, topics = random.Random(seed), ["music", "sports", "market"]
    texts, targets = [], []
    for _ in range(count):
        row = [generator.random() < 0.5 for _ in topics]
        words = [topic for topic, on in zip(topics, row) if on] + generator.sample(FILLER, 2)
        generator.shuffle(words)
        texts.append(" ".join(words))
        targets.append([float(on) for on in row])
    return texts, targets


def test_multilabel_baseline_finds_separable_labels():
    train_texts, train_targets = topic_texts(200, seed=1)
    eval_texts, eval_targets = topic_texts(60, seed=2)
    result = baselines.text_multilabel_baseline(train_texts, train_targets, eval_texts, eval_targets,
                                                ["music", "sports", "market"])
    assert result["name"] == "tfidf-word-1-2+logreg-per-label"
    assert result["micro_f1"] > 0.9 and set(result["per_label"]) == {"music", "sports", "market"}
    shuffled = random.Random(3).sample(train_targets, len(train_targets))  # labels unrelated to the words
    assert baselines.text_multilabel_baseline(train_texts, shuffled, eval_texts, eval_targets,
                                              ["music", "sports", "market"])["micro_f1"] < result["micro_f1"]


def test_regression_baseline_learns_scores_from_words():
    words = {"awful": 1, "poor": 2, "fine": 3, "good": 4, "superb": 5}
    generator = random.Random(4)
    picks = [generator.choice(list(words)) for _ in range(120)]
    texts = [f"{word} {' '.join(generator.sample(FILLER, 2))}" for word in picks]
    scores = [40.0 + 10 * words[word] for word in picks]
    result = baselines.text_regression_baseline(texts[:80], scores[:80], texts[80:], scores[80:])
    assert result["name"] == "tfidf-word-1-2+ridge"
    assert result["spearman"] > 0.9 and result["mae"] < 10


def test_format_comparison_knows_lower_errors_are_better():
    table = baselines.format_comparison({"mae": 2.0, "spearman": 0.9}, {"name": "b", "mae": 1.0, "spearman": 0.5},
                                        ["mae", "spearman"])
    assert table.splitlines()[-1] == "the baseline beats the model on: mae"
