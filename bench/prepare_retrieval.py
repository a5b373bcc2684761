"""Build an inverse-cloze retrieval set from the Python documentation that ships with Python.

Corpus: ``pydoc_data.topics`` (the standard library's copy of the Python language
reference and library topics that ``help()`` shows; English prose, ~80 topics). Each prose
paragraph of at least --min-sentences sentences gives inverse-cloze pairs (Lee et al., 2019):
the query is one sentence, its relevant document is the rest of the paragraph. Graded labels:
  rel 1.0  the paragraph the sentence was taken from (with the sentence removed)
  rel 0.2  another paragraph of the same help topic (related, not the answer)
  rel 0.0  a paragraph of another topic
Topics are split between train, validation and test, so no test paragraph is seen in training.
Each test/validation query gets a candidate list of 1 + --same-topic + --negatives documents.

    python bench/prepare_retrieval.py --output-dir data/retrieval
writes train.jsonl, valid.jsonl, test.jsonl ({"query", "document", "rel", "weight"}) and
corpus.jsonl ({"id", "text"}: every paragraph, for --corpus / POST /search).
"""
import argparse
import json
import random
import re
import sys
from pathlib import Path

SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"*(])")
RELATED_REL = 0.2


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", "--output_dir", default="data/retrieval", help="where the JSONL files go")
    parser.add_argument("--seed", type=int, default=13, help="random seed (topic split, sampling)")
    parser.add_argument("--min-sentences", "--min_sentences", type=int, default=3,
                        help="paragraphs with fewer sentences are skipped")
    parser.add_argument("--train-queries-per-paragraph", "--train_queries_per_paragraph", type=int, default=2,
                        help="sentences used as queries per training paragraph")
    parser.add_argument("--train-negatives", "--train_negatives", type=int, default=2,
                        help="rel-0 documents per training query")
    parser.add_argument("--same-topic", "--same_topic", type=int, default=3,
                        help="rel-0.2 documents (same topic) per query")
    parser.add_argument("--negatives", type=int, default=16, help="rel-0 candidates per validation/test query")
    parser.add_argument("--split", default="0.6,0.15,0.25", help="train,validation,test shares of the topics")
    return parser


def read_paragraphs(min_sentences):
    """[(topic, [sentences])] of the prose paragraphs of pydoc_data.topics (code and tables skipped)."""
    from pydoc_data.topics import topics
    paragraphs = []
    for topic in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[topic]):
            lines = block.strip().splitlines()
            if not lines or any(line.startswith("   ") or set(line.strip()) <= set("=-+| ") for line in lines):
                continue  # indented code, grammar rules or a table
            text = " ".join(line.strip() for line in lines)
            sentences = [sentence.strip() for sentence in SENTENCE_END.split(text) if sentence.strip()]
            if len(sentences) >= min_sentences and len(text) >= 150:
                paragraphs.append((topic, sentences))
    return paragraphs


def split_topics(paragraphs, shares, generator):
    topics = sorted({topic for topic, _ in paragraphs})
    generator.shuffle(topics)
    train_end = round(shares[0] * len(topics))
    val_end = train_end + round(shares[1] * len(topics))
    return {"train": set(topics[:train_end]), "valid": set(topics[train_end:val_end]), "test": set(topics[val_end:])}


def query_and_document(sentences, index):
    """The inverse cloze task: one sentence is the query, the others are the document."""
    return sentences[index], " ".join(sentences[:index] + sentences[index + 1:])


def make_pairs(paragraphs, topics, queries_per_paragraph, same_topic, negatives, generator):
    """Pairs of one split: per query its document (1.0), same-topic paragraphs (0.2), others (0.0)."""
    indices = [i for i, (topic, _) in enumerate(paragraphs) if topic in topics]
    by_topic = {}
    for index in indices:
        by_topic.setdefault(paragraphs[index][0], []).append(index)
    full_text = {index: " ".join(paragraphs[index][1]) for index in indices}
    pairs = []
    for index in indices:
        topic, sentences = paragraphs[index]
        for position in generator.sample(range(len(sentences)), min(queries_per_paragraph, len(sentences))):
            query, document = query_and_document(sentences, position)
            pairs.append({"query": query, "document": document, "rel": 1.0, "weight": 1.0})
            related = [other for other in by_topic[topic] if other != index]
            for other in generator.sample(related, min(same_topic, len(related))):
                pairs.append({"query": query, "document": full_text[other], "rel": RELATED_REL, "weight": 1.0})
            unrelated = [other for other in indices if paragraphs[other][0] != topic]
            for other in generator.sample(unrelated, min(negatives, len(unrelated))):
                pairs.append({"query": query, "document": full_text[other], "rel": 0.0, "weight": 1.0})
    return pairs


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv=None):
    args = build_parser().parse_args(argv)
    generator = random.Random(args.seed)
    shares = [float(share) for share in args.split.split(",")]
    paragraphs = read_paragraphs(args.min_sentences)
    topics = split_topics(paragraphs, shares, generator)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    settings = {"train": (args.train_queries_per_paragraph, 1, args.train_negatives),
                "valid": (1, args.same_topic, args.negatives), "test": (1, args.same_topic, args.negatives)}
    for split, (queries, same_topic, negatives) in settings.items():
        pairs = make_pairs(paragraphs, topics[split], queries, same_topic, negatives, generator)
        write_jsonl(output_dir / f"{split}.jsonl", pairs)
        print(f"{split}: {len(topics[split])} topics, {len({p['query'] for p in pairs})} queries, {len(pairs)} pairs")
    corpus = [{"id": f"{topic}-{index}", "text": " ".join(sentences)} for index, (topic, sentences) in
              enumerate(paragraphs)]
    write_jsonl(output_dir / "corpus.jsonl", corpus)
    print(f"corpus: {len(corpus)} paragraphs from pydoc_data.topics (Python {sys.version.split()[0]}) "
          f"-> {output_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
