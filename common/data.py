"""Reading data files and turning records into model inputs.

Readers accept a JSON array, JSONL, CSV/TSV with a header row, or a directory
written by ``datasets``' ``save_to_disk``. Every record keeps where it came from
(file and line, or record number) so a bad value is reported precisely.
"""
import csv
import io
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from common.errors import UserError

MAX_ERRORS_SHOWN = 5


@dataclass
class Record:
    """One raw record and where it came from, for error messages."""
    source: str
    locator: str  # "line 12" or "record 3"
    fields: dict

    def where(self, field_name=None):
        where = f"{self.source} {self.locator}"
        return f"{where}: field '{field_name}'" if field_name else where


class RecordError(UserError):
    """A record that cannot be used; ``--skip-invalid`` drops these."""


# ---------------------------------------------------------------- reading files

def read_records(path, split=None, skip_invalid=False, default_splits=("train",)):
    """Read every record of a data file (or save_to_disk directory) as a list of Records.

    For a save_to_disk DatasetDict, ``split`` picks the split; without it the first of
    ``default_splits`` that exists is used (("validation", "val", "dev") for a validation path).
    """
    data_path = Path(path)
    if not data_path.exists():
        raise UserError(f"{path}: file not found")
    if data_path.is_dir():
        return _read_saved_dataset(data_path, split, default_splits)
    raw = data_path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[:error.start].count(b"\n") + 1
        raise UserError(f"{path} line {line}: not valid UTF-8 (byte offset {error.start}); "
                        "re-encode the file as UTF-8") from None
    if not text.strip():
        raise UserError(f"{path}: the file is empty")
    suffix = data_path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        records = _read_delimited(path, text, "\t" if suffix == ".tsv" else ",")
    elif suffix == ".jsonl" or (suffix != ".json" and not text.lstrip().startswith("[")):
        records = _read_jsonl(path, text, skip_invalid)
    else:
        records = _read_json(path, text, skip_invalid)
    if not records:
        raise UserError(f"{path}: no records found")
    return records


def _read_json(path, text, skip_invalid):
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        if text.lstrip().startswith("{"):  # a .json file that is really JSON Lines
            return _read_jsonl(path, text, skip_invalid)
        raise UserError(f"{path} line {error.lineno}: invalid JSON ({error.msg}, column {error.colno})") from None
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON array of records (or JSON Lines), "
                        f"got a JSON {type(data).__name__}")
    records = []
    for index, item in enumerate(data, start=1):
        record = Record(str(path), f"record {index}", item)
        if not isinstance(item, dict):
            _invalid(record, None, f"expected an object, got {type(item).__name__}", skip_invalid)
            continue
        records.append(record)
    return records


def _read_jsonl(path, text, skip_invalid):
    records = []
    # split on "\n" only: str.splitlines() also breaks at U+2028, form feeds etc., which
    # json.dumps(ensure_ascii=False) leaves raw inside strings
    for line_number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        record = Record(str(path), f"line {line_number}", None)
        try:
            item = json.loads(line)
        except json.JSONDecodeError as error:
            _invalid(record, None, f"invalid JSON ({error.msg}, column {error.colno})", skip_invalid)
            continue
        if not isinstance(item, dict):
            _invalid(record, None, f"expected a JSON object, got {type(item).__name__}", skip_invalid)
            continue
        record.fields = item
        records.append(record)
    return records


def _read_delimited(path, text, delimiter):
    # newline="" as the csv docs ask: only real line ends end a row (not U+2028 or form feeds)
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    csv.field_size_limit(max(csv.field_size_limit(), len(text)))  # a long text is valid (truncated later)
    records = []
    line_number = 1
    try:
        if not reader.fieldnames:
            raise UserError(f"{path}: no header row")
        for row in reader:
            start_line = line_number + 1
            line_number = reader.line_num  # quoted newlines make one record span several lines
            if None in row:
                raise UserError(f"{path} line {start_line}: more columns than the header has")
            records.append(Record(str(path), f"line {start_line}", dict(row)))
    except csv.Error as error:
        raise UserError(f"{path} line {reader.line_num}: malformed CSV ({error})") from None
    if not records:
        raise UserError(f"{path}: only a header row, no records")
    return records


def _read_saved_dataset(directory, split, default_splits):
    """Records from a ``datasets`` save_to_disk directory (a Dataset or a DatasetDict)."""
    try:
        import datasets
        if datasets is None:
            raise ImportError
    except ImportError:
        raise UserError(f"{directory}: is a directory; reading a save_to_disk dataset needs "
                        "the 'datasets' package (pip install datasets)") from None
    if not any((directory / name).exists() for name in ("dataset_info.json", "dataset_dict.json", "state.json")):
        raise UserError(f"{directory}: is a directory but not a datasets save_to_disk folder; "
                        "pass a .json, .jsonl, .csv or .tsv file")
    loaded = datasets.load_from_disk(str(directory))
    if isinstance(loaded, datasets.DatasetDict):
        split = split or _default_split(directory, loaded, default_splits)
        if split not in loaded:
            raise UserError(f"{directory}: no split '{split}' (has: {', '.join(loaded)})")
        loaded = loaded[split]
    source = f"{directory}[{split}]" if split else str(directory)
    return [Record(source, f"row {index}", row) for index, row in enumerate(loaded, start=1)]


def _default_split(directory, loaded, default_splits):
    """The first of ``default_splits`` the DatasetDict has; a lone split only for training data.

    Falling back to any other split would silently validate or test on the training data.
    """
    found = next((name for name in default_splits if name in loaded), None)
    if found is not None:
        return found
    if tuple(default_splits) == ("train",) and len(loaded) == 1:
        return next(iter(loaded))
    raise UserError(f"{directory}: no split named {' or '.join(repr(n) for n in default_splits)} "
                    f"(has: {', '.join(loaded)}); choose one with --data-split, or pass a file")


def _invalid(record, field_name, problem, skip_invalid):
    """Raise a RecordError, or (with --skip-invalid) count it and carry on."""
    error = RecordError(f"{record.where(field_name)}: {problem}")
    if not skip_invalid:
        raise error
    SKIPPED.append(str(error))


SKIPPED = []  # messages of records dropped by --skip-invalid, reported by report_skipped()


def report_skipped(stream=None):
    """Print how many records --skip-invalid dropped (with the first few reasons) and reset."""
    stream = stream or sys.stderr
    if SKIPPED:
        print(f"--skip-invalid: dropped {len(SKIPPED)} invalid record(s), e.g.:", file=stream)
        for message in SKIPPED[:MAX_ERRORS_SHOWN]:
            print(f"  {message}", file=stream)
    count = len(SKIPPED)
    SKIPPED.clear()
    return count


# ---------------------------------------------------------------- field validation

def require_text(record, name, allow_empty=False):
    """A string field; empty or whitespace-only text is an error unless allowed."""
    if name not in record.fields or record.fields[name] is None:
        raise RecordError(f"{record.where(name)}: missing")
    value = record.fields[name]
    if not isinstance(value, str):
        raise RecordError(f"{record.where(name)}: expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise RecordError(f"{record.where(name)}: empty text")
    return value


def require_number(record, name, default=None, low=None, high=None):
    """A finite number within [low, high]; CSV strings are converted."""
    value = record.fields.get(name, default)
    if value is None or value == "":
        if default is not None:
            return default
        raise RecordError(f"{record.where(name)}: missing")
    if isinstance(value, bool):
        raise RecordError(f"{record.where(name)}: expected a number, got a boolean")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise RecordError(f"{record.where(name)}: expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise RecordError(f"{record.where(name)}: must be a finite number, got {value!r}")
    if (low is not None and number < low) or (high is not None and number > high):
        raise RecordError(f"{record.where(name)}: {number} is outside [{low}, {high}]")
    return number


def parse_each(records, parse, skip_invalid):
    """Apply ``parse(record)`` to every record; with skip_invalid, drop RecordErrors and count them."""
    parsed = []
    for record in records:
        try:
            parsed.append(parse(record))
        except RecordError as error:
            if not skip_invalid:
                raise
            SKIPPED.append(str(error))
    return parsed


# ---------------------------------------------------------------- classification examples

@dataclass
class TextExample:
    """A classification input: a text, an optional preceding context, a raw label."""
    text: str
    context: str | None
    raw_label: object
    locator: str
    group: str | None = None
    label: int | None = None  # resolved id, filled by LabelSet.resolve


def detect_format(record, text_field=None):
    """'chat' ({"messages": [...]}), 'message' ({"message", "context"}) or 'text'."""
    if text_field:
        return "text"
    if "messages" in record.fields:
        return "chat"
    if "message" in record.fields:
        return "message"
    return "text"


def parse_text_example(record, record_format, text_field="text", label_field="label",
                       group_field=None, require_label=True):
    """Turn a Record into a TextExample in the given format, checking every field."""
    if record_format == "chat":
        text, raw_label = _parse_chat(record)
        context = None
    elif record_format == "message":
        text = require_text(record, "message")
        context = record.fields.get("context") or None
        if context is not None and not isinstance(context, str):
            raise RecordError(f"{record.where('context')}: expected a string, got {type(context).__name__}")
        raw_label = record.fields.get(label_field)
    else:
        text = require_text(record, text_field)
        context = None
        raw_label = record.fields.get(label_field)
    if require_label:
        raw_label = _check_raw_label(record, label_field if record_format != "chat" else "messages[-1].content",
                                     raw_label)
    group = None
    if group_field:  # only evaluation splits need it; records without it form a "(none)" group
        group = record.fields.get(group_field)
        group = "(none)" if group in (None, "") else str(group)
    return TextExample(text, context, raw_label, record.where(), group)


def _parse_chat(record):
    messages = record.fields.get("messages")
    if not isinstance(messages, list) or len(messages) < 2:
        raise RecordError(f"{record.where('messages')}: expected a list of at least two messages")
    for index in (1, -1):
        message = messages[index]
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise RecordError(f"{record.where(f'messages[{index}].content')}: expected a string")
    text = messages[1]["content"]
    if not text.strip():
        raise RecordError(f"{record.where('messages[1].content')}: empty text")
    return text, messages[-1]["content"].strip()


def _check_raw_label(record, label_field, raw_label):
    if raw_label is None or raw_label == "":
        raise RecordError(f"{record.where(label_field)}: missing")
    if isinstance(raw_label, bool) or not isinstance(raw_label, (int, str)):
        if isinstance(raw_label, float) and raw_label.is_integer():
            return int(raw_label)
        raise RecordError(f"{record.where(label_field)}: expected an integer or a string, "
                          f"got {type(raw_label).__name__}")
    if isinstance(raw_label, str) and raw_label.strip().lstrip("-").isdigit():
        return int(raw_label)  # CSV cells are strings: "2" means label 2
    return raw_label


def load_text_examples(path, text_field=None, label_field=None, group_field=None,
                       skip_invalid=False, require_label=True, split=None, default_splits=("train",)):
    """Read a classification file into TextExamples (format detected per file)."""
    records = read_records(path, split=split, skip_invalid=skip_invalid, default_splits=default_splits)
    record_format = detect_format(records[0], text_field)
    parse = lambda record: parse_text_example(  # noqa: E731
        record, record_format, text_field or "text", label_field or "label", group_field, require_label)
    examples = ExampleList(parse_each(records, parse, skip_invalid))
    if not examples:
        raise UserError(f"{path}: no valid records")
    examples.record_format = record_format
    return examples


class ExampleList(list):
    """A list of examples that remembers the record format of its file ('text', 'message', 'chat')."""
    record_format = "text"


class LabelSet:
    """Label names and ids. ``--labels`` fixes them; else integers keep their values
    and string names are sorted."""

    def __init__(self, names):
        self.names = list(names)
        self.ids = {name: index for index, name in enumerate(self.names)}

    @classmethod
    def from_examples(cls, examples, fixed_names=None):
        if fixed_names:
            return cls(fixed_names)
        raw = {example.raw_label for example in examples}
        if all(isinstance(label, int) for label in raw):
            if min(raw) < 0:
                bad = next(e for e in examples if e.raw_label == min(raw))
                raise UserError(f"{bad.locator}: field 'label': negative label {min(raw)}")
            return cls([str(index) for index in range(max(raw) + 1)])
        if any(isinstance(label, int) for label in raw):
            first_kind = isinstance(examples[0].raw_label, int)
            bad = next(e for e in examples if isinstance(e.raw_label, int) != first_kind)
            raise UserError(f"{bad.locator}: field 'label': {bad.raw_label!r} mixes integer labels and names "
                            f"(record 1 has {examples[0].raw_label!r}); use one kind, or give --labels")
        return cls(sorted(raw))

    def resolve(self, examples, label_field="label"):
        """Set ``example.label`` to an id, or raise naming the record and the label."""
        for example in examples:
            example.label = self.id_of(example.raw_label, example.locator, label_field)
        return examples

    def id_of(self, raw_label, locator, label_field="label"):
        if isinstance(raw_label, int):
            if 0 <= raw_label < len(self.names):
                return raw_label
            raise RecordError(f"{locator}: field '{label_field}': label {raw_label} is out of range "
                              f"0..{len(self.names) - 1}")
        if raw_label in self.ids:
            return self.ids[raw_label]
        raise RecordError(f"{locator}: field '{label_field}': unknown label {raw_label!r} "
                          f"(known: {', '.join(self.names)})")

    @property
    def id2label(self):
        return {index: name for index, name in enumerate(self.names)}

    @property
    def label2id(self):
        return dict(self.ids)


def resolve_labels(label_set, examples, skip_invalid, label_field="label"):
    """Resolve label ids, dropping (with --skip-invalid) records whose label is not in the set."""
    def resolve(example):
        example.label = label_set.id_of(example.raw_label, example.locator, label_field)
        return example
    return [example for example in parse_each(examples, resolve, skip_invalid)]


def stratified_split(examples, val_ratio, seed):
    """Split off a validation set with the class shares of the whole (scikit-learn)."""
    from sklearn.model_selection import train_test_split
    labels = [example.label for example in examples]
    counts = np.bincount(labels)
    too_small = [index for index, count in enumerate(counts) if count == 1]
    if too_small:
        raise UserError(f"the validation split would leave class id(s) {too_small} empty "
                        "(only one record each): add data or pass --val-path")
    # at least one record of every class, so a small data set still gets a usable validation split
    requested = math.ceil(val_ratio * len(examples))  # what scikit-learn takes for a float test_size
    val_size = max(requested, int(np.count_nonzero(counts)))
    if val_size != requested:
        print(f"note: --val-ratio {val_ratio} gives fewer validation records than classes; "
              f"taking {val_size} (one per class)", file=sys.stderr)
    try:
        train, val = train_test_split(examples, test_size=val_size, random_state=seed, stratify=labels)
    except ValueError as error:
        raise UserError(f"cannot split off a stratified validation set: {error}; "
                        "raise --val-ratio or pass --val-path") from None
    return train, val


def check_label_coverage(train_examples, val_examples, label_set):
    """Refuse a training set with one class; warn about classes missing from validation."""
    train_classes = {example.label for example in train_examples}
    if len(train_classes) < 2:
        only = label_set.names[next(iter(train_classes))]
        raise UserError(f"the training set has only one class ('{only}'): a classifier needs at least two")
    missing = sorted({example.label for example in train_examples} - {e.label for e in val_examples})
    if missing:
        names = ", ".join(label_set.names[index] for index in missing)
        print(f"warning: validation set has no records of: {names}", file=sys.stderr)


# ---------------------------------------------------------------- tokenization

def backend_tokenizer(tokenizer):
    """The fast ``tokenizers.Tokenizer`` with padding and truncation switched off.

    Some tokenizer.json files ship fixed padding/truncation; we encode untruncated
    once (to measure lengths) and truncate ourselves.
    """
    backend = tokenizer.backend_tokenizer
    backend.no_padding()
    backend.no_truncation()
    return backend


@dataclass
class EncodedBatchStats:
    full_lengths: list = field(default_factory=list)
    truncated: int = 0
    unknown_tokens: int = 0
    total_tokens: int = 0


def encode_texts(tokenizer, texts, contexts, max_length, truncation_side="right", stats=None):
    """Encode texts (with optional contexts as the first segment) to id lists.

    A context is encoded as a sentence pair (context, text) with token types. When too
    long, the context is cut first, keeping its most recent end; the text itself is cut
    (on ``truncation_side``) only when it alone does not fit. Returns a list of
    ``{"input_ids", "token_type_ids"}``.
    """
    backend = backend_tokenizer(tokenizer)
    text_encodings = backend.encode_batch(list(texts), add_special_tokens=False)
    has_context = [bool(context) for context in contexts] if contexts is not None else [False] * len(texts)
    context_encodings = (backend.encode_batch([c or "" for c in contexts], add_special_tokens=False)
                         if any(has_context) else [None] * len(texts))
    unk_id = tokenizer.unk_token_id
    encoded = []
    for text_enc, context_enc, with_context in zip(text_encodings, context_encodings, has_context):
        budget = max_length - tokenizer.num_special_tokens_to_add(pair=with_context)
        full_length = len(text_enc.ids) + (len(context_enc.ids) if with_context else 0)
        if stats is not None:
            stats.full_lengths.append(full_length + (max_length - budget))
            stats.truncated += full_length > budget
            stats.unknown_tokens += text_enc.ids.count(unk_id) + (context_enc.ids.count(unk_id) if with_context else 0)
            stats.total_tokens += full_length
        if with_context and len(text_enc.ids) >= budget:  # the message fills the window: drop the context
            with_context = False
            budget = max_length - tokenizer.num_special_tokens_to_add(pair=False)
        if len(text_enc.ids) > budget:
            text_enc.truncate(budget, direction=truncation_side)
        if with_context and len(context_enc.ids) > budget - len(text_enc.ids):
            context_enc.truncate(budget - len(text_enc.ids), direction="left")  # keep the most recent end
        final = (backend.post_process(context_enc, text_enc, add_special_tokens=True) if with_context
                 else backend.post_process(text_enc, None, add_special_tokens=True))
        encoded.append({"input_ids": final.ids, "token_type_ids": final.type_ids})
    return encoded


class EncodedDataset(torch.utils.data.Dataset):
    """Pre-tokenized features (tokenize once up front, not in every epoch)."""

    def __init__(self, features):
        self.features = features
        self.lengths = [len(feature["input_ids"]) for feature in features]

    def __len__(self):
        return len(self.features)

    def __getitem__(self, index):
        return self.features[index]


def build_classification_dataset(tokenizer, examples, max_length, truncation_side, stats=None):
    features = encode_texts(tokenizer, [e.text for e in examples], [e.context for e in examples],
                            max_length, truncation_side, stats)
    for feature, example, index in zip(features, examples, range(len(examples))):
        feature["labels"] = example.label if example.label is not None else -100
        feature["index"] = index
    return EncodedDataset(features)


class PaddingCollator:
    """Pad a list of features to the longest in the batch (dynamic padding)."""

    def __init__(self, pad_token_id, pad_to_multiple_of=None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features):
        longest = max(len(feature["input_ids"]) for feature in features)
        if self.pad_to_multiple_of:
            longest = math.ceil(longest / self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(features), longest), self.pad_token_id, dtype=torch.long)
        token_type_ids = torch.zeros((len(features), longest), dtype=torch.long)
        attention_mask = torch.zeros((len(features), longest), dtype=torch.long)
        for row, feature in enumerate(features):
            length = len(feature["input_ids"])
            input_ids[row, :length] = torch.tensor(feature["input_ids"])
            token_type_ids[row, :length] = torch.tensor(feature["token_type_ids"])
            attention_mask[row, :length] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        for key in features[0]:
            if key not in batch:  # labels, index, doc ids...: one value per feature
                batch[key] = torch.tensor([feature[key] for feature in features])
        return batch


# ---------------------------------------------------------------- batching

class LengthGroupedBatchSampler(torch.utils.data.Sampler):
    """Batches of similar length, in random order, identical for a given (seed, epoch).

    Indices are shuffled, cut into mega-batches of ``batch_size * mega_batch_factor``,
    each sorted by length and cut into batches; the batch order is then shuffled. With
    DDP each rank takes every ``world_size``-th batch (the tail is dropped so all ranks
    run the same number of steps). ``shuffle=False`` gives fixed, length-sorted batches
    for evaluation. Because the order depends only on (seed, epoch), resume skips the
    batches already done.
    """

    def __init__(self, lengths, batch_size, shuffle=True, seed=0, group_by_length=True,
                 mega_batch_factor=50, rank=0, world_size=1, sample_weights=None):
        self.lengths = np.asarray(lengths)
        self.sample_weights = None if sample_weights is None else np.asarray(sample_weights, dtype=float)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.group_by_length = group_by_length
        self.mega_batch_factor = mega_batch_factor
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.skip_batches = 0

    def set_epoch(self, epoch, skip_batches=0):
        self.epoch = epoch
        self.skip_batches = skip_batches

    def all_batches(self):
        generator = np.random.default_rng(self.seed + self.epoch)
        order = generator.permutation(len(self.lengths)) if self.shuffle else np.arange(len(self.lengths))
        if self.sample_weights is not None:  # --sampler weighted: draw with replacement by weight
            probabilities = self.sample_weights / self.sample_weights.sum()
            order = generator.choice(len(self.lengths), size=len(self.lengths), replace=True, p=probabilities)
        if self.group_by_length:
            mega = self.batch_size * self.mega_batch_factor if self.shuffle else len(order)
            order = np.concatenate([chunk[np.argsort(-self.lengths[chunk], kind="stable")]
                                    for chunk in np.array_split(order, max(1, math.ceil(len(order) / mega)))])
        batches = [order[start:start + self.batch_size].tolist() for start in range(0, len(order), self.batch_size)]
        if self.shuffle and self.group_by_length:
            batches = [batches[i] for i in generator.permutation(len(batches))]
        usable = len(batches) - len(batches) % self.world_size if self.world_size > 1 else len(batches)
        return batches[self.rank:usable:self.world_size]

    def __iter__(self):
        return iter(self.all_batches()[self.skip_batches:])

    def __len__(self):
        batches = math.ceil(len(self.lengths) / self.batch_size)
        return batches // self.world_size if self.world_size > 1 else batches


def private_generator(seed):
    """A DataLoader's own generator: creating an iterator draws a seed from it, and drawing
    from the global RNG instead would shift dropout masks after a resume."""
    return torch.Generator().manual_seed(seed)


def shard_indices(count, rank, world_size):
    """This rank's share of an evaluation set (every world_size-th item, no padding)."""
    return list(range(rank, count, world_size))


# ---------------------------------------------------------------- summary

def length_percentiles(lengths):
    if not lengths:
        return {"p50": 0, "p90": 0, "p99": 0, "max": 0}
    values = np.asarray(lengths)
    return {"p50": int(np.percentile(values, 50)), "p90": int(np.percentile(values, 90)),
            "p99": int(np.percentile(values, 99)), "max": int(values.max())}


def summarize_split(name, examples, label_set, stats, max_length):
    """A dict describing one split: counts per class, token lengths, truncation, [UNK] rate."""
    counts = np.bincount([e.label for e in examples if e.label is not None], minlength=len(label_set.names))
    total = int(counts.sum()) or 1
    return {
        "split": name,
        "records": len(examples),
        "classes": {label_set.names[i]: {"count": int(c), "share": round(float(c) / total, 4)}
                    for i, c in enumerate(counts)},
        "token_length": length_percentiles(stats.full_lengths),
        "truncated": stats.truncated,
        "max_length": max_length,
        "unk_rate": round(stats.unknown_tokens / stats.total_tokens, 4) if stats.total_tokens else 0.0,
    }


def format_summary(summaries):
    """Human-readable dataset summary table."""
    lines = ["dataset summary:"]
    for summary in summaries:
        lengths = summary["token_length"]
        lines.append(f"  {summary['split']}: {summary['records']} records; tokens p50={lengths['p50']} "
                     f"p90={lengths['p90']} p99={lengths['p99']} max={lengths['max']}; "
                     f"{summary['truncated']} truncated at max_length={summary['max_length']}; "
                     f"[UNK] rate {summary['unk_rate']:.2%}")
        for name, entry in summary["classes"].items():
            lines.append(f"      {name:<20} {entry['count']:>7}  {entry['share']:6.1%}")
    return "\n".join(lines)
