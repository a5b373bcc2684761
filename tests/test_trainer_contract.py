"""The trainer contract, one test per clause over the three training scripts: each trains and writes
checkpoint-best and run.json; resumes bit-exactly after a crash; trains under torchrun with two
processes; evaluates a saved model; refuses an output directory it cannot write; and writes the same
log-row keys, checkpoint schema and run files. A trainer that drifts from the others fails here."""
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from common import checkpoints, inference, rundir
from conftest import (NEGATIVE, POSITIVE, assert_one_error_line, make_text_records, snapshot_files, trainer_argv,
                      write_jsonl)

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ("train_classifier", "train_longdoc", "train_vector")
TASKS = {"train_classifier": "classification", "train_longdoc": "longdoc", "train_vector": "vector"}

# 24 training records, batch 4, two batches a step: 3 steps an epoch, 6 in two epochs. A checkpoint every
# 2 steps (the last at step 6), an evaluation every 3 and at each epoch end; the crash comes right after
# the step-4 checkpoint: mid-epoch, after an evaluation. Dropout is on, so the restored RNG matters.
CONTRACT_FLAGS = ["--epochs", "2", "--batch-size", "4", "--gradient-accumulation-steps", "2", "--save-steps", "2",
                  "--save-total-limit", "0", "--eval-steps", "3", "--logging-steps", "1", "--patience", "0"]
SCRIPT_FLAGS = {"train_classifier": ["--dropout", "0.3"], "train_longdoc": ["--dropout", "0.3"],
                "train_vector": ["--loss", "cosent"]}
STEPS, CRASH_STEP, VALIDATION_RECORDS = 6, 4, 8
STEPS_WITH_TWO_PROCESSES = 4  # each process gets 3 batches an epoch: steps end after batches 2 and 3

TRAINING_ROW_KEYS = {"step", "epoch", "loss", "learning_rate", "grad_norm", "samples_per_second"}
EVALUATION_ROW_KEYS = {"step", "epoch", "eval_loss", "best", "improved"}
STATE_KEYS = {"optimizer", "scheduler", "scaler", "rng", "epoch", "step_in_epoch", "global_step", "evaluated_step",
              "early_stopping", "run_id", "options", "inputs", "args"}
STATE_EXTRAS = {"train_classifier": {"ema"}, "train_longdoc": set(), "train_vector": {"summary"}}


# ---------------------------------------------------------------- data and runs

def pair_records(count):
    """Two queries, each with a relevant and an irrelevant document per record pair: 2 * count pairs."""
    records = []
    for index in range(count):
        query, relevant, other = ("good movie", POSITIVE, NEGATIVE) if index % 2 else ("bad movie", NEGATIVE, POSITIVE)
        records.append({"query": query, "document": relevant[index % len(relevant)], "rel": 1.0})
        records.append({"query": query, "document": other[index % len(other)], "rel": 0.0})
    return records


def document_records(count):
    """Texts repeated four times: one to three 16-token windows each, so processes run unequal chunk passes."""
    return [dict(record, text=" ".join([record["text"]] * 4)) for record in make_text_records(count)]


def write_data(script, directory):
    """{'train': 24 records, 'val': 8 records} in the script's record format."""
    make = {"train_classifier": make_text_records, "train_longdoc": document_records,
            "train_vector": pair_records}[script]
    return {split: write_jsonl(Path(directory) / f"{split}.jsonl", make(count)) for split, count in
            (("train", 12), ("val", VALIDATION_RECORDS // 2))}


def contract_argv(script, model_dir, data, output_dir, *extra):
    return trainer_argv(script, model_dir, output_dir, "--data-path", data["train"], "--val-path", data["val"],
                        *CONTRACT_FLAGS, *SCRIPT_FLAGS[script], *extra)


def main_of(script):
    return importlib.import_module(script).main


def read_rows(output_dir):
    return [json.loads(line) for line in (Path(output_dir) / "train_log.jsonl").read_text().splitlines()]


def step_checkpoints(output_dir):
    return sorted((int(path.name.rsplit("-", 1)[1]), path) for path in Path(output_dir).glob("checkpoint-step-*"))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir):
    """script -> (data, output dir) of one uninterrupted contract run, trained on first use."""
    runs = {}

    def get(script):
        if script not in runs:
            directory = tmp_path_factory.mktemp(script)
            data = write_data(script, directory)
            assert main_of(script)(contract_argv(script, tiny_model_dir, data, directory / "run")) == 0
            runs[script] = data, directory / "run"
        return runs[script]
    return get


# ---------------------------------------------------------------- trains, saves

@pytest.mark.parametrize("script", SCRIPTS)
def test_trains_and_writes_checkpoint_best_and_run_json(script, uninterrupted):
    _, output_dir = uninterrupted(script)
    record = rundir.read_run_record(output_dir)
    assert record is not None and record["script"] == f"{script}.py"
    assert inference.load_model(str(output_dir / "checkpoint-best")).task == TASKS[script]
    assert [step for step, _ in step_checkpoints(output_dir)] == [2, 4, 6]
    for step, directory in step_checkpoints(output_dir):
        assert inference.load_model(str(directory)).task == TASKS[script]  # every checkpoint is a model directory
        checkpoints.verify_checksums(directory)


# ---------------------------------------------------------------- resumes bit-exactly

class Interrupted(Exception):
    """The crash: raised right after a checkpoint was saved."""


@pytest.mark.parametrize("script", SCRIPTS)
def test_resume_after_a_crash_is_bit_exact(script, uninterrupted, tiny_model_dir, tmp_path, monkeypatch):
    data, full = uninterrupted(script)
    resumed = tmp_path / "resumed"
    original_save = checkpoints.save_checkpoint

    def save_then_crash(output_dir, write_model, state, save_total_limit):
        original_save(output_dir, write_model, state, save_total_limit)
        if state["global_step"] == CRASH_STEP:
            raise Interrupted()
    monkeypatch.setattr(checkpoints, "save_checkpoint", save_then_crash)
    with pytest.raises(Interrupted):
        main_of(script)(contract_argv(script, tiny_model_dir, data, resumed))
    assert step_checkpoints(resumed)[-1][0] == CRASH_STEP
    monkeypatch.setattr(checkpoints, "save_checkpoint", original_save)
    assert main_of(script)(contract_argv(script, tiny_model_dir, data, resumed, "--resume")) == 0

    for directory in (f"checkpoint-step-{STEPS}", "checkpoint-best"):
        expected = load_file(str(full / directory / "model.safetensors"))
        actual = load_file(str(resumed / directory / "model.safetensors"))
        assert expected.keys() == actual.keys(), directory
        differing = [name for name in expected if not torch.equal(expected[name], actual[name])]
        assert not differing, (directory, differing[:5])
    # the log continues where the crash cut it: the same losses, learning rates and evaluations
    measured = ("loss", "learning_rate", "grad_norm", "eval_loss", "best", "improved")
    by_step = [{(row["step"], "eval_loss" in row): {key: row.get(key) for key in measured} for row in read_rows(run)}
               for run in (full, resumed)]
    assert by_step[0] == by_step[1]


@pytest.mark.parametrize("script", SCRIPTS)
def test_an_epoch_end_checkpoint_is_saved_after_its_evaluation(script, tiny_model_dir, tmp_path, monkeypatch):
    """With checkpoints every 3 steps (the epoch ends) and no step evaluations, each checkpoint's stored
    early-stopping state already counts the evaluation of its own step, and those weights are validated once."""
    data = write_data(script, tmp_path)
    module = importlib.import_module(script)
    validations = []
    if script == "train_vector":  # its checkpoints carry validation figures: measured once per step, not twice
        original_validation = module.evaluate_validation
        monkeypatch.setattr(module, "evaluate_validation",
                            lambda *args: validations.append(args) or original_validation(*args))
    output_dir = tmp_path / "run"
    argv = contract_argv(script, tiny_model_dir, data, output_dir, "--save-steps", "3", "--eval-steps", "0")
    assert main_of(script)(argv) == 0
    assert [step for step, _ in step_checkpoints(output_dir)] == [3, 6]
    for step, directory in step_checkpoints(output_dir):
        state = torch.load(directory / checkpoints.TRAINER_STATE_FILE, map_location="cpu", weights_only=True)
        assert state["evaluated_step"] == step
    evaluations = [row["step"] for row in read_rows(output_dir) if "eval_loss" in row]
    assert evaluations[-2:] == [3, 6] and len(set(evaluations)) == len(evaluations)
    if script == "train_vector":
        assert len(validations) == len(evaluations)


# ---------------------------------------------------------------- torchrun

@pytest.mark.parametrize("script", SCRIPTS)
def test_torchrun_two_processes_on_cpu(script, tiny_model_dir, tmp_path):
    data = write_data(script, tmp_path)
    output_dir = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO / f"{script}.py"), *contract_argv(script, tiny_model_dir, data, output_dir)]
    environment = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "processes: 2" in result.stdout
    steps = [row["step"] for row in read_rows(output_dir) if "loss" in row]
    assert steps == list(range(1, STEPS_WITH_TWO_PROCESSES + 1))  # only the main process logs, once a step
    assert inference.load_model(str(output_dir / "checkpoint-best")).task == TASKS[script]
    assert [step for step, _ in step_checkpoints(output_dir)] == [2, 4]
    if script != "train_vector":  # gathered from both processes: nothing lost or counted twice
        metrics = json.loads((output_dir / "metrics.json").read_text())
        assert metrics["validation"]["num_examples"] == VALIDATION_RECORDS


# ---------------------------------------------------------------- evaluates a saved model

@pytest.mark.parametrize("script", SCRIPTS)
def test_evaluate_only(script, uninterrupted, tmp_path):
    data, output_dir = uninterrupted(script)
    runtime = ["--precision", "fp32", "--device", "cpu"]
    if script == "train_vector":
        argv = ["--mode", "evaluate", "--test-path", str(data["val"]), "--output-dir", str(output_dir), *runtime]
        metrics_path = output_dir / "eval_metrics.json"
    else:
        argv = ["--eval-only", "--model-path", str(output_dir / "checkpoint-best"), "--test-path", str(data["val"]),
                "--output-dir", str(tmp_path / "evaluation"), *runtime]
        metrics_path = tmp_path / "evaluation" / "metrics.json"
    assert main_of(script)(argv) == 0
    metrics = json.loads(metrics_path.read_text())
    if script == "train_vector":
        assert metrics["queries"] == 2 and 0.0 <= metrics["ndcg@1"] <= 1.0
    else:
        assert metrics["test"]["num_examples"] == VALIDATION_RECORDS and 0.0 <= metrics["test"]["accuracy"] <= 1.0


# ---------------------------------------------------------------- refuses what it cannot write

@pytest.mark.parametrize("script", SCRIPTS)
def test_an_output_dir_that_is_a_file_exits_2_with_one_line(script, tiny_model_dir, tmp_path, capsys):
    data = write_data(script, tmp_path)
    target = tmp_path / "out"
    target.write_text("not a directory\n")
    before = snapshot_files(tmp_path)
    assert main_of(script)(contract_argv(script, tiny_model_dir, data, target)) == 2
    assert_one_error_line(capsys.readouterr().err, str(target))
    assert snapshot_files(tmp_path) == before


# ---------------------------------------------------------------- the same log rows, checkpoint schema, run files

@pytest.mark.parametrize("script", SCRIPTS)
def test_log_rows_have_the_shared_keys(script, uninterrupted):
    _, output_dir = uninterrupted(script)
    rows = read_rows(output_dir)
    training = [row for row in rows if "loss" in row]
    evaluations = [row for row in rows if "eval_loss" in row]
    assert [row["step"] for row in training] == list(range(1, STEPS + 1))
    # every 3 steps and at epoch ends (step 3 once); an evaluation of the untuned model at step 0 may come first
    assert [row["step"] for row in evaluations if row["step"] > 0] == [3, 6]
    for row in training:  # one throughput key, the same in every trainer
        assert row.keys() == TRAINING_ROW_KEYS, row
    for row in evaluations:
        assert EVALUATION_ROW_KEYS <= row.keys(), row


@pytest.mark.parametrize("script", SCRIPTS)
def test_checkpoint_state_has_the_one_schema(script, uninterrupted):
    _, output_dir = uninterrupted(script)
    run_id = rundir.read_run_record(output_dir)["run_id"]
    for step, directory in step_checkpoints(output_dir):
        state = torch.load(directory / checkpoints.TRAINER_STATE_FILE, map_location="cpu", weights_only=True)
        assert set(state) == STATE_KEYS | STATE_EXTRAS[script], sorted(set(state) ^ (STATE_KEYS | STATE_EXTRAS[script]))
        assert (state["global_step"], state["run_id"]) == (step, run_id)


@pytest.mark.parametrize("script", SCRIPTS)
def test_writes_training_args(script, uninterrupted):
    _, output_dir = uninterrupted(script)
    saved = json.loads((output_dir / "training_args.json").read_text())
    assert (saved["learning_rate"], saved["gradient_accumulation_steps"], saved["epochs"]) == (5e-3, 2, 2)


@pytest.mark.parametrize("script", SCRIPTS)
def test_writes_dataset_summary(script, uninterrupted):
    _, output_dir = uninterrupted(script)
    summaries = json.loads((output_dir / "dataset_summary.json").read_text())
    assert [summary["split"] for summary in summaries] == ["train", "val"]
