"""Reading data files and turning records into model inputs.

Readers accept a JSON array, JSONL, CSV/TSV with a header row, or a directory
written by ``datasets``' ``save_to_disk``. Every record keeps where it came from
(file and line, or record number) so a bad value is reported precisely.
"""
import csv
import errno
import io
import itertools
import json
import math
import os
import re
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from common.errors import UserError, short_repr

MAX_ERRORS_SHOWN = 5
MAX_NAMES_SHOWN = 20  # label names listed in an "unknown label" error
# Numbers read from data files are trained on in float32, and the losses square them (a regression
# target in MSE, a pair weight times another in CoSENT): past sqrt(float32 max), about 1.8e19, that
# overflows to inf, every step is skipped and the metrics end in NaN. Finite in float64 is not enough.
MAX_TRAINABLE_MAGNITUDE = math.sqrt(float(np.finfo(np.float32).max))


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


class TextCleaningError(UserError):
    """A text that a cleaning step (a ``--strip-patterns`` pattern) could not process in its time.

    The message says what failed; whoever knows where the text came from puts that in front
    (``clean_texts``: the record and field; the inference code: the input).
    """


# ---------------------------------------------------------------- reading files

def read_records(path, split=None, skip_invalid=False, default_splits=("train",)):
    """Read every record of a data file (or save_to_disk directory) as a list of Records.

    For a save_to_disk DatasetDict, ``split`` picks the split; without it the first of
    ``default_splits`` that exists is used (("validation", "val", "dev") for a validation path).
    """
    data_path = Path(path)
    if _is_directory(path):
        records = ExampleList(_read_saved_dataset(data_path, split, default_splits))
        if not records:
            raise UserError(f"{path}: no records found")
        return records
    return parse_records(path, read_text_file(data_path), skip_invalid, data_path.suffix)


def parse_records(source, text, skip_invalid=False, suffix=""):
    """The Records of data-file text already read, from a file or from standard input.

    ``suffix`` (".csv", ".tsv", ".json", ".jsonl" or "") picks the format; without a known
    one, text starting with "[" is a JSON array, else JSON Lines. ``source`` names the
    text in error messages ("stdin line 3: ...").
    """
    if not text.strip():
        raise UserError(f"{source}: the file is empty")
    suffix = suffix.lower()
    if suffix in (".csv", ".tsv"):
        records = _read_delimited(source, text, "\t" if suffix == ".tsv" else ",")
    elif suffix == ".jsonl" or (suffix != ".json" and not text.lstrip().startswith("[")):
        records = _read_jsonl(source, text, skip_invalid)
    else:
        records = _read_json(source, text, skip_invalid)
    if not records:
        raise UserError(f"{source}: no records found")
    return records if isinstance(records, ExampleList) else ExampleList(records)


def read_text_file(path):
    """A file's text (UTF-8; a byte-order mark is dropped); see ``decode_utf8``."""
    return decode_utf8(Path(path).read_bytes(), path)


def decode_utf8(raw, source):
    """Bytes read from ``source`` (a file or a stream) as text, a byte-order mark dropped.

    Bytes that are not UTF-8 are one error line naming the line they are on.
    """
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[:error.start].count(b"\n") + 1
        raise UserError(f"{source} line {line}: not valid UTF-8 (byte offset {error.start}); "
                        "re-encode it as UTF-8") from None


def _is_directory(path):
    """True for a directory, False for a regular file; anything else is refused before it is opened.

    A FIFO with no writer blocks ``open`` forever and /dev/zero never ends, so only regular
    files are read.
    """
    mode = input_path_mode(path)
    if stat.S_ISDIR(mode):
        return True
    if not stat.S_ISREG(mode):
        raise UserError(f"{path}: not a regular file (a {special_file_kind(mode)}); "
                        "pass a .json, .jsonl, .csv or .tsv file")
    return False


def input_path_mode(path, what="file"):
    """``os.stat``'s mode of an input path, found without opening it; one error line naming ``what``
    is missing (a dangling symbolic link said as one), a link loop or unreadable. ``os.stat`` rather
    than ``Path.exists``, which calls a symlink loop missing."""
    try:
        return os.stat(path).st_mode
    except FileNotFoundError:
        if os.path.islink(path):
            raise UserError(f"{path}: {what} not found (a symbolic link to "
                            f"{_clip(os.readlink(path))!r}, which does not exist)") from None
        raise UserError(f"{path}: {what} not found") from None
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise UserError(f"{path}: symbolic link loop (too many levels of symbolic links)") from None
        raise UserError(f"{path}: {error.strerror or error}") from None


def special_file_kind(mode):
    for is_kind, name in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"),
                          (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket")):
        if is_kind(mode):
            return name
    return "special file"


class _JsonProblem(Exception):
    """Why JSON text could not be decoded, with its line when the decoder knows it."""

    def __init__(self, problem, line=None):
        super().__init__(problem)
        self.problem, self.line = problem, line


_JSON_WHITESPACE = re.compile(r"[ \t\n\r]*")


def _decode_json(text, position=0):
    """(value, end, repeated_key) of the JSON value starting at ``position``; raises _JsonProblem.

    Plain json keeps the last of two equal keys silently, so the first repeated key is
    noted for the caller to refuse. Nesting too deep for the decoder raises RecursionError
    and a 5000-digit integer ValueError, not JSONDecodeError: both become one-line problems.
    """
    repeated = []

    def build_object(pairs):
        result = dict(pairs)
        if len(result) < len(pairs) and not repeated:
            seen = set()
            repeated.append(next(key for key, _ in pairs if key in seen or seen.add(key)))
        return result
    try:
        value, end = json.JSONDecoder(object_pairs_hook=build_object).raw_decode(text, position)
    except json.JSONDecodeError as error:
        raise _JsonProblem(f"invalid JSON ({error.msg}, column {error.colno})", error.lineno) from None
    except RecursionError:
        raise _JsonProblem("invalid JSON (nested too deeply)") from None
    except ValueError:  # an integer past Python's int_max_str_digits (4300 digits)
        raise _JsonProblem("invalid JSON (a number with too many digits)") from None
    return value, end, (repeated[0] if repeated else None)


def _decode_document(text):
    """(value, repeated_key) of a text holding one JSON value, whitespace around it allowed."""
    value, end, repeated = _decode_json(text, _JSON_WHITESPACE.match(text).end())
    end = _JSON_WHITESPACE.match(text, end).end()
    if end != len(text):
        error = json.JSONDecodeError("Extra data", text, end)
        raise _JsonProblem(f"invalid JSON (Extra data, column {error.colno})", error.lineno)
    return value, repeated


def _add_record(records, record, repeated_key, skip_invalid):
    """Keep a decoded record if it is an object without repeated keys."""
    if not isinstance(record.fields, dict):
        _invalid(record, None, f"expected a JSON object, got {type(record.fields).__name__}", skip_invalid,
                 records.skipped)
    elif repeated_key is not None:
        _invalid(record, _clip(repeated_key), "appears twice in one JSON object (JSON would keep only the last "
                 "value silently); remove one", skip_invalid, records.skipped)
    else:
        records.append(record)


def _read_json(path, text, skip_invalid):
    if text.startswith("[", _JSON_WHITESPACE.match(text).end()):
        return _read_json_array(path, text, skip_invalid)
    try:
        data, _ = _decode_document(text)
    except _JsonProblem as problem:
        if text.lstrip().startswith("{"):  # a .json file that is really JSON Lines
            return _read_jsonl(path, text, skip_invalid)
        raise UserError(f"{path} line {problem.line or 1}: {problem.problem}") from None
    raise UserError(f"{path}: expected a JSON array of records (or JSON Lines), "
                    f"got a JSON {type(data).__name__}")


def _read_json_array(path, text, skip_invalid):
    """The records of a JSON array, decoded one element at a time.

    Element by element so that a record nested too deeply is reported by its line, and a
    record with a repeated key is named (and can be skipped) like any other bad record.
    """
    records = ExampleList()
    position = _JSON_WHITESPACE.match(text, _JSON_WHITESPACE.match(text).end() + 1).end()  # after "["
    if not text.startswith("]", position):
        for number in itertools.count(1):
            try:
                item, position, repeated = _decode_json(text, position)
            except _JsonProblem as problem:
                line = problem.line or text.count("\n", 0, position) + 1
                raise UserError(f"{path} line {line}: {problem.problem}") from None
            _add_record(records, Record(str(path), f"record {number}", item), repeated, skip_invalid)
            position = _JSON_WHITESPACE.match(text, position).end()
            if text.startswith("]", position):
                break
            if not text.startswith(",", position):
                _raise_json_syntax(path, "Expecting ',' delimiter", text, position)
            position = _JSON_WHITESPACE.match(text, position + 1).end()
    end = _JSON_WHITESPACE.match(text, position + 1).end()
    if end != len(text):
        _raise_json_syntax(path, "Extra data", text, end)
    return records


def _raise_json_syntax(path, message, text, position):
    error = json.JSONDecodeError(message, text, position)
    raise UserError(f"{path} line {error.lineno}: invalid JSON ({message}, column {error.colno})")


def _read_jsonl(path, text, skip_invalid):
    records = ExampleList()
    # split on "\n" only: str.splitlines() also breaks at U+2028, form feeds etc., which
    # json.dumps(ensure_ascii=False) leaves raw inside strings
    for line_number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        record = Record(str(path), f"line {line_number}", None)
        try:
            record.fields, repeated = _decode_document(line)
        except _JsonProblem as problem:
            _invalid(record, None, problem.problem, skip_invalid, records.skipped)
            continue
        _add_record(records, record, repeated, skip_invalid)
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


def _invalid(record, field_name, problem, skip_invalid, skipped):
    """Raise a RecordError, or (with --skip-invalid) note it in ``skipped`` and carry on."""
    error = RecordError(f"{record.where(field_name)}: {problem}")
    if not skip_invalid:
        raise error
    skipped.append(str(error))


def report_skipped(*collections, stream=None):
    """Print how many records --skip-invalid dropped from these lists (with the first few reasons);
    return the count."""
    messages = [message for collection in collections for message in getattr(collection, "skipped", ())]
    if messages:
        print(f"--skip-invalid: dropped {len(messages)} invalid record(s), e.g.:", file=stream or sys.stderr)
        for message in messages[:MAX_ERRORS_SHOWN]:
            print(f"  {message}", file=stream or sys.stderr)
    return len(messages)


# ---------------------------------------------------------------- field validation

def require_text(record, name, allow_empty=False):
    """A string field; empty or whitespace-only text is an error unless allowed."""
    if name not in record.fields or record.fields[name] is None:
        raise RecordError(f"{record.where(name)}: missing")
    value = check_string(record, name, record.fields[name])
    if not allow_empty and not value.strip():
        raise RecordError(f"{record.where(name)}: empty text")
    return value


def check_string(record, name, value):
    """``value`` if it is a string the tokenizer can encode, else a RecordError naming the field.

    JSON may spell a lone UTF-16 surrogate ("\\ud800"); Python keeps it in the str, and the
    tokenizer (and any UTF-8 output) fails on it with a TypeError far from the record.
    """
    if not isinstance(value, str):
        raise RecordError(f"{record.where(name)}: expected a string, got {type(value).__name__}")
    return check_encodable(record.where(name), value)


def check_encodable(where, value):
    """``value`` (a str) if UTF-8 can encode it, else a RecordError at ``where`` naming the lone surrogate."""
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as error:
            raise RecordError(f"{where}: lone UTF-16 surrogate {value[error.start]!r} at character "
                              f"{error.start} (not a character; the text cannot be encoded as UTF-8)") from None
    return value


def _clip(text, limit=60):
    """``text`` cut to ``limit`` characters, so an error line never echoes a megabyte of input."""
    return text if len(text) <= limit else text[:limit - 3] + "..."


def require_number(record, name, default=None, low=None, high=None):
    """A finite number within [low, high]; CSV strings are converted."""
    value = record.fields.get(name, default)
    if value is None or value == "":
        if default is not None:
            return default
        raise RecordError(f"{record.where(name)}: missing")
    number = parse_number(record.where(name), value)
    if (low is not None and number < low) or (high is not None and number > high):
        advice = f"; rescale the field's values into [{low:g}, {high:g}]" if None not in (low, high) else ""
        raise RecordError(f"{record.where(name)}: {number} is outside [{low}, {high}]{advice}")
    return number


def parse_number(where, value):
    """A finite float from a JSON number or a numeric string (CSV), at most ``MAX_TRAINABLE_MAGNITUDE``
    in size; a RecordError naming ``where`` otherwise. Every number read from a data file (regression
    targets, pair rel and weight, query-group scores) comes through here."""
    if isinstance(value, bool):
        raise RecordError(f"{where}: expected a number, got a boolean")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise RecordError(f"{where}: expected a number, got {short_repr(value)}") from None
    except OverflowError:  # an integer too large for a float
        number = math.inf
    if not math.isfinite(number):
        raise RecordError(f"{where}: must be a finite number, got {short_repr(value)}")
    if abs(number) > MAX_TRAINABLE_MAGNITUDE:
        raise RecordError(f"{where}: {short_repr(value)} is too large for float32 training (its square overflows); "
                          f"keep it within +-{MAX_TRAINABLE_MAGNITUDE:.3g} (rescale the values)")
    return number


def parse_each(records, parse, skip_invalid):
    """Apply ``parse(record)`` to every record; with skip_invalid, drop RecordErrors and note them.

    The result is an ExampleList whose ``skipped`` holds the records' own dropped ones too.
    """
    parsed = ExampleList(skipped=getattr(records, "skipped", ()))
    parsed.record_format = getattr(records, "record_format", ExampleList.record_format)
    for record in records:
        try:
            parsed.append(parse(record))
        except RecordError as error:
            if not skip_invalid:
                raise
            parsed.skipped.append(str(error))
    return parsed


def text_fields(example):
    """(field name, text) of each text an example is trained on, named as in its record: a classifier
    example's text (its context is optional, so an emptied one is no context), a pair's query and
    document, a query group's query and ``pos[i]``/``neg[i]`` passages."""
    if hasattr(example, "positives"):  # common.pairs.QueryGroup (pairs imports this module)
        return [("query", example.query), *((f"pos[{index}]", text) for index, text in enumerate(example.positives)),
                *((f"neg[{index}]", text) for index, text in enumerate(example.negatives))]
    if hasattr(example, "document"):  # common.pairs.PairExample
        return [("query", example.query), ("document", example.document)]
    return [(getattr(example, "text_field", "text"), example.text)]


def clean_text(clean, text, where):
    """``clean(text)``; a TextCleaningError from it (a strip pattern out of time) gets ``where`` (the text's
    record and field, or its input) put in front."""
    try:
        return clean(text)
    except TextCleaningError as error:
        raise TextCleaningError(f"{where}: {error}") from None


def clean_texts(examples, clean, cleaning, advice, unit="texts"):
    """Every text of ``examples`` (see ``text_fields``) through ``clean``; one list of cleaned texts per example.

    A text that ``clean`` empties (--normalize dropping the emoji or links that were all of it, or a strip
    pattern deleting a whole document) would train as a bare [CLS] [SEP] under its label, without a word:
    it is refused in one line naming its file, record and field (and how many more there are).
    ``cleaning`` says what emptied it, ``advice`` how to fix it. A ``TextCleaningError`` from ``clean``
    gets the record and field put in front. ``examples`` may be {split: examples} (the result is then
    {split: cleaned}); a pair list read from a query-group file is checked as its groups.
    """
    if isinstance(examples, dict):
        return {name: clean_texts(split, clean, cleaning, advice, unit) for name, split in examples.items()}
    examples = getattr(examples, "groups", None) or examples
    cleaned, emptied = [], []
    for example in examples:
        texts = []
        for field_name, text in text_fields(example):
            texts.append(clean_text(clean, text, f"{example.locator}: field '{field_name}'"))
            if not texts[-1].strip():
                emptied.append((example.locator, field_name))
        cleaned.append(texts)
    if emptied:
        more = f" (and {len(emptied) - 1} more {unit})" if len(emptied) > 1 else ""
        where, field_name = emptied[0]
        raise UserError(f"{where}: field '{field_name}': nothing left after {cleaning}{more}; {advice}")
    return cleaned


def normalize_texts(examples, normalize):
    """``clean_texts`` for --normalize: every text normalized, one emptied by it refused in one line."""
    return clean_texts(examples, normalize, "--normalize", "keep those parts as placeholders (emoji=placeholder, "
                       "urls=placeholder, mentions=placeholder) or drop these records")


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
    text_field: str = "text"  # the field the text was read from, for error messages


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
    text_name = {"chat": "messages[1].content", "message": "message"}.get(record_format, text_field)
    if record_format == "chat":
        text, raw_label = _parse_chat(record)
        context = None
    elif record_format == "message":
        text = require_text(record, "message")
        context = record.fields.get("context") or None
        if context is not None:
            check_string(record, "context", context)
        raw_label = record.fields.get(label_field)
    else:
        text = require_text(record, text_field)
        context = None
        raw_label = record.fields.get(label_field)
    if require_label:
        raw_label = _check_raw_label(record, label_field if record_format != "chat" else "messages[-1].content",
                                     raw_label)
    group = _parse_group(record, group_field) if group_field else None
    return TextExample(text, context, raw_label, record.where(), group, text_field=text_name)


def _parse_group(record, group_field):
    """The group name of an evaluation record; records without one form a "(none)" group."""
    group = record.fields.get(group_field)
    if group in (None, ""):
        return "(none)"
    if isinstance(group, (list, dict)):
        raise RecordError(f"{record.where(group_field)}: expected a string or a number, got {type(group).__name__}")
    return check_string(record, group_field, str(group))


def _parse_chat(record):
    messages = record.fields.get("messages")
    if not isinstance(messages, list) or len(messages) < 2:
        raise RecordError(f"{record.where('messages')}: expected a list of at least two messages")
    for index in (1, -1):
        message = messages[index]
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise RecordError(f"{record.where(f'messages[{index}].content')}: expected a string")
        check_string(record, f"messages[{index}].content", message["content"])
    text = messages[1]["content"]
    if not text.strip():
        raise RecordError(f"{record.where('messages[1].content')}: empty text")
    return text, messages[-1]["content"].strip()


# ASCII digits only: "²" and "٣" pass str.isdigit(), and int() refuses the first; both are names here
INTEGER_LABEL = re.compile(r"-?[0-9]+")
MAX_LABEL_DIGITS = 18  # a longer integer label is no class id (and int() refuses past 4300 digits)


def _check_raw_label(record, label_field, raw_label):
    """The label as an int (JSON 2 or 2.0, CSV "2") or a name; anything else is a RecordError.

    A name is stripped, as --labels strips its names: "positive " would otherwise be a class of
    its own beside "positive". A name that is only whitespace is missing, like an empty one.
    """
    if isinstance(raw_label, str):
        raw_label = check_string(record, label_field, raw_label).strip()
    if raw_label is None or raw_label == "":
        raise RecordError(f"{record.where(label_field)}: missing")
    if isinstance(raw_label, float) and raw_label.is_integer():
        return int(raw_label)
    if isinstance(raw_label, bool) or not isinstance(raw_label, (int, str)):
        raise RecordError(f"{record.where(label_field)}: expected an integer or a string, "
                          f"got {type(raw_label).__name__}")
    if isinstance(raw_label, str) and INTEGER_LABEL.fullmatch(raw_label):  # CSV cells are strings: "2" is label 2
        if len(raw_label.lstrip("-")) > MAX_LABEL_DIGITS:
            raise RecordError(f"{record.where(label_field)}: integer label {short_repr(raw_label)} is too large "
                              f"(a class id has at most {MAX_LABEL_DIGITS} digits)")
        return int(raw_label)
    return raw_label


def load_text_examples(path, text_field=None, label_field=None, group_field=None,
                       skip_invalid=False, require_label=True, split=None, default_splits=("train",),
                       parse_label=None, require_group_field=False):
    """Read a classification file into TextExamples (format detected per file).

    ``parse_label(where, raw_label)``, when given, checks and converts each raw label instead of the
    single-label rules (a list of names for multi-label, a number for regression); ``where`` names
    the record and the field for its errors. With ``require_group_field`` (the file whose groups are
    reported), a ``group_field`` that no record has is refused as a misspelt field; records without
    it among records with it form the "(none)" group.
    """
    records = read_records(path, split=split, skip_invalid=skip_invalid, default_splits=default_splits)
    if require_group_field and group_field and not any(group_field in record.fields for record in records):
        raise UserError(f"{path}: field '{group_field}' (--group-field): missing from every record")
    record_format = detect_format(records[0], text_field)
    parse = lambda record: parse_labelled_example(  # noqa: E731
        record, record_format, text_field, label_field, group_field, require_label, parse_label)
    examples = parse_each(records, parse, skip_invalid)
    if not examples:
        raise UserError(f"{path}: no valid records")
    examples.record_format = record_format
    return examples


def parse_labelled_example(record, record_format, text_field=None, label_field=None, group_field=None,
                           require_label=True, parse_label=None):
    """``parse_text_example`` with the label checked by ``parse_label(where, raw_label)`` when given
    (a problem type's own rules, see load_text_examples) instead of the single-label ones."""
    example = parse_text_example(record, record_format, text_field or "text", label_field or "label",
                                 group_field, require_label and parse_label is None)
    if parse_label is not None:
        field_name = "messages[-1].content" if record_format == "chat" else label_field or "label"
        example.raw_label = parse_label(record.where(field_name), example.raw_label)
    return example


class ExampleList(list):
    """Records or examples that remember the record format of their file ('text', 'message', 'chat')
    and the messages of the records --skip-invalid dropped on the way (see report_skipped)."""
    record_format = "text"

    def __init__(self, items=(), skipped=()):
        super().__init__(items)
        self.skipped = list(skipped)


MIN_LABEL_ID_LIMIT = 100_000


def label_id_limit(record_count):
    """Integer labels read as class ids must stay below this: max(100,000, 10 x the records).

    Ids 0..max become the class names, so one typo (1e9) would allocate a billion of them.
    """
    return max(MIN_LABEL_ID_LIMIT, 10 * record_count)


class LabelSet:
    """Label names and ids. ``--labels`` fixes them; else integers keep their values
    (below ``label_id_limit``) and string names are sorted."""

    def __init__(self, names):
        self.names = list(names)
        self.ids = {name: index for index, name in enumerate(self.names)}

    @classmethod
    def from_examples(cls, examples, fixed_names=None, label_field="label"):
        """The labels of the training examples; a UserError names the first record that cannot be one."""
        if fixed_names:
            return cls(fixed_names)
        raw = {example.raw_label for example in examples}
        if all(isinstance(label, int) for label in raw):
            _check_label_ids(examples, min(raw), max(raw), label_field)
            return cls([str(index) for index in range(max(raw) + 1)])
        if any(isinstance(label, int) for label in raw):
            first_kind = isinstance(examples[0].raw_label, int)
            bad = next(e for e in examples if isinstance(e.raw_label, int) != first_kind)
            raise UserError(f"{bad.locator}: field '{label_field}': {short_repr(bad.raw_label)} mixes integer labels "
                            f"and names (record 1 has {short_repr(examples[0].raw_label)}); use one kind, or give --labels")
        return cls(sorted(raw))

    def resolve(self, examples, label_field="label"):
        """Set ``example.label`` to an id, or raise naming the record and the label."""
        for example in examples:
            example.label = self.id_of(example.raw_label, example.locator, label_field)
        return examples

    def id_of(self, raw_label, locator, label_field="label"):
        """The id of a raw label (an int is its own id), or a RecordError naming the record."""
        if isinstance(raw_label, int):
            if 0 <= raw_label < len(self.names):
                return raw_label
            raise RecordError(f"{locator}: field '{label_field}': label {short_repr(raw_label)} is out of range "
                              f"0..{len(self.names) - 1}")
        if raw_label in self.ids:
            return self.ids[raw_label]
        known = ", ".join(_clip(name) for name in self.names[:MAX_NAMES_SHOWN])
        more = f", ... ({len(self.names)} in all)" if len(self.names) > MAX_NAMES_SHOWN else ""
        raise RecordError(f"{locator}: field '{label_field}': unknown label {short_repr(raw_label)} "
                          f"(known: {known}{more})")

    @property
    def id2label(self):
        return {index: name for index, name in enumerate(self.names)}

    @property
    def label2id(self):
        return dict(self.ids)


def _check_label_ids(examples, lowest, highest, label_field):
    """Refuse a negative integer label, or one past ``label_id_limit`` of these examples."""
    limit = label_id_limit(len(examples))
    if lowest >= 0 and highest < limit:
        return
    bad = next(e for e in examples if e.raw_label == (lowest if lowest < 0 else highest))
    if lowest < 0:
        raise UserError(f"{bad.locator}: field '{label_field}': negative label {lowest}")
    raise UserError(f"{bad.locator}: field '{label_field}': integer label {short_repr(highest)} is too large: integer "
                    f"labels are class ids, below max({MIN_LABEL_ID_LIMIT:,}, 10 x {len(examples)} records) = "
                    f"{limit:,} here; use label names, or give --labels")


def resolve_labels(label_set, examples, skip_invalid, label_field="label"):
    """Resolve label ids, dropping (with --skip-invalid) records whose label is not in the set."""
    def resolve(example):
        example.label = label_set.id_of(example.raw_label, example.locator, label_field)
        return example
    return parse_each(examples, resolve, skip_invalid)


def stratified_split(examples, val_ratio, seed, label_set):
    """Split off a validation set with the class shares of the whole (scikit-learn).

    A class with a single record cannot be on both sides: refused, naming the label and its record.
    """
    from sklearn.model_selection import train_test_split
    labels = [example.label for example in examples]
    counts = np.bincount(labels)
    too_small = [index for index, count in enumerate(counts) if count == 1]
    if too_small:
        lone = [f"{short_repr(label_set.names[index])} ({next(e.locator for e in examples if e.label == index)})"
                for index in too_small[:MAX_ERRORS_SHOWN]]
        more = f", ... ({len(too_small)} in all)" if len(too_small) > MAX_ERRORS_SHOWN else ""
        raise UserError(f"the validation split would leave class(es) {', '.join(lone)}{more} empty: each has only "
                        "one training record; add data or pass --val-path")
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
    once (to measure lengths, up to ``measured_encodings``' cap) and truncate ourselves.
    """
    backend = tokenizer.backend_tokenizer
    backend.no_padding()
    backend.no_truncation()
    return backend


# Encoding a whole text only measures its length: a 30 MB line took 75 s. Past this many
# characters per kept token, only a window at the kept end is encoded (see measured_encodings).
MEASURED_CHARS_PER_TOKEN = 64
MEASURE_MARGIN_TOKENS = 128  # more than one cut word can yield (WordPiece: 100 characters at most)


def measured_encodings(backend, texts, max_length, keep_end=False):
    """Encodings (no special tokens) of ``texts`` that are exact in the ``max_length`` tokens truncation keeps.

    A text longer than ``max_length * MEASURED_CHARS_PER_TOKEN`` characters is encoded from a
    window at the end truncation keeps (the start, or the end with ``keep_end``). The window
    is used only if it yields ``MEASURE_MARGIN_TOKENS`` more tokens than ``max_length``, so
    the cut, at most one word, lies beyond what is kept; else it grows 8-fold. The length
    of such a text is then a lower bound (still above ``max_length``, so still counted truncated).
    """
    window = max_length * MEASURED_CHARS_PER_TOKEN
    short = [index for index, text in enumerate(texts) if len(text) <= window]
    encodings = [None] * len(texts)
    for index, encoding in zip(short, backend.encode_batch([texts[i] for i in short], add_special_tokens=False)):
        encodings[index] = encoding
    for index, text in enumerate(texts):
        if encodings[index] is None:
            encodings[index] = _encode_window(backend, text, window, max_length + MEASURE_MARGIN_TOKENS, keep_end)
    return encodings


def _encode_window(backend, text, window, enough_tokens, keep_end):
    while window < len(text):
        encoding = backend.encode(text[-window:] if keep_end else text[:window], add_special_tokens=False)
        if len(encoding.ids) > enough_tokens:
            return encoding
        window *= 8
    return backend.encode(text, add_special_tokens=False)


@dataclass
class EncodedBatchStats:
    """Token counts of one split for the dataset summary; ``full_lengths`` are measured before
    truncation (a lower bound for texts past ``measured_encodings``' window)."""
    full_lengths: list = field(default_factory=list)
    truncated: int = 0
    unknown_tokens: int = 0
    total_tokens: int = 0


# Tokenizing shows a bar from this many records on (below it, it takes seconds), advancing by blocks:
# one encode_batch call per block, so the bar moves and each call still runs in parallel.
TOKENIZING_PROGRESS_MIN_RECORDS = 10_000
TOKENIZING_BLOCK_RECORDS = 2_000


def tokenizing_progress(record_count, description="tokenizing"):
    """A tqdm bar over ``record_count`` records on standard error, or a disabled one.

    Shown only for ``TOKENIZING_PROGRESS_MIN_RECORDS`` records or more, on a terminal, and
    on the main process: under torchrun (RANK set) every rank tokenizes the same data.
    """
    from tqdm.auto import tqdm
    shown = record_count >= TOKENIZING_PROGRESS_MIN_RECORDS and os.environ.get("RANK", "0") == "0"
    # disable=None is tqdm's "only on a terminal": piped or logged runs get no bar lines
    return tqdm(total=record_count, desc=description, unit="record", leave=False, file=sys.stderr,
                disable=None if shown else True)


def encode_texts(tokenizer, texts, contexts, max_length, truncation_side="right", stats=None):
    """Encode texts (with optional contexts as the first segment) to id lists.

    A context is encoded as a sentence pair (context, text) with token types. When too
    long, the context is cut first, keeping its most recent end; the text itself is cut
    (on ``truncation_side``) only when it alone does not fit. Returns a list of
    ``{"input_ids", "token_type_ids"}``; a large set shows a bar (``tokenizing_progress``).
    """
    texts = list(texts)
    contexts = list(contexts) if contexts is not None else [None] * len(texts)
    encoded = []
    with tokenizing_progress(len(texts)) as progress:
        for start in range(0, len(texts), TOKENIZING_BLOCK_RECORDS):
            block = slice(start, start + TOKENIZING_BLOCK_RECORDS)
            encoded += _encode_block(tokenizer, texts[block], contexts[block], max_length, truncation_side, stats)
            progress.update(len(texts[block]))
    return encoded


def _encode_block(tokenizer, texts, contexts, max_length, truncation_side, stats):
    """``encode_texts`` for one block of texts and their contexts (None where a text has none)."""
    backend = backend_tokenizer(tokenizer)
    text_encodings = measured_encodings(backend, texts, max_length, keep_end=truncation_side == "left")
    has_context = [bool(context) for context in contexts]
    context_encodings = (measured_encodings(backend, [c or "" for c in contexts], max_length, keep_end=True)
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


def summarize_split(name, examples, label_set, stats, max_length, label_summary=None):
    """A dict describing one split: counts per class, token lengths, truncation, [UNK] rate.

    ``label_summary`` replaces the per-class counts (a problem type's own: labels per example and
    co-occurrence for multi-label, score statistics for regression; see common/problem_types.py).
    """
    if label_summary is None:
        counts = np.bincount([e.label for e in examples if e.label is not None], minlength=len(label_set.names))
        total = int(counts.sum()) or 1
        label_summary = {"classes": {label_set.names[i]: {"count": int(c), "share": round(float(c) / total, 4)}
                                     for i, c in enumerate(counts)}}
    return {
        "split": name,
        "records": len(examples),
        **label_summary,
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
        for name, entry in summary.get("classes", {}).items():
            lines.append(f"      {name:<20} {entry['count']:>7}  {entry['share']:6.1%}")
        if "labels_per_example" in summary:
            per_example = summary["labels_per_example"]
            lines.append(f"      labels per record: mean {per_example['mean']}; " +
                         ", ".join(f"{key}: {value}" for key, value in per_example.items() if key != "mean"))
            if summary.get("co_occurring_pairs"):
                lines.append("      most frequent pairs: " + ", ".join(
                    f"{first}+{second} {count}" for first, second, count in summary["co_occurring_pairs"]))
        if summary.get("scores"):
            lines.append("      scores: " + ", ".join(f"{key} {value:g}" for key, value in summary["scores"].items()))
    return "\n".join(lines)
