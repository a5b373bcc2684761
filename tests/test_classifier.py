"""train_classifier.py end to end on a tiny BERT: formats, errors, early stopping, round trip.
Resume, torchrun and evaluate-only are in test_trainer_contract.py, with the other trainers."""
import json
import statistics
from pathlib import Path

import pytest
import torch

import train_classifier
from common.heads import SequenceClassifier
from conftest import make_text_records, run_trainer, write_json, write_jsonl

REPO = Path(__file__).resolve().parents[1]


def run(tiny_model_dir, output_dir, *extra):
    return run_trainer("train_classifier", tiny_model_dir, output_dir, *extra)


def message_records(count):
    return [{"message": r["text"], "context": "昨天下雨了" if i % 2 else "", "label": 1 if r["label"] == "positive" else 0}
            for i, r in enumerate(make_text_records(count))]


def chat_records(count):
    return [{"messages": [{"role": "user", "content": "classify"}, {"role": "assistant", "content": r["text"]},
                          {"role": "tool", "content": "Human" if r["label"] == "positive" else "GPT"}]}
            for r in make_text_records(count)]


def write_csv(path, records, delimiter=","):
    import csv
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "label"], delimiter=delimiter)
        writer.writeheader()
        writer.writerows(records)
    return path


@pytest.mark.parametrize("kind", ["json", "jsonl", "csv", "tsv", "message", "chat"])
def test_trains_on_every_format(tmp_path, tiny_model_dir, kind):
    records = make_text_records(20)
    writers = {
        "json": lambda: write_json(tmp_path / "d.json", records),
        "jsonl": lambda: write_jsonl(tmp_path / "d.jsonl", records),
        "csv": lambda: write_csv(tmp_path / "d.csv", records),
        "tsv": lambda: write_csv(tmp_path / "d.tsv", records, "\t"),
        "message": lambda: write_json(tmp_path / "d.json", message_records(20)),
        "chat": lambda: write_json(tmp_path / "d.json", chat_records(20)),
    }
    assert run(tiny_model_dir, tmp_path / "out", "--data-path", str(writers[kind]()), "--val-ratio", "0.25",
               "--epochs", "8", "--logging-steps", "1", "--patience", "0") == 0
    config = json.loads((tmp_path / "out" / "checkpoint-best" / "config.json").read_text())
    expected_labels = {"chat": ["GPT", "Human"], "message": ["0", "1"]}.get(kind, ["negative", "positive"])
    assert [config["id2label"][str(i)] for i in range(2)] == expected_labels
    assert config["toolkit"]["preprocessing"]["record_format"] == {"message": "message", "chat": "chat"}.get(kind, "text")
    # the texts and labels were read as meant: the model learned them
    rows = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows if "loss" in row]
    quarter = len(losses) // 4
    assert statistics.mean(losses[-quarter:]) < 0.5 * statistics.mean(losses[:quarter]), losses
    validation = json.loads((tmp_path / "out" / "metrics.json").read_text())["validation"]
    assert validation["num_examples"] == 10 and validation["accuracy"] > 0.5  # two balanced classes: chance is 0.5


def test_learns_and_round_trips_through_the_model_directory(tmp_path, tiny_model_dir, text_data):
    assert run(tiny_model_dir, tmp_path / "out", "--data-path", str(text_data["train"]), "--val-path",
               str(text_data["val"]), "--test-path", str(text_data["test"]), "--epochs", "6") == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["test"]["accuracy"] > metrics["majority_baseline"]["accuracy"]
    # reloading the saved directory reproduces the reported test accuracy
    model, tokenizer, toolkit, config = SequenceClassifier.from_directory(tmp_path / "out" / "checkpoint-best")
    from common import data
    examples = data.load_text_examples(text_data["test"])
    encoded = data.encode_texts(tokenizer, [e.text for e in examples], None, toolkit["preprocessing"]["max_length"])
    batch = data.PaddingCollator(tokenizer.pad_token_id)(encoded)
    with torch.no_grad():
        predictions = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]).argmax(-1)
    truth = torch.tensor([config.label2id[e.raw_label] for e in examples])
    assert (predictions == truth).float().mean().item() == pytest.approx(metrics["test"]["accuracy"])
    assert (tmp_path / "out" / "errors.jsonl").exists() and (tmp_path / "out" / "train_log.jsonl").exists()


def test_labels_flag_fixes_order_and_rejects_unknown(tmp_path, tiny_model_dir, capsys):
    path = write_jsonl(tmp_path / "d.jsonl", make_text_records(10))
    assert run(tiny_model_dir, tmp_path / "a", "--data-path", str(path), "--labels", "positive,negative",
               "--val-ratio", "0.3") == 0
    config = json.loads((tmp_path / "a" / "checkpoint-best" / "config.json").read_text())
    assert config["label2id"] == {"positive": 0, "negative": 1}
    assert run(tiny_model_dir, tmp_path / "b", "--data-path", str(path), "--labels", "pos,neg") == 2
    assert "line 1: field 'label': unknown label 'negative'" in capsys.readouterr().err


@pytest.mark.parametrize("records, expected", [
    ([{"text": "good", "label": "positive"}] * 10, "only one class"),
    ([{"text": "good"}], "line 1: field 'label': missing"),
    ([{"text": "good", "label": 1}, {"text": "bad", "label": 0}, {"text": "x", "label": 0}], "would leave class"),
])
def test_bad_input_exits_2_before_loading_the_model(tmp_path, tiny_model_dir, capsys, records, expected):
    path = write_jsonl(tmp_path / "d.jsonl", records)
    assert train_classifier.main(["--data-path", str(path), "--model-name", str(tmp_path / "no-model"),
                                  "--output-dir", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and expected in error[0] and "Traceback" not in error[0]


def test_early_stopping_stops_after_patience(tmp_path, tiny_model_dir, text_data):
    assert run(tiny_model_dir, tmp_path / "out", "--data-path", str(text_data["train"]), "--val-path",
               str(text_data["val"]), "--epochs", "20", "--learning-rate", "0", "--eval-steps", "2",
               "--patience", "2") == 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert rows[0]["untuned"] and rows[0]["step"] == 0 and not rows[0]["improved"]  # a reference only
    evaluations = [row for row in rows if "eval_loss" in row and not row["untuned"]]
    assert len(evaluations) == 3  # the first sets the best, two more without improvement stop it
    assert evaluations[-1]["step"] == 6
    untuned = json.loads((tmp_path / "out" / "metrics.json").read_text())["untuned"]
    assert untuned["validation"]["step"] == 0 and untuned["beaten"] is False  # learning rate 0 changes nothing


@pytest.mark.parametrize("example, extra", [
    ("messages.json", ["--labels", "low_value,normal,interrupt"]),  # the README's quick start
    ("chat.json", []), ("reviews.csv", []), ("reviews.jsonl", []),
])
def test_the_shipped_examples_train_with_default_splitting(tmp_path, tiny_model_dir, example, extra):
    # default --val-ratio 0.1 on a dozen records: the split takes at least one record per class
    assert run(tiny_model_dir, tmp_path / "out", "--data-path", str(REPO / "examples" / example), *extra) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["validation"]["num_examples"] >= len(json.loads(
        (tmp_path / "out" / "checkpoint-best" / "config.json").read_text())["id2label"])


def test_an_epoch_end_that_is_also_an_eval_step_is_evaluated_once(tmp_path, tiny_model_dir, text_data):
    # 24 records, batch 8: 3 steps an epoch, so every --eval-steps 3 evaluation falls on an epoch end
    assert run(tiny_model_dir, tmp_path / "out", "--data-path", str(text_data["train"]), "--val-path",
               str(text_data["val"]), "--epochs", "4", "--learning-rate", "0", "--eval-steps", "3",
               "--patience", "3") == 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    # scoring the same weights twice would spend patience: it would stop at step 6
    assert [row["step"] for row in rows if "eval_loss" in row] == [0, 3, 6, 9, 12]  # 0: the untuned model


# the Hugging Face Trainer's spellings: (flag, value, option, parsed value); none is the default
HF_SPELLINGS = [
    ("--model_name_or_path", "m", "model_name", "m"), ("--data_path", "d.json", "data_path", "d.json"),
    ("--output_dir", "o", "output_dir", "o"), ("--num_train_epochs", "4", "epochs", 4),
    ("--per_device_train_batch_size", "16", "batch_size", 16), ("--learning_rate", "3e-5", "learning_rate", 3e-5),
    ("--max_length", "64", "max_length", 64), ("--logging_steps", "5", "logging_steps", 5),
    ("--eval_steps", "7", "eval_steps", 7), ("--save_steps", "9", "save_steps", 9),
    ("--gradient_accumulation_steps", "2", "gradient_accumulation_steps", 2), ("--fp16", None, "precision", "fp16"),
]


def test_the_hf_trainer_spellings_of_seed_002_parse():
    args = train_classifier.parse_args([part for flag, value, _, _ in HF_SPELLINGS for part in (flag, value)
                                        if part is not None])
    defaults = train_classifier.parse_args(["--data-path", "other.json"])
    for flag, _, option, expected in HF_SPELLINGS:
        assert getattr(args, option) == expected, flag
        assert getattr(defaults, option) != expected, f"{flag}: {expected!r} is the default, so this proves nothing"


def test_config_file_sections_and_flag_override(tmp_path, tiny_model_dir, text_data):
    config = tmp_path / "c.yaml"
    config.write_text("model:\n  max_length: 16\n  dropout: 0.2\ntraining:\n  epochs: 1\n  batch_size: 4\n"
                      "  fp16: false\noptimizer:\n  weight_decay: 0.05\nearly_stopping:\n  patience: 1\n"
                      "logging:\n  steps: 3\noutput:\n  save_total_limit: 1\n  save_steps: 2\n", encoding="utf-8")
    assert train_classifier.main(["--config", str(config), "--data-path", str(text_data["train"]),
                                  "--model-name", str(tiny_model_dir), "--output-dir", str(tmp_path / "out"),
                                  "--batch-size", "8", "--precision", "fp32"]) == 0
    saved = json.loads((tmp_path / "out" / "training_args.json").read_text())
    assert (saved["max_length"], saved["dropout"], saved["weight_decay"], saved["batch_size"]) == (16, 0.2, 0.05, 8)
    assert len(list((tmp_path / "out").glob("checkpoint-step-*"))) == 1  # save_total_limit


def test_unknown_config_key_is_a_user_error(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("training:\n  epochz: 3\n", encoding="utf-8")
    assert train_classifier.main(["--config", str(config), "--data-path", "x.json"]) == 2
    assert "key 'training.epochz' is not a known option" in capsys.readouterr().err


@pytest.mark.slow
def test_fine_tunes_the_real_model_for_a_few_steps(tmp_path, real_model_dir, text_data):
    assert train_classifier.main([
        "--data-path", str(text_data["train"]), "--val-path", str(text_data["val"]),
        "--model-name", str(real_model_dir), "--output-dir", str(tmp_path / "out"), "--max-steps", "6",
        "--batch-size", "8", "--learning-rate", "5e-5", "--max-length", "32", "--precision", "fp32",
        "--save-steps", "0"]) == 0
    assert (tmp_path / "out" / "checkpoint-best" / "model.safetensors").is_file()


def test_trains_from_a_save_to_disk_directory(tmp_path, tiny_model_dir):
    datasets = pytest.importorskip("datasets")
    records = make_text_records(12)
    table = {"review": [r["text"] for r in records], "sentiment": [int(r["label"] == "positive") for r in records]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(table), "validation": datasets.Dataset.from_dict(
        table)}).save_to_disk(str(tmp_path / "chnsenticorp"))
    directory = str(tmp_path / "chnsenticorp")
    assert run(tiny_model_dir, tmp_path / "out", "--data-path", directory, "--val-path", directory,
               "--text-field", "review", "--label-field", "sentiment") == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["validation"]["num_examples"] == 24  # the 'validation' split was used for --val-path
