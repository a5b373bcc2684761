"""Data readers, record formats, labels, encoding and batching (common/data.py)."""
import json
import os
import re
import threading
import time

import pytest

from common import data
from common.errors import UserError
from conftest import write_json, write_jsonl


def test_reads_json_array_jsonl_csv_tsv_with_locators(tmp_path):
    records = [{"text": "good", "label": 1}, {"text": "bad", "label": 0}]
    (tmp_path / "a.csv").write_text('text,label\ngood,1\n"multi\nline",0\n', encoding="utf-8")
    (tmp_path / "a.tsv").write_text("text\tlabel\ngood\t1\n", encoding="utf-8")
    assert [r.locator for r in data.read_records(write_json(tmp_path / "a.json", records))] == ["record 1", "record 2"]
    assert [r.locator for r in data.read_records(write_jsonl(tmp_path / "a.jsonl", records))] == ["line 1", "line 2"]
    csv_records = data.read_records(tmp_path / "a.csv")
    assert csv_records[1].fields["text"] == "multi\nline" and csv_records[1].locator == "line 3"
    assert data.read_records(tmp_path / "a.tsv")[0].fields == {"text": "good", "label": "1"}


def test_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "good", "label": 1}).encode())
    assert data.read_records(path)[0].fields["text"] == "good"


@pytest.mark.parametrize("content, expected", [
    (b'[{"text": "a", "label": 1},\n {"text": }]', "line 2: invalid JSON"),
    (b'{"data": []}', "expected a JSON array"),
    (b"", "empty"),
    (b"text,label\n", "only a header"),
    (b'{"text": "a"}\n\xff\xfe\n', "line 2: not valid UTF-8"),
])
def test_unreadable_files_name_file_and_line(tmp_path, content, expected):
    suffix = ".csv" if content.startswith(b"text,") else ".json"
    path = tmp_path / f"bad{suffix}"
    path.write_bytes(content)
    with pytest.raises(UserError, match=expected):
        data.read_records(path)


def test_message_context_and_chat_formats(tmp_path):
    message = write_json(tmp_path / "m.json", [{"message": "今天天气真好啊", "context": "昨天下雨了", "label": 1}])
    chat = write_json(tmp_path / "c.json", [{"messages": [{"role": "user", "content": "x"},
                                                          {"role": "assistant", "content": "text here"},
                                                          {"role": "tool", "content": "GPT"}]}])
    [example] = data.load_text_examples(message)
    assert (example.text, example.context, example.raw_label) == ("今天天气真好啊", "昨天下雨了", 1)
    [example] = data.load_text_examples(chat)
    assert (example.text, example.context, example.raw_label) == ("text here", None, "GPT")


@pytest.mark.parametrize("record, expected", [
    ({"label": 1}, "line 1: field 'text': missing"),
    ({"text": 5, "label": 1}, "field 'text': expected a string"),
    ({"text": "   ", "label": 1}, "field 'text': empty text"),
    ({"text": "a", "label": [1]}, "field 'label': expected an integer or a string"),
    ({"text": "a"}, "field 'label': missing"),
])
def test_bad_fields_are_reported_with_line_and_field(tmp_path, record, expected):
    with pytest.raises(UserError, match=expected):
        data.load_text_examples(write_jsonl(tmp_path / "bad.jsonl", [record]))


def test_skip_invalid_drops_and_counts(tmp_path, capsys):
    path = write_jsonl(tmp_path / "mixed.jsonl", [{"text": "a", "label": 1}, {"text": ""}, {"text": "b", "label": 0}])
    examples = data.load_text_examples(path, skip_invalid=True)
    assert [e.text for e in examples] == ["a", "b"]
    assert data.report_skipped(examples) == 1 and "line 2" in capsys.readouterr().err
    assert data.report_skipped(data.load_text_examples(path, skip_invalid=True)) == 1  # nothing carried over
    assert "dropped 1 invalid" in capsys.readouterr().err


def test_label_sets():
    ints = [data.TextExample("t", None, label, "x") for label in (0, 2)]
    assert data.LabelSet.from_examples(ints).names == ["0", "1", "2"]  # integers keep their values
    names = [data.TextExample("t", None, label, "x") for label in ("pos", "neg")]
    assert data.LabelSet.from_examples(names).names == ["neg", "pos"]  # names sorted
    fixed = data.LabelSet(["low_value", "normal", "interrupt"])
    assert fixed.id_of("interrupt", "x") == 2 and fixed.id_of(1, "x") == 1
    with pytest.raises(UserError, match="unknown label 'spam'"):
        fixed.id_of("spam", "f line 3")
    with pytest.raises(UserError, match="out of range"):
        fixed.id_of(3, "f line 3")


def test_context_is_cut_first_keeping_its_recent_end(tiny_model_dir):
    from common.modeldir import load_tokenizer
    tokenizer = load_tokenizer(str(tiny_model_dir))
    [encoded] = data.encode_texts(tokenizer, ["good movie"], ["今天天气真好啊"], max_length=7, truncation_side="right")
    tokens = tokenizer.convert_ids_to_tokens(encoded["input_ids"])
    assert tokens == ["[CLS]", "好", "啊", "[SEP]", "good", "movie", "[SEP]"]
    assert encoded["token_type_ids"] == [0, 0, 0, 0, 1, 1, 1]
    # the message alone is too long: the context is dropped and the message cut on the chosen side
    [encoded] = data.encode_texts(tokenizer, ["good bad great terrible movie"], ["今天"], max_length=5,
                                  truncation_side="left")
    assert tokenizer.convert_ids_to_tokens(encoded["input_ids"]) == ["[CLS]", "great", "terrible", "movie", "[SEP]"]


def test_length_grouped_sampler_is_deterministic_resumable_and_sharded():
    lengths = [i % 17 for i in range(100)]
    sampler = data.LengthGroupedBatchSampler(lengths, batch_size=8, seed=3, mega_batch_factor=4)
    sampler.set_epoch(1)
    full = list(sampler)
    assert sorted(i for batch in full for i in batch) == list(range(100))
    sampler.set_epoch(1, skip_batches=5)
    assert list(sampler) == full[5:]
    sampler.set_epoch(2)
    assert list(sampler) != full
    ranks = [data.LengthGroupedBatchSampler(lengths, 8, seed=3, rank=r, world_size=2) for r in (0, 1)]
    shards = [set(i for batch in s.all_batches() for i in batch) for s in ranks]
    assert not shards[0] & shards[1] and len(ranks[0].all_batches()) == len(ranks[1].all_batches())


def test_padding_collator_pads_and_keeps_metadata():
    collate = data.PaddingCollator(pad_token_id=0)
    batch = collate([{"input_ids": [2, 5, 3], "token_type_ids": [0, 0, 0], "labels": 1, "index": 0},
                     {"input_ids": [2, 3], "token_type_ids": [0, 0], "labels": 0, "index": 1}])
    assert batch["input_ids"].tolist() == [[2, 5, 3], [2, 3, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [1, 0] and batch["index"].tolist() == [0, 1]


def test_reads_a_datasets_save_to_disk_directory_with_splits_and_columns(tmp_path):
    datasets = pytest.importorskip("datasets")
    table = {"review": ["good movie", "bad movie", "great film"], "sentiment": [1, 0, 1]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(table),
                          "validation": datasets.Dataset.from_dict(table)}).save_to_disk(str(tmp_path / "chn"))
    examples = data.load_text_examples(tmp_path / "chn", text_field="review", label_field="sentiment",
                                       split="validation")
    assert [(e.text, e.raw_label) for e in examples] == [("good movie", 1), ("bad movie", 0), ("great film", 1)]
    assert examples[1].locator.endswith("[validation] row 2")
    with pytest.raises(UserError, match="no split 'test'"):
        data.load_text_examples(tmp_path / "chn", split="test")
    with pytest.raises(UserError, match="field 'text': missing"):
        data.load_text_examples(tmp_path / "chn")  # default column names do not exist here


def test_a_missing_validation_or_test_split_is_an_error_not_the_training_data(tmp_path):
    datasets = pytest.importorskip("datasets")
    table = {"text": ["good movie", "bad movie"], "label": [1, 0]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(table),
                          "test": datasets.Dataset.from_dict(table)}).save_to_disk(str(tmp_path / "hub"))
    with pytest.raises(UserError, match="no split named 'validation' or 'val' or 'dev' \\(has: train, test\\)"):
        data.read_records(tmp_path / "hub", default_splits=("validation", "val", "dev"))
    assert data.read_records(tmp_path / "hub", default_splits=("test",))[0].source.endswith("[test]")
    datasets.DatasetDict({"all": datasets.Dataset.from_dict(table)}).save_to_disk(str(tmp_path / "one"))
    assert data.read_records(tmp_path / "one")[0].source.endswith("[all]")  # a lone split is the training data


def test_a_plain_directory_is_not_a_dataset(tmp_path):
    with pytest.raises(UserError, match="not a datasets save_to_disk folder"):
        data.read_records(tmp_path)


def test_missing_datasets_package_gives_an_install_hint(tmp_path, monkeypatch):
    (tmp_path / "dataset_dict.json").write_text("{}")
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)
    with pytest.raises(UserError, match="pip install datasets"):
        data.read_records(tmp_path)


# ---------------------------------------------------------------- hostile inputs (review hostile-inputs.md)

def write_text(path, text):
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("line, field", [
    ('{"text": "bad \\ud800 text", "label": 1}', "text"),
    ('{"message": "ok", "context": "\\udc00", "label": 1}', "context"),
    ('{"text": "ok", "label": "\\udfff"}', "label"),
    ('{"messages": [{"content": "x"}, {"content": "\\ud800"}, {"content": "a"}]}', "messages[1].content"),
])
def test_a_lone_surrogate_is_refused_with_its_field(tmp_path, line, field):
    path = write_text(tmp_path / "d.jsonl", line + "\n")
    with pytest.raises(UserError, match=rf"d.jsonl line 1: field '{re.escape(field)}': lone UTF-16 surrogate"):
        data.load_text_examples(path)


def test_a_lone_surrogate_is_skipped_with_skip_invalid_and_pairs_check_it_too(tmp_path):
    from common import pairs as vector_pairs
    path = write_text(tmp_path / "d.jsonl", '{"text": "a", "label": 1}\n{"text": "\\ud800", "label": 0}\n')
    examples = data.load_text_examples(path, skip_invalid=True)
    assert [e.text for e in examples] == ["a"]
    assert data.report_skipped(examples) == 1
    pairs = write_text(tmp_path / "p.jsonl", '{"query": "q", "document": "\\udbff", "rel": 1}\n')
    with pytest.raises(UserError, match="line 1: field 'document': lone UTF-16 surrogate"):
        vector_pairs.load_pairs(pairs)


@pytest.mark.parametrize("raw, expected", [
    ("2", 2), (" 7 ", 7), ("-3", -3), (2.0, 2), (1e3, 1000),
    ("²", "²"), ("--5", "--5"), ("٣", "٣"), ("+5", "+5"), ("1.5", "1.5"),  # names: ASCII digits only
])
def test_only_ascii_integers_are_integer_labels(tmp_path, raw, expected):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": raw}])
    [example] = data.load_text_examples(path)
    assert example.raw_label == expected and type(example.raw_label) is type(expected)


def test_label_names_are_stripped_as_labels_flag_strips_them(tmp_path):
    """"positive " used to be a third class beside "positive"."""
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": "positive"}, {"text": "b", "label": "positive "},
                                              {"text": "c", "label": "\tnegative"}, {"text": "d", "label": " 1 "}])
    examples = data.load_text_examples(path)
    assert [example.raw_label for example in examples] == ["positive", "positive", "negative", 1]
    assert data.LabelSet.from_examples(examples[:3]).names == ["negative", "positive"]


def test_a_group_field_only_some_records_have_is_accepted(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": "x", "g": "news"}, {"text": "b", "label": "y"}])
    examples = data.load_text_examples(path, group_field="g", require_group_field=True)
    assert [example.group for example in examples] == ["news", "(none)"]


@pytest.mark.parametrize("value", [1.8e19, -1.8e19, "1e19", 0.5])
def test_numbers_float32_training_can_square_are_accepted(value):
    assert data.parse_number("f line 1: field 'label'", value) == float(value)


@pytest.mark.parametrize("value", [1.9e19, -3e38, 1e308, "1e300"])
def test_numbers_whose_square_overflows_float32_are_refused(value):
    with pytest.raises(data.RecordError, match="f line 1: field 'label': .* is too large for float32 training"):
        data.parse_number("f line 1: field 'label'", value)


def test_integer_labels_are_capped_relative_to_the_data(tmp_path):
    assert data.label_id_limit(24) == 100_000 and data.label_id_limit(50_000) == 500_000
    examples = [data.TextExample("t", None, label, f"f line {n}") for n, label in enumerate((0, 1, 99_999), 1)]
    assert len(data.LabelSet.from_examples(examples).names) == 100_000
    examples[2].raw_label = 100_000
    with pytest.raises(UserError, match=r"f line 3: field 'label': integer label 100000 is too large.* = 100,000"):
        data.LabelSet.from_examples(examples)
    path = write_text(tmp_path / "d.csv", "text,label\na,1\nb," + "9" * 19 + "\n")
    with pytest.raises(UserError, match="d.csv line 3: field 'label': integer label .* is too large"):
        data.load_text_examples(path)


@pytest.mark.parametrize("name, content, expected", [
    ("deep.json", "[" * 200_000 + "]" * 200_000, r"deep.json line 1: invalid JSON \(nested too deeply\)"),
    ("deep.jsonl", '{"text": "a", "label": 1}\n' + "[" * 100_000 + "]" * 100_000 + "\n",
     r"deep.jsonl line 2: invalid JSON \(nested too deeply\)"),
    ("rec.json", '[{"text": "a", "label": 1},\n\n{"text": %s}]' % ("[" * 50_000 + "]" * 50_000),
     "rec.json line 3: invalid JSON \\(nested too deeply\\)"),
    ("long.jsonl", '{"text": "a", "label": 1%s}\n' % ("0" * 5000), r"line 1: invalid JSON \(a number with too many"),
])
def test_json_the_decoder_cannot_take_is_one_line(tmp_path, name, content, expected):
    with pytest.raises(UserError, match=expected):
        data.read_records(write_text(tmp_path / name, content))


def test_deep_nesting_in_one_jsonl_line_can_be_skipped(tmp_path):
    path = write_text(tmp_path / "d.jsonl", "[" * 100_000 + "]" * 100_000 + '\n{"text": "a", "label": 1}\n')
    records = data.read_records(path, skip_invalid=True)
    assert [r.locator for r in records] == ["line 2"]
    assert data.report_skipped(records) == 1


@pytest.mark.parametrize("content, expected", [
    ('[{"a": 1},\n {"a": 1} {"a": 2}]', r"line 2: invalid JSON \(Expecting ',' delimiter, column 11\)"),
    ('[{"a": 1},]', r"line 1: invalid JSON \(Expecting value"),
    ('[{"a": 1}] x', r"line 1: invalid JSON \(Extra data, column 12\)"),
    ('[{"a": 1}', r"line 1: invalid JSON \(Expecting ',' delimiter"),
    ("[]", "no records found"),
    (' \n[ \n ]\n', "no records found"),
    ('"text"', "expected a JSON array"),
])
def test_json_arrays_read_element_by_element_keep_the_syntax_errors(tmp_path, content, expected):
    with pytest.raises(UserError, match=expected):
        data.read_records(write_text(tmp_path / "d.json", content))


def test_json_arrays_read_element_by_element_match_json_loads(tmp_path):
    records = [{"text": "a\u2028b", "label": [1, {"x": None}]}, {"text": "c", "n": 1.5e3, "t": True}]
    path = write_text(tmp_path / "d.json", " \n" + json.dumps(records, indent=2, ensure_ascii=False) + "\n\n")
    assert [r.fields for r in data.read_records(path)] == records


def test_a_repeated_key_is_refused_and_can_be_skipped(tmp_path):
    jsonl_path = write_text(tmp_path / "d.jsonl", '{"text": "a", "label": 1, "label": 2}\n{"text": "b", "label": 0}\n')
    with pytest.raises(UserError, match="d.jsonl line 1: field 'label': appears twice in one JSON object"):
        data.read_records(jsonl_path)
    json_path = write_text(tmp_path / "d.json", '[{"text": "a", "label": 0},\n {"text": "b", "x": {"k": 1, "k": 2}},\n'
                                                ' {"text": "c", "label": 1}]')
    with pytest.raises(UserError, match="d.json record 2: field 'k': appears twice"):
        data.read_records(json_path)
    records = data.read_records(json_path, skip_invalid=True)
    assert [r.locator for r in records] == ["record 1", "record 3"]
    assert data.report_skipped(records) == 1


def test_a_fifo_device_or_symlink_loop_is_refused_before_opening(tmp_path):
    fifo = tmp_path / "d.jsonl"
    os.mkfifo(fifo)
    # should the reader block on the FIFO (the bug), a writer opened later ends the read instead of hanging
    unblock = threading.Timer(20, lambda: os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)))
    unblock.daemon = True
    unblock.start()
    try:
        with pytest.raises(UserError, match=r"d.jsonl: not a regular file \(a FIFO\)"):
            data.read_records(fifo)
    finally:
        unblock.cancel()
    if os.path.exists("/dev/null"):
        with pytest.raises(UserError, match=r"/dev/null: not a regular file \(a character device\)"):
            data.read_records("/dev/null")
    (tmp_path / "loop.jsonl").symlink_to("loop.jsonl")
    with pytest.raises(UserError, match="loop.jsonl: symbolic link loop"):
        data.read_records(tmp_path / "loop.jsonl")
    (tmp_path / "dangling.jsonl").symlink_to("gone.jsonl")
    with pytest.raises(UserError, match="dangling.jsonl: file not found \\(a symbolic link to 'gone.jsonl'"):
        data.read_records(tmp_path / "dangling.jsonl")


def test_error_lines_stay_short_whatever_the_input(tmp_path):
    record = data.Record("f", "line 1", {"rel": "9" * 1_000_000 + "x", "big": 10 ** 400})
    for name in ("rel", "big"):
        with pytest.raises(UserError) as raised:
            data.require_number(record, name)
        assert len(str(raised.value)) < 200
    labels = data.LabelSet([f"class-{index}" for index in range(1000)])
    with pytest.raises(UserError, match=r"\.\.\. \(1000 in all\)") as raised:
        labels.id_of("y" * 1_000_000, "f line 2")
    assert len(str(raised.value)) < 600


@pytest.mark.parametrize("side", ["right", "left"])
def test_a_long_text_is_measured_on_a_window_with_the_same_result(tiny_model_dir, side, monkeypatch):
    """Only the window truncation keeps is encoded; what is kept equals encoding the whole text."""
    from common.modeldir import load_tokenizer
    tokenizer = load_tokenizer(str(tiny_model_dir))
    words = "good movie 今天 great,film bad " * 2000 + "unknownwordhere" * 10  # a cut long word at the end
    sparse = "good" + " " * 5000 + "movie " + "bad " * 100  # whitespace: the first window holds too few tokens
    texts, contexts = [words, sparse, "short", "good film"], [None, None, "hi", words[::-1]]
    stats = data.EncodedBatchStats()
    windowed = data.encode_texts(tokenizer, texts, contexts, max_length=16, truncation_side=side, stats=stats)
    assert 16 + data.MEASURE_MARGIN_TOKENS < stats.full_lengths[0] < 1000  # measured on the window only
    assert stats.full_lengths[1] == 104 and stats.truncated == 3  # [CLS] good movie bad x 100 [SEP]
    monkeypatch.setattr(data, "MEASURED_CHARS_PER_TOKEN", 10 ** 9)  # encode every text whole
    assert data.encode_texts(tokenizer, texts, contexts, max_length=16, truncation_side=side) == windowed


def test_a_30_megabyte_text_is_not_tokenized_whole(tiny_model_dir):
    from common.modeldir import load_tokenizer
    tokenizer = load_tokenizer(str(tiny_model_dir))
    started = time.perf_counter()
    [encoded] = data.encode_texts(tokenizer, ["good movie " * 2_800_000], None, max_length=16)
    assert len(encoded["input_ids"]) == 16
    assert time.perf_counter() - started < 10  # the whole text took over a minute
