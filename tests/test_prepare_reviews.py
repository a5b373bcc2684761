"""bench/prepare_reviews.py's unlabeled text: never a text of any split, even one filed under both labels."""
from bench import prepare_reviews


def test_unlabeled_texts_leave_out_every_split_text():
    corpus = {"positive": [f"好评{index}" for index in range(30)] + ["两边都有的一句"],
              "negative": [f"差评{index}" for index in range(30)] + ["两边都有的一句"]}
    splits = prepare_reviews.sample_splits(corpus, {"train": 10, "val": 4, "test": 6}, 0.5, seed=13)
    split_texts = {record["text"] for records in splits.values() for record in records}

    unlabeled = prepare_reviews.leftover_texts(corpus, splits, limit=1000, seed=13)

    assert not split_texts & set(unlabeled)
    assert len(unlabeled) == len(set(unlabeled))  # the text in both files comes once, if at all
    assert set(unlabeled) | split_texts == set(corpus["positive"]) | set(corpus["negative"])
    assert len(prepare_reviews.leftover_texts(corpus, splits, limit=5, seed=13)) == 5
