"""Data readers, record formats, labels, encoding and batching (common/data.py)."""
import json

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
    assert data.report_skipped() == 1
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
