"""Long documents as overlapping token windows, classified chunk by chunk and aggregated.

A text is tokenized once without special tokens and cut (by the fast tokenizer's own
truncation with ``stride``) into windows of ``max_length - 2`` content tokens that overlap
by ``stride`` tokens; each window gets [CLS]/[SEP] from the tokenizer's post-processor.
Each chunk carries its document id, position, the document's chunk count, the label and
the character span it covers. Chunk logits are aggregated per document (mean, max or
logsumexp) for the document-level loss and prediction.

The same ``LongdocSettings`` (stored in the model directory's ``toolkit["longdoc"]``) drive
training and inference, so a saved model chunks, strips and aggregates exactly as it was trained.
"""
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import regex
import torch

from common import data
from common.choices import AGGREGATIONS, CHUNK_SELECTIONS
from common.errors import UserError, short_repr


@dataclass
class LongdocSettings:
    """How documents are chunked and aggregated; the ``toolkit["longdoc"]`` block of a model."""
    stride: int = 128
    max_chunks: int = 0  # 0: no cap
    chunk_selection: str = "spread"
    aggregation: str = "mean"
    strip_patterns: list = field(default_factory=list)

    def to_dict(self):
        """The JSON-ready block stored as ``toolkit["longdoc"]``."""
        return asdict(self)

    @classmethod
    def from_toolkit(cls, toolkit):
        """Settings of a saved model (missing keys take the defaults)."""
        block = dict(toolkit.get("longdoc") or {})
        known = {key: block[key] for key in cls.__dataclass_fields__ if key in block}
        return cls(**known)


def check_settings(settings, max_length, num_special_tokens=2):
    """Refuse settings that cannot produce windows: the stride must leave each window new tokens."""
    window = max_length - num_special_tokens
    if window < 1:
        raise UserError(f"--max-length {max_length}: leaves no room for text after the special tokens")
    if not 0 <= settings.stride < window:
        raise UserError(f"--stride {settings.stride}: must be at least 0 and below max_length - "
                        f"{num_special_tokens} = {window} (each window must advance)")
    if settings.max_chunks < 0:
        raise UserError(f"--max-chunks {settings.max_chunks}: must be 0 (no cap) or more")
    if settings.chunk_selection not in CHUNK_SELECTIONS:
        raise UserError(f"chunk selection {settings.chunk_selection!r}: expected one of {', '.join(CHUNK_SELECTIONS)}")
    if settings.aggregation not in AGGREGATIONS:
        raise UserError(f"aggregation {settings.aggregation!r}: expected one of {', '.join(AGGREGATIONS)}")


# ---------------------------------------------------------------- boilerplate stripping

# A strip pattern gets this long on one text (plus the same again per million characters, so an
# ordinary pattern over a 30 MB document is not cut short): a pattern that backtracks without end,
# such as (a+)+$ on a run of "a"s, would otherwise block training, or a server worker, for good.
STRIP_SECONDS = 1.0
STRIP_SECONDS_PER_MILLION_CHARACTERS = 1.0


def load_strip_patterns(path):
    """(patterns, names) of a file of regular expressions, one per line; blank lines and lines starting
    with '#' are skipped. A name says where its pattern is written ("FILE line 3").

    Each pattern is compiled here so a bad one is reported with its line, not at first use.
    """
    file_path = Path(path)
    if not file_path.is_file():
        raise UserError(f"--strip-patterns {path}: file not found")
    patterns, names = [], []
    for line_number, line in enumerate(data.read_text_file(file_path).splitlines(), start=1):
        pattern = line.rstrip("\r\n")
        if not pattern.strip() or pattern.lstrip().startswith("#"):
            continue
        try:
            compile_strip_pattern(pattern)
        except (re.error, regex.error) as error:
            raise UserError(f"{path} line {line_number}: invalid regular expression ({error})") from None
        patterns.append(pattern)
        names.append(f"{path} line {line_number}")
    return patterns, names


def compile_strip_pattern(pattern):
    """``pattern`` for ``strip_matches``: compiled by the ``regex`` module (whose matching can be given a
    time limit) in its re-compatible VERSION0 mode, with MULTILINE so ``^``/``$`` anchor to lines.

    ``re`` must accept it too: the patterns are re's syntax (a model directory's check reads them with
    ``re``), so a ``regex``-only construct such as ``\\p{L}`` is refused here, not at loading.
    """
    re.compile(pattern, re.MULTILINE)
    return regex.compile(pattern, regex.MULTILINE | regex.VERSION0)


def strip_matches(compiled, text, name):
    """``text`` without the matches of a compiled strip pattern; a pattern that takes more than its time
    on ``text`` (``STRIP_SECONDS`` plus ``STRIP_SECONDS_PER_MILLION_CHARACTERS``) is a TextCleaningError
    naming it, so catastrophic backtracking is one line, not a hang. Every strip pattern runs here, in
    training, evaluation, inference, serving and behind ONNX exports alike.
    """
    limit = STRIP_SECONDS + STRIP_SECONDS_PER_MILLION_CHARACTERS * len(text) / 1e6
    try:
        # concurrent: the GIL is released while it matches, so a server still answers /health meanwhile
        return compiled.sub("", text, timeout=limit, concurrent=True)
    except TimeoutError:
        raise data.TextCleaningError(
            f"strip pattern {short_repr(compiled.pattern)} ({name}) took more than {limit:.3g} s on this text of "
            f"{len(text):,} characters (catastrophic backtracking, as in (a+)+$?); rewrite the pattern without "
            "nested repetition") from None


def build_text_cleaner(strip_patterns=(), normalize_spec=None, pattern_names=None, model_source=None):
    """``str -> str``: delete every match of the strip patterns, then apply the stored normalization.

    Patterns run on the raw text (before normalization), so they can be written against the
    text as it appears in the data files; ``^``/``$`` anchor to lines. ``pattern_names`` say where
    each pattern is written, for the error of one that runs out of time (``strip_matches``); by
    default its place in the stored ``toolkit.longdoc.strip_patterns`` (of ``model_source``, when given).
    """
    stored_in = f" of {model_source}" if model_source else ""
    names = pattern_names or [f"toolkit.longdoc.strip_patterns[{index}]{stored_in}"
                              for index in range(len(strip_patterns))]
    compiled = []
    for pattern, name in zip(strip_patterns, names):
        try:
            compiled.append((compile_strip_pattern(pattern), name))
        except (re.error, regex.error) as error:
            raise UserError(f"{name}: invalid regular expression ({error})") from None
    normalize = None
    if normalize_spec is not None:
        from common.text import build_normalizer
        normalize = build_normalizer(normalize_spec)

    def clean(text):
        for pattern, name in compiled:
            text = strip_matches(pattern, text, name)
        return normalize(text) if normalize is not None else text
    return clean


# ---------------------------------------------------------------- chunking

def count_windows(num_content_tokens, max_length, stride, num_special_tokens=2):
    """Exact number of windows for a text of ``num_content_tokens`` (special tokens not counted).

    1 when the text fits one window, else ceil((n - stride) / (window - stride)) with
    window = max_length - num_special_tokens. The guide's estimate
    ceil((n_tokens - 2) / (max_len - 2 - stride)), whose n_tokens counts [CLS]/[SEP], is
    the same for stride 0 and an upper bound otherwise.
    """
    window = max_length - num_special_tokens
    if num_content_tokens <= window:
        return 1
    return math.ceil((num_content_tokens - stride) / (window - stride))


def select_chunks(num_windows, max_chunks, selection="spread"):
    """Indices of the windows kept under a cap of ``max_chunks`` (0: all), in document order.

    With a cap of one, every selection keeps the first window (plain head truncation).
    """
    if max_chunks <= 0 or num_windows <= max_chunks:
        return list(range(num_windows))
    if selection == "head":
        return list(range(max_chunks))
    if selection == "head-tail":
        head = math.ceil(max_chunks / 2)
        return list(range(head)) + list(range(num_windows - (max_chunks - head), num_windows))
    # evenly spaced from the first to the last window, rounded to distinct indices
    return sorted({int(round(position)) for position in np.linspace(0, num_windows - 1, max_chunks)})


def token_windows(tokenizer, text, max_length, stride):
    """The content windows (``tokenizers.Encoding`` without special tokens) of one text.

    The fast tokenizer's truncation with ``stride`` yields the first window and its
    ``overflowing`` windows, each starting ``window - stride`` tokens after the previous.
    """
    backend = data.backend_tokenizer(tokenizer)
    encoding = backend.encode(text, add_special_tokens=False)
    window = max_length - tokenizer.num_special_tokens_to_add(pair=False)
    if len(encoding.ids) <= window:
        return [encoding]
    encoding.truncate(window, stride=stride, direction="right")
    return [encoding] + list(encoding.overflowing)


def chunk_feature(backend, window, doc_id, chunk_idx, num_chunks, label):
    """One chunk: post-processed ids ([CLS] ... [SEP]) plus its metadata and character span."""
    final = backend.post_process(window, None, add_special_tokens=True)
    offsets = window.offsets
    char_start, char_end = (offsets[0][0], offsets[-1][1]) if offsets else (0, 0)
    return {"input_ids": final.ids, "token_type_ids": final.type_ids, "doc_id": doc_id, "chunk_idx": chunk_idx,
            "num_chunks": num_chunks, "labels": label, "char_start": char_start, "char_end": char_end}


def chunk_document(tokenizer, text, max_length, settings, doc_id=0, label=-100):
    """(chunk features, number of windows before the cap) for one already-cleaned text.

    An empty text gives one [CLS][SEP] chunk. ``labels`` is -100 for unlabelled documents.
    """
    windows = token_windows(tokenizer, text, max_length, settings.stride)
    kept = select_chunks(len(windows), settings.max_chunks, settings.chunk_selection)
    backend = data.backend_tokenizer(tokenizer)
    features = [chunk_feature(backend, windows[index], doc_id, position, len(kept), label)
                for position, index in enumerate(kept)]
    return features, len(windows)


@dataclass
class ChunkingStats:
    """What chunking a split did, for the dataset summary."""
    content_tokens: list = field(default_factory=list)
    chunks_per_document: list = field(default_factory=list)
    capped: int = 0
    unknown_tokens: int = 0


def chunk_documents(tokenizer, texts, labels, max_length, settings, stats=None):
    """Chunk every document; returns a list (one entry per document) of chunk-feature lists."""
    unk_id = tokenizer.unk_token_id
    documents = []
    texts, labels = list(texts), list(labels)
    with data.tokenizing_progress(len(texts), "chunking") as progress:
        for doc_id, (text, label) in enumerate(zip(texts, labels)):
            documents.append(chunk_one(tokenizer, text, label, max_length, settings, doc_id, unk_id, stats))
            progress.update(1)
    return documents


def chunk_one(tokenizer, text, label, max_length, settings, doc_id, unk_id, stats):
    """One document's chunk features, its counts added to ``stats``."""
    features, num_windows = chunk_document(tokenizer, text, max_length, settings, doc_id,
                                           -100 if label is None else label)
    if stats is not None:
        stats.chunks_per_document.append(len(features))
        stats.capped += num_windows > len(features)
        content = [token for feature in features for token in feature["input_ids"][1:-1]]
        stats.content_tokens.append(len(content))
        stats.unknown_tokens += content.count(unk_id)
    return features


class DocumentDataset(torch.utils.data.Dataset):
    """Documents as lists of pre-tokenized chunks; ``lengths`` (chunk counts) drive batching."""

    def __init__(self, documents):
        self.documents = documents
        self.lengths = [len(chunks) for chunks in documents]

    def __len__(self):
        return len(self.documents)

    def __getitem__(self, index):
        return self.documents[index]


class DocumentCollator:
    """A batch of documents -> their chunks (unpadded) and batch-local document indices.

    Padding happens per micro-batch (``chunk_micro_batches``), so a long document never
    becomes one (chunks x max_length) tensor.
    """

    def __call__(self, documents):
        chunks = [chunk for chunks in documents for chunk in chunks]
        return {"chunks": chunks,
                "doc_index": torch.tensor([row for row, chunks in enumerate(documents) for _ in chunks]),
                "labels": torch.tensor([chunks[0]["labels"] for chunks in documents]),
                "doc_ids": torch.tensor([chunks[0]["doc_id"] for chunks in documents])}


def chunk_micro_batches(chunks, chunk_batch_size, pad_token_id):
    """Yield ``(start, padded batch)`` for consecutive slices of ``chunk_batch_size`` chunks.

    The padded batch keeps every chunk's metadata (doc_id, chunk_idx, num_chunks, labels,
    char_start, char_end) as LongTensors beside the model inputs.
    """
    collator = data.PaddingCollator(pad_token_id)
    for start in range(0, len(chunks), chunk_batch_size):
        yield start, collator(chunks[start:start + chunk_batch_size])


# ---------------------------------------------------------------- aggregation

def aggregate_logits(chunk_logits, doc_index, num_docs, method="mean"):
    """Document logits (num_docs, K) from chunk logits (n_chunks, K), grouped by ``doc_index``.

    mean: average evidence (robust); max: per class, the strongest chunk; logsumexp: a
    smooth max that still adds up evidence from several chunks. Vectorised with
    ``scatter_reduce``/``index_add``; differentiable for training.
    """
    num_labels = chunk_logits.shape[-1]
    index = doc_index.to(chunk_logits.device).unsqueeze(-1).expand(-1, num_labels)  # (n_chunks, K)
    empty = chunk_logits.new_zeros((num_docs, num_labels))
    if method == "mean":
        return empty.scatter_reduce(0, index, chunk_logits, reduce="mean", include_self=False)
    if method == "max":
        return empty.scatter_reduce(0, index, chunk_logits, reduce="amax", include_self=False)
    if method == "logsumexp":
        # subtract each document's (detached) max so exp never overflows
        peak = empty.scatter_reduce(0, index, chunk_logits.detach(), reduce="amax", include_self=False)
        shifted = torch.exp(chunk_logits - peak.index_select(0, doc_index.to(chunk_logits.device)))
        return torch.log(empty.index_add(0, doc_index.to(chunk_logits.device), shifted)) + peak
    raise ValueError(f"unknown aggregation {method!r} (expected one of {AGGREGATIONS})")


# ---------------------------------------------------------------- inference

def predict_documents(chunk_logits_fn, tokenizer, toolkit, texts, chunk_batch_size=16, explain=0, id2label=None,
                      input_name=None, pattern_source=None):
    """Classify long documents with a saved model's chunking, cleaning and aggregation.

    ``chunk_logits_fn(batch)`` maps a padded batch (``input_ids``, ``attention_mask``,
    ``token_type_ids`` LongTensors plus chunk metadata) to chunk logits (n_chunks, K) as a
    tensor or array; it may be a torch model wrapper or an ONNX session wrapper. Chunks
    of consecutive documents share forward passes of ``chunk_batch_size`` chunks, so
    memory stays bounded however long a document is. Returns, per text: ``logits`` (the
    aggregated document logits), ``probs``, ``label_id`` (and ``label`` with ``id2label``),
    ``num_chunks``, ``num_windows`` (before ``max_chunks``) and, with ``explain > 0``,
    ``top_chunks``: the chunks whose own probability of the predicted class is highest
    (``score``), with their logit for it and their character span in the cleaned text.

    A text a strip pattern cannot process in its time is a TextCleaningError naming the input
    (``input_name(index)``, by default "input N") and the pattern (in ``pattern_source``, the model).
    """
    settings = LongdocSettings.from_toolkit(toolkit)
    preprocessing = toolkit.get("preprocessing", {})
    max_length = preprocessing.get("max_length", 512)
    clean = build_text_cleaner(settings.strip_patterns, preprocessing.get("normalize"), model_source=pattern_source)
    input_name = input_name or (lambda index: f"input {index + 1}")
    collator = data.PaddingCollator(tokenizer.pad_token_id)
    documents, pending = [], []  # pending: (document, chunk feature) not yet run

    def flush():
        logits = chunk_logits_fn(collator([feature for _, feature in pending]))
        logits = logits.detach().float().cpu() if torch.is_tensor(logits) else torch.from_numpy(
            np.asarray(logits, dtype=np.float32))
        for (document, _), row in zip(pending, logits):
            document["logits"].append(row)
        pending.clear()

    for doc_id, text in enumerate(texts):
        cleaned = data.clean_text(clean, text, input_name(doc_id))
        features, num_windows = chunk_document(tokenizer, cleaned, max_length, settings, doc_id)
        document = {"text": cleaned if explain > 0 else None, "num_windows": num_windows, "logits": [],
                    "spans": [(feature["char_start"], feature["char_end"]) for feature in features]}
        documents.append(document)
        for feature in features:  # only chunk_batch_size chunks are ever padded into tensors
            pending.append((document, feature))
            if len(pending) == chunk_batch_size:
                flush()
    if pending:
        flush()
    return [document_result(document, settings.aggregation, explain, id2label) for document in documents]


def document_result(document, aggregation, explain, id2label):
    """Aggregate one document's chunk logits into its prediction (and explanation)."""
    chunk_logits = torch.stack(document["logits"])  # (n_chunks, K)
    doc_logits = aggregate_logits(chunk_logits, torch.zeros(len(chunk_logits), dtype=torch.long), 1, aggregation)[0]
    probs = torch.softmax(doc_logits, -1)
    label_id = int(probs.argmax())
    result = {"logits": doc_logits.tolist(), "probs": probs.tolist(), "label_id": label_id,
              "num_chunks": len(chunk_logits), "num_windows": document["num_windows"]}
    if id2label is not None:
        result["label"] = id2label[label_id]
    if explain > 0:
        chunk_probs = torch.softmax(chunk_logits, -1)[:, label_id]
        order = torch.argsort(chunk_probs, descending=True, stable=True)[:explain]
        result["top_chunks"] = [
            {"chunk_idx": int(index), "score": round(float(chunk_probs[index]), 6),
             "logit": round(float(chunk_logits[index, label_id]), 6),
             "char_start": document["spans"][index][0], "char_end": document["spans"][index][1],
             "text": document["text"][document["spans"][index][0]:document["spans"][index][1]]}
            for index in order.tolist()]
    return result
