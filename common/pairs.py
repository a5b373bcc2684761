"""Query/document pair data of the vector trainer: the graded ``{query, document, rel, weight}``
records, read and checked like every data file, tokenized once, and collated into batches."""
from dataclasses import dataclass

import torch

from common import data
from common.errors import UserError
from common.text import build_normalizer


@dataclass
class PairExample:
    """One labelled (query, document) pair and where it came from."""
    query: str
    document: str
    rel: float
    weight: float
    locator: str


def parse_pair(record, rel_default=None):
    """Validate a {"query", "document", "rel", "weight"} record: rel in [0, 1], weight >= 0 (default 1)."""
    query = data.require_text(record, "query")
    document = data.require_text(record, "document")
    rel = data.require_number(record, "rel", default=rel_default, low=0.0, high=1.0)
    weight = data.require_number(record, "weight", default=1.0, low=0.0)
    return PairExample(query, document, float(rel), float(weight), record.where())


def load_pairs(path, skip_invalid=False, rel_default=None, split=None, default_splits=("train",)):
    """Read and validate a pair file (JSON, JSONL, CSV/TSV or a save_to_disk directory)."""
    records = data.read_records(path, split=split, skip_invalid=skip_invalid, default_splits=default_splits)
    pairs = data.parse_each(records, lambda record: parse_pair(record, rel_default), skip_invalid)
    if not pairs:
        raise UserError(f"{path}: no valid records")
    return pairs


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
    queries = encode_text_features(tokenizer, [pair.query for pair in pairs], query_max_length, preprocessing)
    documents = encode_text_features(tokenizer, [pair.document for pair in pairs], doc_max_length, preprocessing)
    doc_ids = {}
    features = []
    for index, (pair, query, document) in enumerate(zip(pairs, queries, documents)):
        features.append({"query": query, "document": document, "rel": pair.rel, "weight": pair.weight,
                         "doc_id": doc_ids.setdefault(pair.document, len(doc_ids)), "index": index})
    if stats is not None:
        stats["query_tokens"] = data.length_percentiles([len(q["input_ids"]) for q in queries])
        stats["document_tokens"] = data.length_percentiles([len(d["input_ids"]) for d in documents])
        stats["queries_truncated"] = sum(len(q["input_ids"]) >= query_max_length for q in queries)
        stats["documents_truncated"] = sum(len(d["input_ids"]) >= doc_max_length for d in documents)
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
        return batch


def encode_text_features(tokenizer, texts, max_length, preprocessing):
    """Token ids of texts, normalized and truncated exactly as in training."""
    normalize = build_normalizer(preprocessing.get("normalize"))
    return data.encode_texts(tokenizer, [normalize(text) for text in texts], None, max_length,
                             preprocessing.get("truncation_side", "right"))
