"""train_classifier.py end to end on a tiny BERT: formats, errors, resume, DDP, early stopping, round trip."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train_classifier
from common import checkpoints
from common.heads import SequenceClassifier
from conftest import make_text_records, write_json, write_jsonl

REPO = Path(__file__).resolve().parents[1]


def run(tiny_model_dir, output_dir, *extra):
    argv = ["--model-name", str(tiny_model_dir), "--output-dir", str(output_dir), "--precision", "fp32",
            "--epochs", "1", "--batch-size", "8", "--learning-rate", "5e-3", "--logging-steps", "2",
            "--save-steps", "0", *extra]
    return train_classifier.main(argv)


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
    writers = {
        "json": lambda: write_json(tmp_path / "d.json", make_text_records(12)),
        "jsonl": lambda: write_jsonl(tmp_path / "d.jsonl", make_text_records(12)),
        "csv": lambda: write_csv(tmp_path / "d.csv", make_text_records(12)),
        "tsv": lambda: write_csv(tmp_path / "d.tsv", make_text_records(12), "\t"),
        "message": lambda: write_json(tmp_path / "d.json", message_records(12)),
        "chat": lambda: write_json(tmp_path / "d.json", chat_records(12)),
    }
    assert run(tiny_model_dir, tmp_path / "out", "--data-path", str(writers[kind]()), "--val-ratio", "0.25") == 0
    config = json.loads((tmp_path / "out" / "checkpoint-best" / "config.json").read_text())
    expected_labels = {"chat": ["GPT", "Human"], "message": ["0", "1"]}.get(kind, ["negative", "positive"])
    assert [config["id2label"][str(i)] for i in range(2)] == expected_labels
    assert config["toolkit"]["preprocessing"]["record_format"] == {"message": "message", "chat": "chat"}.get(kind, "text")
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert {"accuracy", "macro_f1", "weighted_f1", "per_class", "confusion_matrix"} <= set(metrics["validation"])


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
    evaluations = [row for row in rows if "eval_loss" in row]
    assert len(evaluations) == 3  # the first sets the best, two more without improvement stop it
    assert evaluations[-1]["step"] == 6


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
    assert [row["step"] for row in rows if "eval_loss" in row] == [3, 6, 9, 12]


def test_the_hf_trainer_spellings_of_seed_002_parse():
    args = train_classifier.parse_args([
        "--model_name_or_path", "m", "--data_path", "d.json", "--output_dir", "o", "--num_train_epochs", "4",
        "--per_device_train_batch_size", "16", "--learning_rate", "3e-5", "--max_length", "64", "--logging_steps", "5",
        "--eval_steps", "7", "--save_steps", "9", "--fp16", "--gradient_accumulation_steps", "2"])
    assert (args.model_name, args.epochs, args.batch_size, args.precision, args.eval_steps) == ("m", 4, 16, "fp16", 7)


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


class Interrupted(Exception):
    pass


def test_resume_reproduces_an_uninterrupted_run(tmp_path, tiny_model_dir, text_data, monkeypatch):
    common = ["--data-path", str(text_data["train"]), "--val-path", str(text_data["val"]), "--epochs", "2",
              "--save-steps", "2", "--save-total-limit", "0", "--eval-steps", "3", "--dropout", "0.3",
              "--gradient-accumulation-steps", "2", "--batch-size", "4"]
    assert run(tiny_model_dir, tmp_path / "full", *common) == 0

    original_save = checkpoints.save_checkpoint

    def save_then_crash(output_dir, write_model, state, save_total_limit):
        original_save(output_dir, write_model, state, save_total_limit)
        if state["global_step"] == 4:  # mid-epoch, after an evaluation at step 3
            raise Interrupted()
    monkeypatch.setattr(checkpoints, "save_checkpoint", save_then_crash)
    with pytest.raises(Interrupted):
        run(tiny_model_dir, tmp_path / "resumed", *common)
    monkeypatch.setattr(checkpoints, "save_checkpoint", original_save)
    assert run(tiny_model_dir, tmp_path / "resumed", *common, "--resume") == 0

    final_step = max(int(p.name.rsplit("-", 1)[1]) for p in (tmp_path / "full").glob("checkpoint-step-*"))
    for directory in (f"checkpoint-step-{final_step}", "checkpoint-best"):
        full = load_file(str(tmp_path / "full" / directory / "model.safetensors"))
        resumed = load_file(str(tmp_path / "resumed" / directory / "model.safetensors"))
        assert all(torch.equal(full[key], resumed[key]) for key in full), directory
    full_metrics = json.loads((tmp_path / "full" / "metrics.json").read_text())
    resumed_metrics = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert full_metrics["validation"] == resumed_metrics["validation"]


def test_torchrun_two_processes_on_cpu(tmp_path, tiny_model_dir, text_data):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(29500 + os.getpid() % 1000), str(REPO / "train_classifier.py"), "--data-path",
               str(text_data["train"]), "--val-path", str(text_data["val"]), "--model-name", str(tiny_model_dir),
               "--output-dir", str(tmp_path / "out"), "--epochs", "2", "--batch-size", "4", "--device", "cpu",
               "--precision", "fp32", "--eval-steps", "3", "--save-steps", "3", "--logging-steps", "1", "--patience", "0"]
    environment = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    steps = [row["step"] for row in rows if "loss" in row]
    assert steps == sorted(set(steps))  # only rank 0 logs: no duplicate rows
    # 24 records per class x 2 classes = 48 / (batch 4 x 2 ranks) = 6 steps per epoch
    assert max(steps) == 12
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["validation"]["num_examples"] == 16  # gathered from both ranks, nothing lost or doubled


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
