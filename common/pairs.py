"""Query/document pair data of the vector trainer, read and checked like every data file, tokenized
once, and collated into batches. Two record formats:

  graded pairs  ``{"query", "document", "rel", "weight"}`` (rel in [0, 1], weight >= 0, default 1)
  query groups  FlagEmbedding's ``{"query", "pos": [...], "neg": [...]}`` with optional
                ``pos_scores``/``neg_scores`` (one number per passage) and ``prompt`` (an instruction
                put before this query)

In CSV/TSV files a list field is a JSON array in its cell (``"[""a passage"", ""another""]"``).
"""
import json
import random
from dataclasses import dataclass

import torch

from common import data
from common.errors import UserError
from common.text import build_normalizer


@dataclass
class PairExample:
    """One labelled (query, document) pair and where it came from (``prompt``: its query group's own
    instruction, which replaces the stored --query-instruction)."""
    query: str
    document: str
    rel: float
    weight: float
    locator: str
    prompt: str = None


def parse_pair(record, rel_default=None):
    """Validate a {"query", "document", "rel", "weight"} record: rel in [0, 1], weight >= 0 (default 1)."""
    query = data.require_text(record, "query")
    document = data.require_text(record, "document")
    rel = data.require_number(record, "rel", default=rel_default, low=0.0, high=1.0)
    weight = data.require_number(record, "weight", default=1.0, low=0.0)
    return PairExample(query, document, float(rel), float(weight), record.where())


def load_pairs(path, skip_invalid=False, rel_default=None, split=None, default_splits=("train",)):
    """Read and validate a pair file (JSON, JSONL, CSV/TSV or a save_to_disk directory) as graded pairs.

    Query-group records become pairs too (a positive rel 1.0, a negative rel 0.0), so every loss and
    the ranking evaluation read either format. The list's ``record_format`` says which it was
    ("pairs" or "groups"); ``groups`` holds the QueryGroups of a query-group file.
    """
    record_format, parsed = read_either_format(path, skip_invalid, split, default_splits, rel_default)
    if record_format == "pairs":
        pairs = parsed
    else:
        pairs = data.ExampleList(skipped=parsed.skipped)
        for group in parsed:
            pairs.extend(PairExample(group.query, document, rel, 1.0, group.locator, group.prompt) for document, rel
                         in [*((p, 1.0) for p in group.positives), *((n, 0.0) for n in group.negatives)])
        pairs.groups = parsed
    pairs.record_format = record_format
    if not pairs:
        raise UserError(f"{path}: no valid records")
    return pairs


def read_either_format(path, skip_invalid, split, default_splits, rel_default):
    """("groups", QueryGroups) or ("pairs", PairExamples): the format is the first record's."""
    records = data.read_records(path, split=split, skip_invalid=skip_invalid, default_splits=default_splits)
    if is_group_record(records[0]):
        return "groups", data.parse_each(records, parse_query_group, skip_invalid)
    return "pairs", data.parse_each(records, lambda record: parse_pair(record, rel_default), skip_invalid)


# ---------------------------------------------------------------- query groups (FlagEmbedding's format)

@dataclass
class QueryGroup:
    """One query with its positive and negative passages (``prompt``: this query's own instruction)."""
    query: str
    positives: list
    negatives: list
    locator: str
    pos_scores: list = None
    neg_scores: list = None
    prompt: str = None


def is_group_record(record):
    """A query-group record has a "pos" field; a graded pair has "document"."""
    return "pos" in record.fields and "document" not in record.fields


def parse_query_group(record):
    """Validate a {"query", "pos", "neg", "pos_scores", "neg_scores", "prompt"} record: at least one
    positive, every passage a non-empty string, scores one finite number per passage."""
    query = data.require_text(record, "query")
    positives = require_text_list(record, "pos", allow_empty_list=False)
    negatives = require_text_list(record, "neg", allow_empty_list=True) if record.fields.get("neg") not in (None, "") \
        else []
    pos_scores = require_scores(record, "pos_scores", len(positives))
    neg_scores = require_scores(record, "neg_scores", len(negatives))
    prompt = record.fields.get("prompt")
    prompt = None if prompt in (None, "") else data.check_string(record, "prompt", prompt)
    return QueryGroup(query, positives, negatives, record.where(), pos_scores, neg_scores, prompt)


def require_list(record, name):
    """A list field; in CSV/TSV (where every cell is text) a JSON array in the cell."""
    value = record.fields.get(name)
    if value is None:
        raise data.RecordError(f"{record.where(name)}: missing")
    if isinstance(value, str) and record.source.lower().endswith((".csv", ".tsv")):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise data.RecordError(f"{record.where(name)}: expected a JSON array in the cell, "
                                   f"got {value[:40]!r}") from None
    if not isinstance(value, (list, tuple)):
        raise data.RecordError(f"{record.where(name)}: expected a list, got {type(value).__name__}")
    return list(value)


def require_text_list(record, name, allow_empty_list):
    """A list of non-empty strings; the first bad item is named by its index."""
    values = require_list(record, name)
    if not values and not allow_empty_list:
        raise data.RecordError(f"{record.where(name)}: empty list (a query needs at least one positive)")
    for index, value in enumerate(values):
        if not isinstance(value, str):
            raise data.RecordError(f"{record.where(f'{name}[{index}]')}: expected a string, "
                                   f"got {type(value).__name__}")
        data.check_string(record, f"{name}[{index}]", value)
        if not value.strip():
            raise data.RecordError(f"{record.where(f'{name}[{index}]')}: empty text")
    return values


def require_scores(record, name, count):
    """None, or ``count`` finite numbers (one per passage of the matching list)."""
    if record.fields.get(name) in (None, ""):
        return None
    values = require_list(record, name)
    if len(values) != count:
        raise data.RecordError(f"{record.where(name)}: {len(values)} scores for {count} passages")
    scores = []
    for index, value in enumerate(values):
        item = data.Record(record.source, record.locator, {f"{name}[{index}]": value})
        scores.append(float(data.require_number(item, f"{name}[{index}]")))
    return scores


def pairs_to_groups(pairs, relevance_threshold=0.0):
    """Graded pairs grouped by query (first-seen order): rel > threshold positive, the rest negative.

    A query without a positive pair is left out (it has nothing to rank first)."""
    by_query = {}
    for pair in pairs:
        group = by_query.setdefault(pair.query, QueryGroup(pair.query, [], [], pair.locator))
        (group.positives if pair.rel > relevance_threshold else group.negatives).append(pair.document)
    return [group for group in by_query.values() if group.positives]


def read_query_groups(path, skip_invalid=False, split=None, default_splits=("train",), relevance_threshold=0.0,
                      rel_default=None):
    """Per-query (query, positives, negatives) from a data file in either format.

    Args:
        path: a .json, .jsonl, .csv/.tsv file or a ``datasets`` save_to_disk directory.
        skip_invalid: drop bad records (listed by ``data.report_skipped``) instead of stopping at the first.
        split, default_splits: the DatasetDict split of a save_to_disk directory.
        relevance_threshold: graded pairs with rel above it are positives, the others negatives.
        rel_default: rel of a graded pair without one (None: rel is required).

    Returns an ``ExampleList`` of ``QueryGroup`` (``.query``, ``.positives``, ``.negatives``,
    ``.pos_scores``/``.neg_scores`` or None, ``.prompt`` or None, ``.locator``) with
    ``.record_format`` "groups" or "pairs". The format is the first record's; a record of the
    other format is a one-line error naming its file, line and missing field. A graded-pair query
    with no positive is left out. Raises UserError when no query is left.
    """
    record_format, parsed = read_either_format(path, skip_invalid, split, default_splits, rel_default)
    groups = parsed if record_format == "groups" else data.ExampleList(
        pairs_to_groups(parsed, relevance_threshold), skipped=parsed.skipped)
    groups.record_format = record_format
    if not groups:
        raise UserError(f"{path}: no valid records" if record_format == "groups" or not parsed
                        else f"{path}: no query has a pair with rel > {relevance_threshold} (a positive)")
    return groups


class PairDataset(torch.utils.data.Dataset):
    """Pre-tokenized pairs: {"query": ids, "document": ids, "rel", "weight", "doc_id", "index"}."""

    def __init__(self, features):
        self.features = features
        self.lengths = [len(f["query"]["input_ids"]) + len(f["document"]["input_ids"]) for f in features]

    def __len__(self):
        return len(self.features)

    def __getitem__(self, index):
        return self.features[index]


def build_pair_dataset(tokenizer, pairs, query_max_length, doc_max_length, preprocessing, stats=None):
    """Tokenize every query and document once (queries and documents at their own lengths)."""
    queries = encode_text_features(tokenizer, [pair.query for pair in pairs], query_max_length, preprocessing,
                                   side="query")
    documents = encode_text_features(tokenizer, [pair.document for pair in pairs], doc_max_length, preprocessing,
                                     side="document")
    doc_ids = {}
    features = []
    for index, (pair, query, document) in enumerate(zip(pairs, queries, documents)):
        features.append({"query": query, "document": document, "rel": pair.rel, "weight": pair.weight,
                         "doc_id": doc_ids.setdefault(pair.document, len(doc_ids)), "index": index})
    if stats is not None:
        add_length_stats(stats, queries, documents, query_max_length, doc_max_length)
    return PairDataset(features)


class PairCollator:
    """Pad queries and documents separately; stack rel, weight, doc_id and index."""

    def __init__(self, pad_token_id):
        self.pad = data.PaddingCollator(pad_token_id)

    def __call__(self, features):
        batch = {"query": self.pad([f["query"] for f in features]),
                 "document": self.pad([f["document"] for f in features])}
        batch["rel"] = torch.tensor([f["rel"] for f in features], dtype=torch.float32)
        batch["weight"] = torch.tensor([f["weight"] for f in features], dtype=torch.float32)
        batch["doc_id"] = torch.tensor([f["doc_id"] for f in features])
        batch["index"] = torch.tensor([f["index"] for f in features])
        batch["positives"] = len(features)  # every document is its query's positive
        return batch


# ---------------------------------------------------------------- query groups as training batches

class QueryGroupDataset(torch.utils.data.Dataset):
    """Pre-tokenized query groups. Item ``i`` is its query, one of its positives and
    ``negatives_per_query`` of its negatives, drawn afresh each epoch (``set_epoch``) from
    (seed, epoch, i) alone, so a run and its resume draw the same ones. A group with fewer
    negatives repeats them (as FlagEmbedding does); with none, the batch's other documents remain.
    """

    def __init__(self, queries, passages, groups, negatives_per_query, seed=0):
        self.queries, self.passages = queries, passages  # token features; groups index into them
        self.groups = groups  # [(query row, [positive rows], [negative rows])]
        self.negatives_per_query, self.seed, self.epoch = negatives_per_query, seed, 0
        self.lengths = [len(queries[q]["input_ids"]) + max(len(passages[p]["input_ids"]) for p in positives)
                        for q, positives, _ in groups]

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.groups)

    def __getitem__(self, index):
        query, positives, negatives = self.groups[index]
        draw = random.Random(f"{self.seed}-{self.epoch}-{index}")
        positive = draw.choice(positives)
        count = self.negatives_per_query if negatives else 0
        chosen = draw.sample(negatives, count) if len(negatives) >= count else \
            [draw.choice(negatives) for _ in range(count)]
        return {"query": self.queries[query], "positive": self.passages[positive],
                "negatives": [self.passages[row] for row in chosen], "doc_ids": [positive, *chosen], "index": index}


def build_group_dataset(tokenizer, groups, query_max_length, doc_max_length, preprocessing, negatives_per_query,
                        seed=0, stats=None):
    """Tokenize every distinct query and passage once; a passage's row is its doc_id."""
    query_rows, passage_rows, indexed = {}, {}, []
    for group in groups:
        query = query_rows.setdefault((group.prompt, group.query), len(query_rows))
        indexed.append((query, [passage_rows.setdefault(text, len(passage_rows)) for text in group.positives],
                        [passage_rows.setdefault(text, len(passage_rows)) for text in group.negatives]))
    queries = encode_text_features(tokenizer, [query for _, query in query_rows], query_max_length, preprocessing,
                                   side="query", prompts=[prompt for prompt, _ in query_rows])
    passages = encode_text_features(tokenizer, list(passage_rows), doc_max_length, preprocessing, side="document")
    if stats is not None:
        add_length_stats(stats, queries, passages, query_max_length, doc_max_length)
    return QueryGroupDataset(queries, passages, indexed, negatives_per_query, seed)


class GroupCollator:
    """Queries padded together; documents padded together: every query's positive first (in query
    order), then all their negatives (the layout ``pair_losses.infonce_loss`` reads)."""

    def __init__(self, pad_token_id):
        self.pad = data.PaddingCollator(pad_token_id)

    def __call__(self, features):
        documents = [f["positive"] for f in features] + [n for f in features for n in f["negatives"]]
        doc_ids = [f["doc_ids"][0] for f in features] + [i for f in features for i in f["doc_ids"][1:]]
        return {"query": self.pad([f["query"] for f in features]), "document": self.pad(documents),
                "rel": torch.ones(len(features)), "weight": torch.ones(len(features)),
                "doc_id": torch.tensor(doc_ids), "index": torch.tensor([f["index"] for f in features]),
                "positives": len(features)}


def add_length_stats(stats, queries, documents, query_max_length, doc_max_length):
    """Token length percentiles and how many texts hit their limit, for dataset_summary.json."""
    stats["query_tokens"] = data.length_percentiles([len(q["input_ids"]) for q in queries])
    stats["document_tokens"] = data.length_percentiles([len(d["input_ids"]) for d in documents])
    stats["queries_truncated"] = sum(len(q["input_ids"]) >= query_max_length for q in queries)
    stats["documents_truncated"] = sum(len(d["input_ids"]) >= doc_max_length for d in documents)


def encode_text_features(tokenizer, texts, max_length, preprocessing, side=None, prompts=None):
    """Token ids of texts, instructed, normalized and truncated exactly as in training.

    ``side`` ("query" or "document") picks the stored instruction put before each text;
    ``prompts`` (one per text, None for none) are records' own instructions, used instead.
    """
    normalize = build_normalizer(preprocessing.get("normalize"))
    texts = with_instructions(texts, preprocessing, side, prompts)
    return data.encode_texts(tokenizer, [normalize(text) for text in texts], None, max_length,
                             preprocessing.get("truncation_side", "right"))


def instruction_for(preprocessing, side):
    """The stored --query-instruction or --passage-instruction for ``side`` ("" when none)."""
    if side is None:
        return ""
    key = "query_instruction" if side == "query" else "passage_instruction"  # "document", "doc", "passage"
    return preprocessing.get(key) or ""


def with_instructions(texts, preprocessing, side, prompts=None):
    """``texts`` with their instruction in front (a record's own prompt wins over the stored one)."""
    instruction = instruction_for(preprocessing, side)
    if prompts is None:
        return [instruction + text for text in texts] if instruction else list(texts)
    return [(instruction if prompt is None else prompt) + text for text, prompt in zip(texts, prompts)]
