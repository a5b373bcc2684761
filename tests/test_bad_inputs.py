"""Malformed inputs, one table: every case must end with exit code 2 and exactly one
``error: ...`` line on stderr naming the file, the record or line and the field, no
traceback, and every file that existed under the output directory unchanged byte for byte.
Trainers write to a new run directory inside it (a directory holding an earlier run is
refused before any data is read unless --overwrite-output-dir is given; that case has a test
of its own at the end).

Data errors must be found before anything expensive: for those cases loading a model or
tokenizer fails the test. A few cases run in a subprocess, where "no traceback" is about
the real process. Inputs that must be ACCEPTED (UTF-8 BOM, CSV with quoted newlines, a
1 MB text, which is truncated) are checked at the end.

The trainers that exist are covered; cases for a script not yet in the repository skip.
"""
import contextlib
import csv
import importlib
import io
import json
import os
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import transformers

from conftest import make_text_records

REPO = Path(__file__).resolve().parents[1]
ONE_MEGABYTE = 1024 * 1024
LONGEST_ERROR_LINE = 600  # an error must not echo a megabyte of input back


@dataclass
class Case:
    """One malformed input: what to write, which flags to pass, what the error line must contain.

    ``files`` maps a file name (in the case's tmp dir) to str/bytes/records; ``argv`` and
    ``expected`` may use ``{name}`` for the path of a written file and ``{out}``, ``{tiny}``,
    ``{model}`` (a classifier model directory). ``data_error`` cases forbid model loading.
    """
    name: str
    script: str
    files: dict
    argv: list
    expected: list
    data_error: bool = True
    exit_code: int = 2
    extra_files: dict = field(default_factory=dict)


def jsonl(records):
    return "\n".join(json.dumps(record, ensure_ascii=False) for record in records) + "\n"


def csv_text(rows, header=("text", "label")):
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


GOOD = make_text_records(6)
GOOD_JSONL = jsonl(GOOD)


def with_record(index, record):
    """The good records with record ``index`` (0-based; line index+1) replaced."""
    return jsonl(GOOD[:index] + [record] + GOOD[index + 1:])


def with_line(index, raw_line):
    """The good records as JSONL with line ``index + 1`` replaced by ``raw_line``."""
    lines = GOOD_JSONL.splitlines()
    lines[index] = raw_line
    return "\n".join(lines) + "\n"


def train(data_name, *extra):
    return ["--data-path", "{%s}" % data_name, *extra]


@dataclass(frozen=True)
class Special:
    """A case file that is not plain content: a FIFO, or a symbolic link to ``target``."""
    kind: str  # "fifo" or "link"
    target: str = ""


FIFO = Special("fifo")
INT_GOOD = [{"text": record["text"], "label": int(record["label"] == "positive")} for record in GOOD]


SCORES = [{"text": "good movie", "label": 0.9}, {"text": "bad", "label": 0.1}, {"text": "ok", "label": 0.8}]


def with_int_label(index, label):
    """The good records with integer labels, record ``index`` (line index+1) labelled ``label``."""
    return jsonl(INT_GOOD[:index] + [dict(INT_GOOD[index], label=label)] + INT_GOOD[index + 1:])


def nested(depth):
    return "[" * depth + "]" * depth


# ---------------------------------------------------------------- train_classifier.py

CLASSIFIER_CASES = [
    Case("invalid-json-array", "classifier", {"d.json": '[{"text": "good", "label": "a"},\n{"text": "bad" "label": 1}]'},
         train("d.json"), ["{d.json} line 2", "invalid JSON"]),
    Case("json-object-not-a-list", "classifier", {"d.json": '{"data": [{"text": "good", "label": 0}]}'},
         train("d.json"), ["{d.json}", "expected a JSON array"]),
    Case("json-string-not-a-list", "classifier", {"d.json": '"just a string"'},
         train("d.json"), ["{d.json}", "expected a JSON array"]),
    Case("json-array-of-numbers", "classifier", {"d.json": "[1, 2, 3]"},
         train("d.json"), ["{d.json} record 1", "expected a JSON object"]),
    Case("jsonl-invalid-line", "classifier", {"d.jsonl": with_line(1, '{"text": "good", label: 1}')},
         train("d.jsonl"), ["{d.jsonl} line 2", "invalid JSON"]),
    Case("jsonl-line-is-an-array", "classifier", {"d.jsonl": with_record(2, ["good", 1])},
         train("d.jsonl"), ["{d.jsonl} line 3", "expected a JSON object"]),
    Case("text-is-a-number", "classifier", {"d.jsonl": with_record(1, {"text": 42, "label": "positive"})},
         train("d.jsonl"), ["{d.jsonl} line 2", "field 'text'", "expected a string"]),
    Case("text-is-a-list", "classifier", {"d.jsonl": with_record(3, {"text": ["good"], "label": "positive"})},
         train("d.jsonl"), ["{d.jsonl} line 4", "field 'text'", "expected a string"]),
    Case("label-is-a-list", "classifier", {"d.jsonl": with_record(2, {"text": "good", "label": ["positive"]})},
         train("d.jsonl"), ["{d.jsonl} line 3", "field 'label'", "expected an integer or a string"]),
    Case("label-is-a-fraction", "classifier", {"d.jsonl": with_record(2, {"text": "good", "label": 1.5})},
         train("d.jsonl"), ["{d.jsonl} line 3", "field 'label'", "expected an integer or a string"]),
    Case("label-is-a-boolean", "classifier", {"d.jsonl": with_record(0, {"text": "good", "label": True})},
         train("d.jsonl"), ["{d.jsonl} line 1", "field 'label'"]),
    Case("text-missing", "classifier", {"d.jsonl": with_record(4, {"label": "positive"})},
         train("d.jsonl"), ["{d.jsonl} line 5", "field 'text'", "missing"]),
    Case("text-null", "classifier", {"d.jsonl": with_record(4, {"text": None, "label": "positive"})},
         train("d.jsonl"), ["{d.jsonl} line 5", "field 'text'", "missing"]),
    Case("label-missing", "classifier", {"d.jsonl": with_record(5, {"text": "good"})},
         train("d.jsonl"), ["{d.jsonl} line 6", "field 'label'", "missing"]),
    Case("label-empty-string", "classifier", {"d.jsonl": with_record(5, {"text": "good", "label": ""})},
         train("d.jsonl"), ["{d.jsonl} line 6", "field 'label'", "missing"]),
    Case("unknown-label-name", "classifier", {"d.jsonl": with_record(3, {"text": "good", "label": "postive"})},
         train("d.jsonl", "--labels", "negative,positive"), ["{d.jsonl} line 4", "field 'label'", "unknown label 'postive'"]),
    Case("label-out-of-range", "classifier",
         {"d.jsonl": jsonl([{"text": r["text"], "label": int(r["label"] == "positive")} for r in GOOD[:5]]
                           + [{"text": "good", "label": 7}])},
         train("d.jsonl", "--labels", "negative,positive"), ["{d.jsonl} line 6", "field 'label'", "out of range"]),
    Case("negative-label", "classifier",
         {"d.jsonl": jsonl([{"text": "good", "label": 1}, {"text": "bad", "label": -1}] * 3)},
         train("d.jsonl"), ["{d.jsonl} line 2", "field 'label'", "negative label"]),
    Case("labels-mix-integers-and-names", "classifier",
         {"d.jsonl": jsonl([{"text": "good", "label": "positive"}, {"text": "bad", "label": 0}] * 3)},
         train("d.jsonl"), ["{d.jsonl} line 2", "field 'label'", "mix"]),
    Case("empty-text", "classifier", {"d.jsonl": with_record(2, {"text": "", "label": "positive"})},
         train("d.jsonl"), ["{d.jsonl} line 3", "field 'text'", "empty"]),
    Case("whitespace-only-text", "classifier", {"d.jsonl": with_record(2, {"text": " \t\u3000 ", "label": "positive"})},
         train("d.jsonl"), ["{d.jsonl} line 3", "field 'text'", "empty"]),
    Case("message-format-empty-message", "classifier",
         {"d.jsonl": jsonl([{"message": "good", "context": "", "label": 1}, {"message": "  ", "context": "hi",
                                                                             "label": 0}])},
         train("d.jsonl"), ["{d.jsonl} line 2", "field 'message'", "empty"]),
    Case("message-format-context-not-a-string", "classifier",
         {"d.jsonl": jsonl([{"message": "good", "context": "", "label": 1}, {"message": "bad", "context": 5,
                                                                             "label": 0}])},
         train("d.jsonl"), ["{d.jsonl} line 2", "field 'context'", "expected a string"]),
    Case("chat-messages-not-a-list", "classifier",
         {"d.json": json.dumps([{"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "good"},
                                              {"role": "assistant", "content": "a"}]},
                                {"messages": "good"}])},
         train("d.json"), ["{d.json} record 2", "field 'messages'"]),
    Case("chat-content-not-a-string", "classifier",
         {"d.json": json.dumps([{"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": 3},
                                              {"role": "assistant", "content": "a"}]}])},
         train("d.json"), ["{d.json} record 1", "field 'messages[1].content'", "expected a string"]),
    Case("one-megabyte-line-of-invalid-json", "classifier",
         {"d.jsonl": GOOD_JSONL + '{"text": "' + "x" * ONE_MEGABYTE + '", "label": }\n'},
         train("d.jsonl"), ["{d.jsonl} line 13", "invalid JSON"]),
    Case("not-utf8", "classifier", {"d.jsonl": GOOD_JSONL.encode() + '{"text": "café", "label": "positive"}\n'
                                    .encode("latin-1")},
         train("d.jsonl"), ["{d.jsonl} line 13", "not valid UTF-8"]),
    Case("utf16-file", "classifier", {"d.jsonl": GOOD_JSONL.encode("utf-16")},
         train("d.jsonl"), ["{d.jsonl} line 1", "not valid UTF-8"]),
    Case("empty-file", "classifier", {"d.jsonl": ""}, train("d.jsonl"), ["{d.jsonl}", "empty"]),
    Case("whitespace-only-file", "classifier", {"d.json": " \n\n\t\n"}, train("d.json"), ["{d.json}", "empty"]),
    Case("header-only-csv", "classifier", {"d.csv": "text,label\n"}, train("d.csv"), ["{d.csv}", "only a header"]),
    Case("csv-row-with-extra-columns", "classifier", {"d.csv": csv_text([("good", "positive"), ("bad", "negative", "x")])},
         train("d.csv"), ["{d.csv} line 3", "more columns"]),
    Case("csv-quoted-newline-then-empty-text", "classifier",
         {"d.csv": csv_text([("good\nmovie", "positive"), ("bad", "negative"), ("", "negative")])},
         train("d.csv"), ["{d.csv} line 5", "field 'text'", "empty"]),  # record 1 spans lines 2-3
    Case("csv-unterminated-quote", "classifier", {"d.csv": 'text,label\n"good movie,positive\nbad,negative\n'},
         train("d.csv"), ["{d.csv} line 2", "field 'label'", "missing"]),
    Case("csv-label-column-missing", "classifier", {"d.csv": csv_text([("good",), ("bad",)], header=("text",))},
         train("d.csv"), ["{d.csv} line 2", "field 'label'", "missing"]),
    Case("tsv-text-field-flag-names-absent-column", "classifier", {"d.tsv": "review\tlabel\ngood\t1\nbad\t0\n"},
         train("d.tsv", "--text-field", "text"), ["{d.tsv} line 2", "field 'text'", "missing"]),
    Case("directory-instead-of-file", "classifier", {"d.json/": None}, train("d.json"), ["{d.json}", "directory"]),
    Case("missing-file", "classifier", {}, ["--data-path", "{out}/../nowhere.jsonl"], ["nowhere.jsonl", "not found"]),
    Case("bad-record-in-val-path", "classifier", {"d.jsonl": GOOD_JSONL, "v.jsonl": with_record(1, {"text": "ok"})},
         train("d.jsonl", "--val-path", "{v.jsonl}"), ["{v.jsonl} line 2", "field 'label'", "missing"]),
    Case("unknown-label-in-test-path", "classifier",
         {"d.jsonl": GOOD_JSONL, "t.jsonl": with_record(0, {"text": "ok", "label": "neutral"})},
         train("d.jsonl", "--test-path", "{t.jsonl}", "--val-ratio", "0.5"),
         ["{t.jsonl} line 1", "field 'label'", "unknown label 'neutral'"]),
    Case("one-class", "classifier", {"d.jsonl": jsonl([{"text": "good", "label": "positive"}] * 10)},
         train("d.jsonl", "--val-path", "{d.jsonl}"), ["only one class", "positive"]),
    Case("validation-split-leaves-a-class-empty", "classifier",
         {"d.jsonl": jsonl([{"text": "good", "label": "positive"}] * 5 + [{"text": "bad", "label": "negative"}])},
         train("d.jsonl"), ["validation split", "empty"]),
    Case("num-labels-disagrees", "classifier", {"d.jsonl": GOOD_JSONL}, train("d.jsonl", "--num-labels", "3"),
         ["--num-labels 3"]),
    Case("output-dir-is-a-file", "classifier", {"d.jsonl": GOOD_JSONL}, train("d.jsonl", "--output-dir", "{sentinel}"),
         ["--output-dir", "is a file"]),
    Case("output-dir-under-a-file", "classifier", {"d.jsonl": GOOD_JSONL},
         train("d.jsonl", "--output-dir", "{sentinel}/run"), ["--output-dir", "cannot write"]),
    Case("config-not-yaml", "classifier", {"d.jsonl": GOOD_JSONL, "c.yaml": "training: [epochs: 3\n"},
         train("d.jsonl", "--config", "{c.yaml}"), ["{c.yaml}", "invalid YAML"]),
    Case("model-name-not-a-model", "classifier", {"d.jsonl": GOOD_JSONL, "empty-model/": None},
         train("d.jsonl", "--model-name", "{empty-model}", "--val-ratio", "0.5"), ["{empty-model}"], data_error=False),
    Case("eval-only-model-path-not-a-model", "classifier", {"t.jsonl": GOOD_JSONL, "not-a-model/": None},
         ["--eval-only", "--model-path", "{not-a-model}", "--test-path", "{t.jsonl}"],
         ["{not-a-model}", "not a model directory"], data_error=False),
    Case("eval-only-truncated-weights", "classifier", {"t.jsonl": GOOD_JSONL},
         ["--eval-only", "--model-path", "{truncated}", "--test-path", "{t.jsonl}"],
         ["model.safetensors", "truncated"], data_error=False),
    Case("resume-path-is-not-a-checkpoint", "classifier", {"d.jsonl": GOOD_JSONL},
         train("d.jsonl", "--val-ratio", "0.5", "--resume", "{model}"), ["--resume", "trainer_state.pt"],
         data_error=False),
]

# hostile data files (review hostile-inputs.md F4, F5, F8, F9, F15, repeated keys); the same
# readers serve every script, so a few are repeated for the others below
HOSTILE_DATA_CASES = [
    Case("lone-surrogate-text", "classifier", {"d.jsonl": with_line(2, '{"text": "bad \\ud800 text", "label": "a"}')},
         train("d.jsonl"), ["{d.jsonl} line 3", "field 'text'", "lone UTF-16 surrogate"]),
    Case("lone-surrogate-context", "classifier",
         {"d.jsonl": '{"message": "good", "context": "", "label": 1}\n'
                     '{"message": "bad", "context": "hi \\udfff", "label": 0}\n'},
         train("d.jsonl"), ["{d.jsonl} line 2", "field 'context'", "surrogate"]),
    Case("lone-surrogate-chat-content", "classifier",
         {"d.json": '[{"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "\\ud83d!"}, '
                    '{"role": "assistant", "content": "a"}]}]'},
         train("d.json"), ["{d.json} record 1", "field 'messages[1].content'", "surrogate"]),
    Case("lone-surrogate-label", "classifier", {"d.jsonl": with_line(1, '{"text": "good", "label": "pos\\udc80"}')},
         train("d.jsonl"), ["{d.jsonl} line 2", "field 'label'", "surrogate"]),
    Case("encoded-surrogate-in-csv-is-not-utf8", "classifier",
         {"d.csv": csv_text([("good", "positive")]).encode() + b"bad \xed\xa0\x80,negative\n"},
         train("d.csv"), ["{d.csv} line 3", "not valid UTF-8"]),
    Case("integer-label-a-billion", "classifier", {"d.jsonl": with_int_label(5, 1_000_000_000)},
         train("d.jsonl"), ["{d.jsonl} line 6", "field 'label'", "1000000000 is too large", "100,000"]),
    Case("integer-label-1e18-as-float", "classifier",
         {"d.jsonl": jsonl(INT_GOOD[:3]) + '{"text": "x", "label": 1e18}\n'},
         train("d.jsonl"), ["{d.jsonl} line 4", "field 'label'", "too large"]),
    Case("integer-label-30-digits-in-csv", "classifier", {"d.csv": csv_text([("good", "1"), ("bad", "9" * 30)])},
         train("d.csv"), ["{d.csv} line 3", "field 'label'", "too large"]),
    Case("integer-label-5000-digits", "classifier",
         {"d.jsonl": with_line(1, '{"text": "x", "label": 1%s}' % ("0" * 5000))},
         train("d.jsonl"), ["{d.jsonl} line 2", "invalid JSON", "too many digits"]),
    Case("integer-label-a-billion-in-val-path", "classifier",
         {"d.jsonl": jsonl(INT_GOOD), "v.jsonl": with_int_label(1, 10 ** 9)},
         train("d.jsonl", "--val-path", "{v.jsonl}"), ["{v.jsonl} line 2", "field 'label'", "out of range"]),
    Case("integer-label-a-billion-in-test-path", "classifier",
         {"d.jsonl": jsonl(INT_GOOD), "t.jsonl": with_int_label(2, 10 ** 9)},
         train("d.jsonl", "--test-path", "{t.jsonl}", "--val-ratio", "0.5"),
         ["{t.jsonl} line 3", "field 'label'", "out of range"]),
    Case("eval-only-integer-label-a-billion", "classifier", {"t.jsonl": with_int_label(0, 10 ** 9)},
         ["--eval-only", "--model-path", "{model}", "--test-path", "{t.jsonl}"],
         ["{t.jsonl} line 1", "field 'label'", "out of range"], data_error=False),
    Case("deeply-nested-json-file", "classifier", {"d.json": nested(200_000)},
         train("d.json"), ["{d.json} line 1", "invalid JSON (nested too deeply)"]),
    Case("deeply-nested-jsonl-line", "classifier", {"d.jsonl": with_line(2, nested(100_000))},
         train("d.jsonl"), ["{d.jsonl} line 3", "invalid JSON (nested too deeply)"]),
    Case("deeply-nested-record-in-json-array", "classifier",
         {"d.json": '[{"text": "good", "label": "a"},\n{"text": %s, "label": "b"}]' % nested(100_000)},
         train("d.json"), ["{d.json} line 2", "nested too deeply"]),
    Case("label-superscript-two-is-a-name", "classifier", {"d.jsonl": with_int_label(3, "²")},
         train("d.jsonl"), ["{d.jsonl} line 4", "field 'label'", "mixes integer labels and names"]),
    Case("label-double-minus-is-a-name", "classifier", {"d.jsonl": with_int_label(3, "--5")},
         train("d.jsonl"), ["{d.jsonl} line 4", "field 'label'", "mixes"]),
    Case("label-arabic-indic-digit-is-a-name", "classifier", {"d.jsonl": with_int_label(4, "٣")},
         train("d.jsonl"), ["{d.jsonl} line 5", "field 'label'", "'٣' mixes"]),
    Case("repeated-key-in-jsonl", "classifier",
         {"d.jsonl": with_line(1, '{"text": "good", "label": "positive", "label": "negative"}')},
         train("d.jsonl"), ["{d.jsonl} line 2", "field 'label'", "appears twice"]),
    Case("repeated-key-in-json-array", "classifier",
         {"d.json": '[{"text": "good", "label": "a"},\n {"text": "x", "text": "y", "label": "b"}]'},
         train("d.json"), ["{d.json} record 2", "field 'text'", "appears twice"]),
    Case("repeated-key-in-a-chat-message", "classifier",
         {"d.json": '[{"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "a", '
                    '"content": "b"}, {"role": "assistant", "content": "a"}]}]'},
         train("d.json"), ["{d.json} record 1", "field 'content'", "appears twice"]),
    Case("fifo-as-data-path", "classifier", {"d.jsonl": FIFO}, train("d.jsonl"),
         ["{d.jsonl}", "not a regular file (a FIFO)"]),
    Case("symlink-loop-as-data-path", "classifier", {"d.jsonl": Special("link", "d.jsonl")}, train("d.jsonl"),
         ["{d.jsonl}", "symbolic link loop"]),
    Case("dangling-symlink-as-data-path", "classifier", {"d.jsonl": Special("link", "gone.jsonl")},
         train("d.jsonl"), ["{d.jsonl}", "not found", "gone.jsonl"]),
    Case("unknown-label-among-300-names-is-one-short-line", "classifier",
         {"d.jsonl": jsonl([{"text": "good", "label": f"class-{index}"} for index in range(300)]),
          "v.jsonl": jsonl([{"text": "good", "label": "nope"}])},
         train("d.jsonl", "--val-path", "{v.jsonl}"), ["{v.jsonl} line 1", "unknown label 'nope'", "300 in all"]),
    Case("unknown-megabyte-label-is-clipped", "classifier",
         {"d.jsonl": GOOD_JSONL, "v.jsonl": jsonl([{"text": "good", "label": "x" * ONE_MEGABYTE}])},
         train("d.jsonl", "--val-path", "{v.jsonl}"), ["{v.jsonl} line 1", "unknown label 'xxx"]),
    Case("group-field-is-a-list", "classifier", {"d.jsonl": jsonl([dict(r, topic=["a"]) for r in GOOD])},
         train("d.jsonl", "--group-field", "topic"), ["{d.jsonl} line 1", "field 'topic'", "expected a string"]),
    # a misspelt --group-field used to be accepted, every record then in one "(none)" group
    Case("group-field-in-no-record", "classifier", {"d.jsonl": GOOD_JSONL},
         train("d.jsonl", "--group-field", "topic"), ["{d.jsonl}: field 'topic'", "missing from every record"]),
    Case("group-field-in-no-record-of-the-test-path", "classifier",
         {"d.jsonl": jsonl([dict(r, topic="a") for r in GOOD]), "t.jsonl": GOOD_JSONL},
         train("d.jsonl", "--test-path", "{t.jsonl}", "--val-ratio", "0.5", "--group-field", "topic"),
         ["{t.jsonl}: field 'topic'", "missing from every record"]),
    # label names are stripped: "neutral " is "neutral", and a lone record of it names the label and the record
    Case("label-whitespace-only", "classifier", {"d.jsonl": with_record(5, {"text": "good", "label": " \t "})},
         train("d.jsonl"), ["{d.jsonl} line 6", "field 'label'", "missing"]),
    Case("validation-split-names-the-lone-label-and-its-record", "classifier",
         {"d.jsonl": GOOD_JSONL + jsonl([{"text": "so so", "label": "neutral "}])},
         train("d.jsonl"), ["validation split", "class(es) 'neutral' ({d.jsonl} line 13) empty"]),
    # finite in float64 but not trainable in float32: used to crash after training (Ridge, metrics)
    Case("regression-label-1e308", "classifier", {"d.jsonl": jsonl(SCORES + [{"text": "x", "label": 1e308}])},
         train("d.jsonl", "--problem-type", "regression"), ["{d.jsonl} line 4", "field 'label'", "too large"]),
    Case("regression-label-minus-3e38-in-csv", "classifier",
         {"d.csv": csv_text([(r["text"], r["label"]) for r in SCORES] + [("x", "-3e38")])},
         train("d.csv", "--problem-type", "regression"), ["{d.csv} line 5", "field 'label'", "too large"]),
]

# ---------------------------------------------------------------- infer.py and export_onnx.py

INFER_CASES = [
    Case("infer-model-path-missing", "infer", {}, ["--model-path", "{out}/../no-model", "--text", "good"],
         ["no-model", "not found"], data_error=False),
    Case("infer-model-path-not-a-model", "infer", {"not-a-model/": None}, ["--model-path", "{not-a-model}",
                                                                          "--text", "good"],
         ["{not-a-model}", "not a model directory"], data_error=False),
    Case("infer-hub-checkpoint-without-toolkit-block", "infer", {}, ["--model-path", "{tiny}", "--text", "good"],
         ["config.json", "field 'toolkit'"], data_error=False),
    Case("infer-truncated-weights", "infer", {}, ["--model-path", "{truncated}", "--text", "good"],
         ["model.safetensors", "truncated"], data_error=False),
    Case("infer-config-not-json", "infer", {}, ["--model-path", "{broken-config}", "--text", "good"],
         ["config.json", "invalid JSON"], data_error=False),
    Case("infer-file-missing", "infer", {}, ["--model-path", "{model}", "--file", "{out}/../absent.jsonl"],
         ["absent.jsonl", "not found"], data_error=False),
    Case("infer-file-empty", "infer", {"in.jsonl": ""}, ["--model-path", "{model}", "--file", "{in.jsonl}"],
         ["{in.jsonl}", "empty"], data_error=False),
    Case("infer-file-not-utf8", "infer", {"in.txt": "good\n".encode() + "café\n".encode("latin-1")},
         ["--model-path", "{model}", "--file", "{in.txt}"], ["{in.txt}", "UTF-8"], data_error=False),
    Case("infer-file-json-not-a-list", "infer", {"in.json": '{"text": "good"}'},
         ["--model-path", "{model}", "--file", "{in.json}"], ["{in.json}", "expected a JSON array"], data_error=False),
    Case("infer-file-is-a-directory", "infer", {"in.jsonl/": None}, ["--model-path", "{model}", "--file",
                                                                    "{in.jsonl}"],
         ["{in.jsonl}", "directory"], data_error=False),
    Case("infer-temperature-zero", "infer", {}, ["--model-path", "{model}", "--text", "good", "--temperature", "0"],
         ["--temperature"], data_error=False),
    Case("infer-file-fifo", "infer", {"in.jsonl": FIFO}, ["--model-path", "{model}", "--file", "{in.jsonl}"],
         ["{in.jsonl}", "not a regular file"], data_error=False),
    Case("infer-file-deeply-nested-json", "infer", {"in.json": nested(200_000)},
         ["--model-path", "{model}", "--file", "{in.json}"], ["{in.json} line 1", "nested too deeply"],
         data_error=False),
    Case("infer-file-lone-surrogate", "infer", {"in.jsonl": '{"text": "good"}\n{"text": "\\ud800"}\n{"text": "bad"}\n'},
         ["--model-path", "{model}", "--file", "{in.jsonl}"], ["{in.jsonl} line 2", "field 'text'", "surrogate"],
         data_error=False, exit_code=1),
    Case("infer-file-repeated-key", "infer", {"in.jsonl": '{"text": "good"}\n{"text": "a", "text": "b"}\n'},
         ["--model-path", "{model}", "--file", "{in.jsonl}"], ["{in.jsonl} line 2", "field 'text'", "appears twice"],
         data_error=False, exit_code=1),
    # one bad record among good ones is skipped and reported by line; the others are still answered (exit 1)
    Case("infer-file-one-bad-record", "infer", {"in.jsonl": jsonl([{"text": "good"}, {"text": 3}, {"text": "bad"}])},
         ["--model-path", "{model}", "--file", "{in.jsonl}"], ["{in.jsonl} line 2", "field 'text'"],
         data_error=False, exit_code=1),
]

EXPORT_CASES = [
    Case("export-model-path-missing", "export", {}, ["--model-path", "{out}/../no-model", "--output-path",
                                                     "{out}/model.onnx"], ["no-model"], data_error=False),
    Case("export-model-path-not-a-model", "export", {"not-a-model/": None},
         ["--model-path", "{not-a-model}", "--output-path", "{out}/model.onnx"],
         ["{not-a-model}", "not a model directory"], data_error=False),
    Case("export-truncated-weights", "export", {}, ["--model-path", "{truncated}", "--output-path",
                                                    "{out}/model.onnx"],
         ["model.safetensors", "truncated"], data_error=False),
    Case("export-output-path-not-onnx", "export", {}, ["--model-path", "{model}", "--output-path", "{out}/model.bin"],
         ["--output-path", ".onnx"], data_error=False),
    Case("export-output-path-under-a-file", "export", {},
         ["--model-path", "{model}", "--output-path", "{sentinel}/model.onnx"], ["{sentinel}"], data_error=False),
    Case("export-validate-needs-an-onnx-file", "export", {}, ["--model-path", "{model}", "--validate"],
         ["--validate", ".onnx"], data_error=False),
    Case("export-max-length-beyond-positions", "export", {},
         ["--model-path", "{model}", "--output-path", "{out}/model.onnx", "--max-length", "100000"],
         ["--max-length"], data_error=False),
]

# ---------------------------------------------------------------- train_vector.py and train_longdoc.py

PAIRS = [{"query": "good movie", "document": "a great film", "rel": 1.0},
         {"query": "good movie", "document": "stock price", "rel": 0.0, "weight": 2.0},
         {"query": "music", "document": "a song", "rel": 0.8}]
PAIRS_JSONL = jsonl(PAIRS)


def with_pair(index, pair):
    return jsonl(PAIRS[:index] + [pair] + PAIRS[index + 1:])


def pairs(train_file, *extra):
    return ["--train-path", "{%s}" % train_file, "--val-path", "{v.jsonl}", *extra]


VECTOR_CASES = [
    Case("vector-rel-above-one", "vector", {"t.jsonl": with_pair(1, dict(PAIRS[1], rel=1.5)), "v.jsonl": PAIRS_JSONL},
         pairs("t.jsonl"), ["{t.jsonl} line 2", "field 'rel'", "outside [0.0, 1.0]"]),
    Case("vector-rel-negative", "vector", {"t.jsonl": with_pair(2, dict(PAIRS[2], rel=-0.1)), "v.jsonl": PAIRS_JSONL},
         pairs("t.jsonl"), ["{t.jsonl} line 3", "field 'rel'", "outside"]),
    Case("vector-rel-nan", "vector", {"t.jsonl": with_pair(0, dict(PAIRS[0], rel=float("nan"))),
                                      "v.jsonl": PAIRS_JSONL},
         pairs("t.jsonl"), ["{t.jsonl} line 1", "field 'rel'", "finite"]),
    Case("vector-rel-not-a-number", "vector", {"t.jsonl": with_pair(0, dict(PAIRS[0], rel="high")),
                                               "v.jsonl": PAIRS_JSONL},
         pairs("t.jsonl"), ["{t.jsonl} line 1", "field 'rel'", "expected a number"]),
    Case("vector-rel-boolean", "vector", {"t.jsonl": with_pair(0, dict(PAIRS[0], rel=True)), "v.jsonl": PAIRS_JSONL},
         pairs("t.jsonl"), ["{t.jsonl} line 1", "field 'rel'"]),
    Case("vector-rel-missing", "vector", {"t.jsonl": with_pair(2, {"query": "a", "document": "b"}),
                                          "v.jsonl": PAIRS_JSONL},  # rel may be left out only for infonce
         pairs("t.jsonl", "--loss", "mse"), ["{t.jsonl} line 3", "field 'rel'", "missing"]),
    Case("vector-weight-negative", "vector", {"t.jsonl": with_pair(1, dict(PAIRS[1], weight=-2)),
                                              "v.jsonl": PAIRS_JSONL},
         pairs("t.jsonl"), ["{t.jsonl} line 2", "field 'weight'", "outside"]),
    Case("vector-weight-nan", "vector", {"t.jsonl": with_pair(1, dict(PAIRS[1], weight=float("nan"))),
                                         "v.jsonl": PAIRS_JSONL},
         pairs("t.jsonl"), ["{t.jsonl} line 2", "field 'weight'", "finite"]),
    Case("vector-weight-infinite", "vector", {"t.jsonl": with_pair(1, dict(PAIRS[1], weight=float("inf"))),
                                              "v.jsonl": PAIRS_JSONL},
         pairs("t.jsonl"), ["{t.jsonl} line 2", "field 'weight'", "finite"]),
    # 1e300 is finite, but cosent multiplies two weights: every step used to be skipped as non-finite
    Case("vector-weight-1e300", "vector", {"t.jsonl": with_pair(1, dict(PAIRS[1], weight=1e300)),
                                           "v.jsonl": PAIRS_JSONL},
         pairs("t.jsonl"), ["{t.jsonl} line 2", "field 'weight'", "too large for float32"]),
    Case("vector-pos-scores-1e300", "vector",
         {"t.jsonl": jsonl([{"query": "q", "pos": ["a"], "neg": ["b"]},
                            {"query": "r", "pos": ["c"], "pos_scores": [1e300]}]), "v.jsonl": PAIRS_JSONL},
         pairs("t.jsonl"), ["{t.jsonl} line 2", "field 'pos_scores[0]'", "too large"]),
    Case("vector-neg-scores-minus-3e38", "vector",
         {"t.jsonl": jsonl([{"query": "q", "pos": ["a"], "neg": ["b", "c"], "neg_scores": [0.1, -3e38]}]),
          "v.jsonl": PAIRS_JSONL},
         pairs("t.jsonl"), ["{t.jsonl} line 1", "field 'neg_scores[1]'", "too large"]),
    Case("rerank-weight-1e300", "classifier", {"d.jsonl": with_pair(2, dict(PAIRS[2], weight=1e300))},
         train("d.jsonl", "--problem-type", "rerank"), ["{d.jsonl} line 3", "field 'weight'", "too large"]),
    Case("vector-query-missing", "vector", {"t.jsonl": with_pair(0, {"document": "b", "rel": 1}),
                                            "v.jsonl": PAIRS_JSONL},
         pairs("t.jsonl"), ["{t.jsonl} line 1", "field 'query'", "missing"]),
    Case("vector-document-empty", "vector", {"t.jsonl": with_pair(2, dict(PAIRS[2], document="  ")),
                                             "v.jsonl": PAIRS_JSONL},
         pairs("t.jsonl"), ["{t.jsonl} line 3", "field 'document'", "empty"]),
    Case("vector-query-not-a-string", "vector", {"t.jsonl": with_pair(2, dict(PAIRS[2], query=7)),
                                                 "v.jsonl": PAIRS_JSONL},
         pairs("t.jsonl"), ["{t.jsonl} line 3", "field 'query'", "expected a string"]),
    Case("vector-csv-rel-not-a-number", "vector",
         {"t.csv": "query,document,rel\ngood,great film,1\nmusic,a song,very\n", "v.jsonl": PAIRS_JSONL},
         pairs("t.csv"), ["{t.csv} line 3", "field 'rel'", "expected a number"]),
    Case("vector-bad-record-in-val-path", "vector", {"t.jsonl": PAIRS_JSONL,
                                                     "v2.jsonl": with_pair(1, dict(PAIRS[1], rel=2))},
         ["--train-path", "{t.jsonl}", "--val-path", "{v2.jsonl}"], ["{v2.jsonl} line 2", "field 'rel'"]),
    Case("vector-invalid-json", "vector", {"t.json": '[{"query": "a", "document": "b", "rel": 1,}]',
                                           "v.jsonl": PAIRS_JSONL},
         pairs("t.json"), ["{t.json} line 1", "invalid JSON"]),
    Case("vector-train-path-missing", "vector", {"v.jsonl": PAIRS_JSONL},
         ["--train-path", "{out}/../none.jsonl", "--val-path", "{v.jsonl}"], ["none.jsonl", "not found"]),
    Case("vector-output-dir-is-a-file", "vector", {"t.jsonl": PAIRS_JSONL, "v.jsonl": PAIRS_JSONL},
         pairs("t.jsonl", "--output-dir", "{sentinel}"), ["{sentinel}"]),
    Case("vector-lone-surrogate-query", "vector",
         {"t.jsonl": '{"query": "\\ud800", "document": "d", "rel": 1}\n', "v.jsonl": PAIRS_JSONL},
         pairs("t.jsonl"), ["{t.jsonl} line 1", "field 'query'", "surrogate"]),
    Case("vector-lone-surrogate-document", "vector",
         {"t.jsonl": PAIRS_JSONL.replace('"a song"', '"a \\udfff song"'), "v.jsonl": PAIRS_JSONL},
         pairs("t.jsonl"), ["{t.jsonl} line 3", "field 'document'", "surrogate"]),
    Case("vector-rel-integer-too-large-for-a-float", "vector",
         {"t.jsonl": '{"query": "q", "document": "d", "rel": 1%s}\n' % ("0" * 400), "v.jsonl": PAIRS_JSONL},
         pairs("t.jsonl"), ["{t.jsonl} line 1", "field 'rel'", "finite"]),
    Case("vector-rel-megabyte-string-is-clipped", "vector",
         {"t.jsonl": with_pair(0, dict(PAIRS[0], rel="9" * ONE_MEGABYTE + "x")), "v.jsonl": PAIRS_JSONL},
         pairs("t.jsonl"), ["{t.jsonl} line 1", "field 'rel'", "expected a number"]),
    Case("vector-repeated-key", "vector",
         {"t.jsonl": '{"query": "q", "document": "d", "rel": 1, "rel": 0}\n', "v.jsonl": PAIRS_JSONL},
         pairs("t.jsonl"), ["{t.jsonl} line 1", "field 'rel'", "appears twice"]),
    Case("vector-deeply-nested-line", "vector", {"t.jsonl": PAIRS_JSONL + nested(100_000) + "\n",
                                                 "v.jsonl": PAIRS_JSONL},
         pairs("t.jsonl"), ["{t.jsonl} line 4", "nested too deeply"]),
    Case("vector-fifo-as-val-path", "vector", {"t.jsonl": PAIRS_JSONL, "v.jsonl": FIFO},
         pairs("t.jsonl"), ["{v.jsonl}", "not a regular file"]),
    Case("vector-labels-flag-does-not-apply", "vector", {"t.jsonl": PAIRS_JSONL, "v.jsonl": PAIRS_JSONL},
         pairs("t.jsonl", "--labels", "a,b"), ["--labels", "does not apply"]),
]

LONGDOC_CASES = [
    Case("longdoc-invalid-jsonl-line", "longdoc", {"d.jsonl": with_line(3, '{"text": "good" "label": 1}')},
         train("d.jsonl"), ["{d.jsonl} line 4", "invalid JSON"]),
    Case("longdoc-empty-text", "longdoc", {"d.jsonl": with_record(2, {"text": "\n\n", "label": "positive"})},
         train("d.jsonl"), ["{d.jsonl} line 3", "field 'text'", "empty"]),
    Case("longdoc-label-missing", "longdoc", {"d.jsonl": with_record(1, {"text": "good"})},
         train("d.jsonl"), ["{d.jsonl} line 2", "field 'label'", "missing"]),
    Case("longdoc-unknown-label", "longdoc", {"d.jsonl": with_record(1, {"text": "good", "label": "other"})},
         train("d.jsonl", "--labels", "negative,positive"), ["{d.jsonl} line 2", "unknown label 'other'"]),
    Case("longdoc-one-class", "longdoc", {"d.jsonl": jsonl([{"text": "good", "label": "positive"}] * 6)},
         train("d.jsonl", "--val-path", "{d.jsonl}"), ["only one class"]),
    Case("longdoc-not-utf8", "longdoc", {"d.jsonl": b'{"text": "\xff\xfe", "label": 1}\n'},
         train("d.jsonl"), ["{d.jsonl} line 1", "UTF-8"]),
    Case("longdoc-header-only-csv", "longdoc", {"d.csv": "text,label\n"}, train("d.csv"), ["{d.csv}", "header"]),
    Case("longdoc-lone-surrogate-text", "longdoc", {"d.jsonl": with_line(4, '{"text": "\\ud800", "label": "a"}')},
         train("d.jsonl"), ["{d.jsonl} line 5", "field 'text'", "surrogate"]),
    Case("longdoc-integer-label-a-billion", "longdoc", {"d.jsonl": with_int_label(1, 10 ** 9)},
         train("d.jsonl"), ["{d.jsonl} line 2", "field 'label'", "too large"]),
    Case("longdoc-regression-label-1e308", "longdoc", {"d.jsonl": jsonl(SCORES + [{"text": "x", "label": 1e308}])},
         train("d.jsonl", "--problem-type", "regression"), ["{d.jsonl} line 4", "field 'label'", "too large"]),
    Case("longdoc-fifo-as-data-path", "longdoc", {"d.jsonl": FIFO}, train("d.jsonl"), ["not a regular file"]),
    Case("longdoc-eval-only-truncated-weights", "longdoc", {"t.jsonl": GOOD_JSONL},
         ["--eval-only", "--model-path", "{truncated}", "--test-path", "{t.jsonl}"],
         ["model.safetensors", "truncated"], data_error=False),
]

ALL_CASES = CLASSIFIER_CASES + HOSTILE_DATA_CASES + INFER_CASES + EXPORT_CASES + VECTOR_CASES + LONGDOC_CASES
SCRIPTS = {"classifier": "train_classifier", "infer": "infer", "export": "export_onnx",
           "vector": "train_vector", "longdoc": "train_longdoc"}


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def model_dirs(tiny_model_dir, tmp_path_factory):
    """A classifier model directory (untrained), one with truncated weights, one with a broken config."""
    import shutil

    from common import modeldir
    from common.heads import SequenceClassifier
    root = tmp_path_factory.mktemp("models")
    model = SequenceClassifier(modeldir.load_pretrained_backbone(str(tiny_model_dir)), 2)
    toolkit = {"task": "classification", "head": model.head_settings, "temperature": 1.0,
               "preprocessing": {"max_length": 32, "truncation_side": "right", "context": "pair",
                                 "normalize": None, "record_format": "text"}}
    modeldir.write_model_directory(root / "model", model, modeldir.load_tokenizer(str(tiny_model_dir)), toolkit,
                                   {0: "negative", 1: "positive"})
    shutil.copytree(root / "model", root / "truncated")
    weights = (root / "truncated" / "model.safetensors").read_bytes()
    (root / "truncated" / "model.safetensors").write_bytes(weights[:len(weights) // 2])
    shutil.copytree(root / "model", root / "broken-config")
    (root / "broken-config" / "config.json").write_text('{"model_type": "bert", ', encoding="utf-8")
    return {"model": root / "model", "truncated": root / "truncated", "broken-config": root / "broken-config",
            "tiny": tiny_model_dir}


def write_case_files(case, directory):
    """Write the case's inputs; return {placeholder: path}."""
    paths = {}
    for name, content in case.files.items():
        path = directory / name.rstrip("/")
        if name.endswith("/"):
            path.mkdir()
        elif content == FIFO:
            os.mkfifo(path)
        elif isinstance(content, Special):
            path.symlink_to(content.target)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        paths[name.rstrip("/")] = path
    return paths


def existing_outputs(out, sentinel):
    """An output directory from an earlier run that no failed run may touch."""
    (out / "checkpoint-best").mkdir(parents=True)
    (out / "checkpoint-best" / "model.safetensors").write_bytes(os.urandom(256))
    (out / "metrics.json").write_text('{"validation": {"accuracy": 0.9}}')
    (out / "model.onnx").write_bytes(os.urandom(64))
    sentinel.write_text("an earlier result\n")


def snapshot(*roots):
    """Every file under ``roots`` with its bytes (a file root counts as itself)."""
    files = {}
    for root in roots:
        for path in ([root] if root.is_file() else sorted(root.rglob("*"))):
            if path.is_file():
                files[str(path)] = path.read_bytes()
    return files


def assert_unchanged(before, after):
    """Every file of ``before`` is still there with the same bytes (a new run directory may appear)."""
    assert {path: after.get(path) for path in before} == before, "an existing output was modified"


def forbid_model_loading(monkeypatch):
    """Loading any model or tokenizer fails the test: data errors must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded before the input was validated")
    for auto_class in (transformers.AutoModel, transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        monkeypatch.setattr(auto_class, "from_pretrained", refuse)
    from common import modeldir
    monkeypatch.setattr(modeldir, "load_pretrained_backbone", refuse)
    monkeypatch.setattr(modeldir, "load_tokenizer", refuse)
    monkeypatch.setattr(modeldir, "build_backbone_from_config", refuse)


@contextlib.contextmanager
def unblock_fifos_later(fifos, seconds=30):
    """Should a script block opening a FIFO (the bug these cases guard against), open its
    write end after ``seconds`` so the reader sees end-of-file and the test fails, not hangs."""
    def unblock():
        for fifo in fifos:
            try:  # O_NONBLOCK: with no reader waiting this fails at once instead of blocking
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
    timer = threading.Timer(seconds, unblock)
    timer.daemon = True
    if fifos:
        timer.start()
    try:
        yield
    finally:
        timer.cancel()


def fill(template, paths):
    for name, path in paths.items():
        template = template.replace("{%s}" % name, str(path))
    return template


def base_argv(case, paths):
    if case.script in ("classifier", "vector", "longdoc"):
        return ["--model-name", str(paths["tiny"]), "--output-dir", str(paths["out"] / "new-run"),
                "--precision", "fp32", "--device", "cpu", "--epochs", "1", "--batch-size", "4"]
    return []


def load_script(script):
    try:
        return importlib.import_module(SCRIPTS[script])
    except ModuleNotFoundError as error:
        if error.name == SCRIPTS[script]:
            pytest.skip(f"{SCRIPTS[script]}.py is not in the repository yet")
        raise


# ---------------------------------------------------------------- the table

def run_case(case, tmp_path, model_dirs, monkeypatch, capsys):
    module = load_script(case.script)
    out, sentinel = tmp_path / "out", tmp_path / "sentinel.txt"
    existing_outputs(out, sentinel)
    paths = {**write_case_files(case, tmp_path), **model_dirs, "out": out, "sentinel": sentinel}
    argv = base_argv(case, paths) + [fill(argument, paths) for argument in case.argv]
    before = snapshot(out, sentinel, *model_dirs.values())
    if case.data_error:
        forbid_model_loading(monkeypatch)
    capsys.readouterr()
    with unblock_fifos_later([paths[name] for name, content in case.files.items() if content == FIFO]):
        exit_code = module.main(argv)
    stderr = capsys.readouterr().err
    return exit_code, stderr, paths, before, out, sentinel


@pytest.mark.parametrize("case", ALL_CASES, ids=[case.name for case in ALL_CASES])
def test_malformed_input_is_one_clear_line_and_exit_2(case, tmp_path, model_dirs, monkeypatch, capsys):
    exit_code, stderr, paths, before, out, sentinel = run_case(case, tmp_path, model_dirs, monkeypatch, capsys)
    assert exit_code == case.exit_code, stderr
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    if case.exit_code == 2:
        assert len(lines) == 1 and lines[0].startswith("error: "), stderr[:2000]
        message = lines[0]
    else:  # partial failure: the bad record is named on its own line
        message = next(line for line in lines if "line 2" in line)
    assert len(message) < LONGEST_ERROR_LINE, message[:LONGEST_ERROR_LINE]
    for fragment in case.expected:
        assert fill(fragment, paths) in message, message
    assert_unchanged(before, snapshot(out, sentinel, *model_dirs.values()))


def test_the_table_is_big_enough():
    assert len(ALL_CASES) >= 40
    assert len({case.name for case in ALL_CASES}) == len(ALL_CASES)


# ---------------------------------------------------------------- the process boundary

SUBPROCESS_CASES = ["jsonl-invalid-line", "not-utf8", "output-dir-is-a-file", "infer-truncated-weights"]


@pytest.mark.parametrize("name", SUBPROCESS_CASES)
def test_no_traceback_from_the_real_process(name, tmp_path, model_dirs):
    case = next(case for case in ALL_CASES if case.name == name)
    out, sentinel = tmp_path / "out", tmp_path / "sentinel.txt"
    existing_outputs(out, sentinel)
    paths = {**write_case_files(case, tmp_path), **model_dirs, "out": out, "sentinel": sentinel}
    argv = base_argv(case, paths) + [fill(argument, paths) for argument in case.argv]
    before = snapshot(out, sentinel)
    environment = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, str(REPO / f"{SCRIPTS[case.script]}.py"), *argv], capture_output=True,
                            text=True, timeout=300, env=environment, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    assert_unchanged(before, snapshot(out, sentinel))


def test_a_bad_data_file_with_overwrite_output_dir_keeps_the_earlier_results(tmp_path, tiny_model_dir, capsys):
    """--overwrite-output-dir may replace an earlier run's results with a new run's, but a run
    that stops at a bad record must leave them as they were."""
    import train_classifier
    out, sentinel = tmp_path / "out", tmp_path / "sentinel.txt"
    existing_outputs(out, sentinel)
    (out / "run.json").write_text(json.dumps({"run_id": "0123456789ab", "script": "train_classifier.py",
                                              "started": "2026-01-01T00:00:00+0000"}), encoding="utf-8")
    data_file = tmp_path / "d.jsonl"
    data_file.write_text(with_line(2, '{"text": "bad \\ud800", "label": "a"}'), encoding="utf-8")
    before = snapshot(out)
    assert train_classifier.main(["--data-path", str(data_file), "--output-dir", str(out), "--overwrite-output-dir",
                                  "--model-name", str(tiny_model_dir), "--precision", "fp32"]) == 2
    assert "line 3: field 'text'" in capsys.readouterr().err
    assert snapshot(out) == before, "the earlier run's results were removed before the data was read"


@pytest.mark.parametrize("special", ["fifo", "/dev/zero"])
def test_special_files_are_refused_at_once_by_the_real_process(special, tmp_path, tiny_model_dir):
    """A FIFO with no writer used to block forever and /dev/zero to read until memory ran out:
    both are refused before they are opened (the timeout and memory cap only bound a regression)."""
    import resource
    path = tmp_path / "d.jsonl" if special == "fifo" else Path(special)
    if special == "fifo":
        os.mkfifo(path)
    elif not path.exists():
        pytest.skip(f"{special} does not exist here")

    def cap_memory():
        hard = resource.getrlimit(resource.RLIMIT_AS)[1]
        limit = 16 * 1024 ** 3 if hard == resource.RLIM_INFINITY else min(hard, 16 * 1024 ** 3)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    environment = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, str(REPO / "train_classifier.py"), "--data-path", str(path),
                             "--model-name", str(tiny_model_dir), "--output-dir", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=120, env=environment, cwd=tmp_path,
                            preexec_fn=cap_memory)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith(f"error: {path}: not a regular file"), lines[0]


# ---------------------------------------------------------------- inputs that must be accepted

def test_bom_quoted_newlines_and_a_megabyte_text_are_accepted(tmp_path, tiny_model_dir):
    """A UTF-8 BOM is not part of the first header; a quoted newline stays inside its record;
    a 1 MB text is valid and truncated to --max-length (its length is measured only that far)."""
    import train_classifier
    from common import data
    rows = [(r["text"], r["label"]) for r in make_text_records(6)]
    rows[0] = ("good\nmovie", "positive")
    rows[1] = ("bad " * (ONE_MEGABYTE // 4), "negative")
    path = tmp_path / "d.csv"
    path.write_bytes(b"\xef\xbb\xbf" + csv_text(rows).encode("utf-8"))
    records = data.read_records(path)
    assert list(records[0].fields) == ["text", "label"]  # not '\ufefftext'
    assert records[0].fields["text"] == "good\nmovie"
    assert [record.locator for record in records[:3]] == ["line 2", "line 4", "line 5"]
    assert train_classifier.main(["--data-path", str(path), "--val-path", str(path), "--model-name",
                                  str(tiny_model_dir), "--output-dir", str(tmp_path / "out"), "--precision", "fp32",
                                  "--epochs", "1", "--batch-size", "4", "--max-length", "16",
                                  "--save-steps", "0"]) == 0
    summary = json.loads((tmp_path / "out" / "dataset_summary.json").read_text())
    assert summary[0]["truncated"] >= 1 and summary[0]["token_length"]["max"] > 16


def test_bom_jsonl_is_accepted(tmp_path):
    from common import data
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD_JSONL.encode("utf-8"))
    examples = data.load_text_examples(path)
    assert len(examples) == len(GOOD) and examples[0].text == GOOD[0]["text"]


def test_skip_invalid_drops_bad_records_and_says_how_many(tmp_path, capsys):
    from common import data
    path = tmp_path / "d.jsonl"
    path.write_text(with_record(1, {"text": ""}) + "not json\n", encoding="utf-8")
    examples = data.load_text_examples(path, skip_invalid=True)
    assert len(examples) == len(GOOD) - 1
    assert data.report_skipped(examples) == 2
    assert "dropped 2 invalid record(s)" in capsys.readouterr().err


def test_unicode_line_separators_inside_texts_are_not_line_breaks(tmp_path):
    """json.dumps(ensure_ascii=False) writes U+2028 raw; scraped text has form feeds: both stay in the text."""
    from common import data
    records = [{"text": "first\u2028second", "label": "a"}, {"text": "page\x0cbreak", "label": "b"}]
    jsonl_path = tmp_path / "d.jsonl"
    jsonl_path.write_text(jsonl(records), encoding="utf-8")
    csv_path = tmp_path / "d.csv"
    csv_path.write_text(csv_text([(r["text"], r["label"]) for r in records]), encoding="utf-8")
    for path, first_line in ((jsonl_path, 1), (csv_path, 2)):
        read = data.read_records(path)
        assert [record.fields["text"] for record in read] == [r["text"] for r in records]
        assert [record.locator for record in read] == [f"line {first_line}", f"line {first_line + 1}"]


# ---------------------------------------------------------------- an unwritable output directory

def unwritable_directory(tmp_path):
    """A folder this process cannot create anything in.

    Permission bits stop an ordinary user; root ignores them (CI runs as root), so there a
    read-only kernel file system stands in.
    """
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        return locked
    for candidate in (Path("/sys"), Path("/proc/sys")):
        probe = candidate / "toolkit-write-probe"
        try:
            probe.mkdir()
        except OSError:
            return candidate
        probe.rmdir()
    pytest.skip("no folder here that root cannot write")


@pytest.mark.parametrize("script", ["train_classifier", "train_vector", "train_longdoc"])
def test_an_unwritable_output_directory_is_one_line_and_exit_2(script, tmp_path, tiny_model_dir, capsys):
    out = unwritable_directory(tmp_path) / "run"
    data_file = tmp_path / "d.jsonl"
    if script == "train_vector":
        data_file.write_text(json.dumps({"query": "q", "document": "d", "rel": 1.0}) + "\n", encoding="utf-8")
        argv = ["--train_path", str(data_file), "--val_path", str(data_file), "--save_path", str(out)]
    else:
        data_file.write_text(GOOD_JSONL, encoding="utf-8")
        argv = ["--data-path", str(data_file), "--output-dir", str(out)]
    module = importlib.import_module(script)
    assert module.main([*argv, "--model-name", str(tiny_model_dir)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(out) in errors[0] and "cannot write" in errors[0]
