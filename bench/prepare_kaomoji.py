"""Build a real multi-label set from the kaomoji-dataset package (PyPI, data CC BY 4.0).

kaomoji-dataset 1.0.6 ships 82,109 kaomoji (text emoticons such as "(╥﹏╥)") annotated with
emotion, intent and subject keyword lists. Each list's first keyword names its concept
("sad", "greeting", "heart"...); a kaomoji carries up to three of them at once (a waving
happy face: happy + greeting), or none. This script fetches the wheel with pip (PyPI only),
drops repeated kaomoji, keeps the --labels most frequent concepts and writes disjoint random
train/val/test JSONL of {"text": kaomoji, "label": [concepts]}. The input is the emoticon
alone, never its names or keywords (which spell the labels out).

    python bench/prepare_kaomoji.py --output-dir data/kaomoji --train 2000 --val 500 --test 1000
"""
import argparse
import collections
import gzip
import json
import random
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "kaomoji-dataset==1.0.6"
ANNOTATIONS = ("emotion", "intent", "subject")


def fetch_entries():
    """Every entry of the package's data file (the wheel is downloaded by pip into a temp dir)."""
    with tempfile.TemporaryDirectory() as download_dir:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", download_dir, PACKAGE],
                       check=True)
        wheel = next(Path(download_dir).glob("kaomoji_dataset-*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            raw = gzip.decompress(archive.read("kaomoji_dataset/data/kaomoji.jsonl.gz")).decode("utf-8")
    return [json.loads(line) for line in raw.splitlines() if line.strip()]


def concepts(entry):
    """The first keyword of each non-empty annotation list."""
    return sorted({entry[name][0] for name in ANNOTATIONS if entry.get(name)})


def build_records(entries, num_labels):
    unique = list({entry["text"]: entry for entry in entries if entry["text"].strip()}.values())
    counts = collections.Counter(label for entry in unique for label in concepts(entry))
    kept = {label for label, _ in counts.most_common(num_labels)}
    return [{"text": entry["text"], "label": [label for label in concepts(entry) if label in kept]}
            for entry in unique]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--val", type=int, default=500)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--labels", type=int, default=12, help="keep this many most frequent concepts")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    records = build_records(fetch_entries(), args.labels)
    sample = random.Random(args.seed).sample(records, args.train + args.val + args.test)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    bounds = {"train": (0, args.train), "val": (args.train, args.train + args.val),
              "test": (args.train + args.val, len(sample))}
    for split, (start, end) in bounds.items():
        with open(output_dir / f"{split}.jsonl", "w", encoding="utf-8") as handle:
            for record in sample[start:end]:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    labels = collections.Counter(label for record in sample[:args.train] for label in record["label"])
    print(f"{len(records)} distinct kaomoji; wrote {args.train}/{args.val}/{args.test} to {output_dir}; "
          f"training label counts: {dict(labels.most_common())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
