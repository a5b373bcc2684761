"""Crashes and resume: SIGKILL every trainer at random points, once inside a checkpoint save,
restart it with --resume until it finishes, and require the final weights to equal an
uninterrupted run's (CPU, fp32, same seed). A half-written checkpoint is reported and never
loaded. A NaN loss skips the step with a warning and aborts with exit 2 after K in a row.

Runs go through tests/kill_resume_worker.py, which imports torch once and forks a child per
run, so a kill is a real SIGKILL of a real process without paying the import each time.
"""
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_one_error_line, make_text_records, tiny_run_argv, write_jsonl

REPO = Path(__file__).resolve().parents[1]
KILL_SEED = 20261122
MAX_LIVES = 8
STEP_SLEEP = 0.05  # seconds per optimizer step in killed runs: spreads the kill points over the run


# ---------------------------------------------------------------- the worker

class Worker:
    """A tests/kill_resume_worker.py process; each ``start`` forks one training run."""

    def __init__(self):
        # unbuffered: a killed run's log must hold everything it printed
        environment = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.process = subprocess.Popen([sys.executable, str(REPO / "tests" / "kill_resume_worker.py")],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=environment)
        assert self.read(timeout=300) == {"ready": True}

    def read(self, timeout):
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        assert ready, "the worker did not answer in time"
        line = self.process.stdout.readline()
        assert line, "the worker died"
        return json.loads(line)

    def start(self, script, argv, log, hooks=None):
        self.process.stdin.write(json.dumps({"script": script, "argv": [str(a) for a in argv], "log": str(log),
                                             "hooks": hooks or {}}) + "\n")
        self.process.stdin.flush()
        return self.read(timeout=60)["pid"]

    def wait(self, timeout=300):
        return self.read(timeout)["status"]

    def run(self, script, argv, log):
        self.start(script, argv, log)
        return self.wait()

    def close(self):
        self.process.stdin.close()
        self.process.wait(timeout=60)


@pytest.fixture(scope="module")
def worker():
    worker = Worker()
    yield worker
    worker.close()


def wait_for(path, timeout=120):
    deadline = time.monotonic() + timeout
    while not Path(path).exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


def kill(pid):
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:  # it finished first
        pass


# ---------------------------------------------------------------- the three trainers on tiny data

def classifier_argv(tmp_path, tiny_model_dir):
    records = make_text_records(8)
    write_jsonl(tmp_path / "train.jsonl", records)
    write_jsonl(tmp_path / "val.jsonl", make_text_records(3))
    return ["--data-path", tmp_path / "train.jsonl", "--val-path", tmp_path / "val.jsonl", "--epochs", "3",
            "--batch-size", "4", "--learning-rate", "5e-3", "--eval-steps", "5", "--logging-steps", "1",
            "--dropout", "0.3", "--patience", "0"]


def vector_argv(tmp_path, tiny_model_dir):
    pairs = [{"query": q, "document": d, "rel": rel} for q, d, rel in [
        ("good movie", "a great film", 1.0), ("good movie", "stock price", 0.0), ("music", "a song", 0.9),
        ("music", "the team game", 0.1), ("sad film", "a terrible movie", 0.8), ("sad film", "happy news", 0.2),
        ("market", "stock price", 1.0), ("market", "love it", 0.0), ("sports", "the team game", 1.0),
        ("sports", "a song", 0.1)]]
    write_jsonl(tmp_path / "pairs.jsonl", pairs)
    return ["--train-path", tmp_path / "pairs.jsonl", "--val-path", tmp_path / "pairs.jsonl", "--epochs", "3",
            "--batch-size", "4", "--learning-rate", "5e-3", "--warmup-steps", "2", "--eval-steps", "5",
            "--logging-steps", "1", "--matryoshka-dims", "32,8"]  # each checkpoint fits a rotation as it is written


def longdoc_argv(tmp_path, tiny_model_dir):
    documents = [{"text": " ".join([r["text"]] * 6), "label": r["label"]} for r in make_text_records(6)]
    write_jsonl(tmp_path / "docs.jsonl", documents)
    return ["--data-path", tmp_path / "docs.jsonl", "--val-path", tmp_path / "docs.jsonl", "--epochs", "2",
            "--batch-size", "2", "--chunk-batch-size", "2", "--max-length", "12", "--stride", "4",
            "--learning-rate", "5e-3", "--eval-steps", "5", "--logging-steps", "1", "--patience", "0"]


TRAINERS = {"train_classifier": classifier_argv, "train_vector": vector_argv, "train_longdoc": longdoc_argv}


def trainer_argv(script, tmp_path, tiny_model_dir, output_dir):
    if not (REPO / f"{script}.py").is_file():
        pytest.skip(f"{script}.py is not in the repository yet")
    return [*TRAINERS[script](tmp_path, tiny_model_dir), "--model-name", tiny_model_dir, "--output-dir", output_dir,
            "--precision", "fp32", "--device", "cpu", "--seed", "7", "--save-steps", "2", "--save-total-limit", "0"]


def tensors(directory):
    """The weights, and a vector model's rotation (fitted as the checkpoint was written) where it has one."""
    stored = load_file(str(Path(directory) / "model.safetensors"))
    rotation = Path(directory) / "rotation.safetensors"
    return stored | ({"rotation": load_file(str(rotation))["rotation"]} if rotation.is_file() else {})


def assert_same_weights(expected_dir, actual_dir):
    expected, actual = tensors(expected_dir), tensors(actual_dir)
    assert expected.keys() == actual.keys()
    different = [key for key in expected if not torch.equal(expected[key], actual[key])]
    assert not different, f"{actual_dir}: {len(different)} tensors differ, e.g. {different[:3]}"


def final_checkpoint(output_dir):
    return max(Path(output_dir).glob("checkpoint-step-*"), key=lambda path: int(path.name.rsplit("-", 1)[1]))


def read_log(path):
    return Path(path).read_text(encoding="utf-8", errors="replace") if Path(path).exists() else ""


# ---------------------------------------------------------------- kill, resume, compare

def run_with_kills(worker, script, argv, output_dir, logs, rng):
    """Kill once inside a checkpoint save, then at random points, then resume until done."""
    lives = []
    progress = logs / "progress-0"
    pid = worker.start(script, [*argv, "--resume"], logs / "life-0.log",
                       {"progress": str(progress), "hang_in_save": 4, "step_sleep": STEP_SLEEP})
    wait_for(f"{progress}.in-save")
    half_written = list(Path(output_dir).glob(".tmp-checkpoint-step-4-*"))
    kill(pid)
    lives.append(worker.wait())
    assert lives[-1] == -signal.SIGKILL
    assert half_written and not (Path(output_dir) / "checkpoint-step-4").exists()
    for life in range(1, MAX_LIVES):
        progress = logs / f"progress-{life}"
        pid = worker.start(script, [*argv, "--resume"], logs / f"life-{life}.log",
                           {"progress": str(progress), "step_sleep": STEP_SLEEP})
        if life <= 2:  # two random kills once training is under way
            wait_for(progress)
            time.sleep(rng.uniform(0.0, 0.4))
            kill(pid)
        lives.append(worker.wait())
        if lives[-1] == 0:
            return lives
        assert lives[-1] == -signal.SIGKILL, read_log(logs / f"life-{life}.log")[-3000:]
    raise AssertionError(f"{script} did not finish after {MAX_LIVES} lives: {lives}")


@pytest.fixture(scope="module")
def run_setup(worker, tmp_path_factory, tiny_model_dir):
    """Per trainer: shared data files and one uninterrupted reference run, made on first use."""
    made = {}

    def setup(script):
        if script not in made:
            root = tmp_path_factory.mktemp(script)
            argv_for = lambda output_dir: trainer_argv(script, root, tiny_model_dir, output_dir)  # noqa: E731
            log = root / "reference.log"
            assert worker.run(script, argv_for(root / "reference"), log) == 0, read_log(log)[-3000:]
            made[script] = (argv_for, root / "reference")
        return made[script]
    return setup


def logged_losses(output_dir):
    """{step: training loss} from train_log.jsonl; a resumed run logs replayed steps again, identically."""
    losses = {}
    for line in (Path(output_dir) / "train_log.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            assert losses.setdefault(row["step"], row["loss"]) == row["loss"], f"step {row['step']} differs"
    return losses


def evaluated_steps(output_dir):
    rows = [json.loads(line) for line in (Path(output_dir) / "train_log.jsonl").read_text().splitlines() if line]
    return sorted({row["step"] for row in rows if "eval_loss" in row})


def assert_same_results(reference_dir, killed_dir):
    """Same final weights, same best model, same per-step losses and evaluations, same metrics."""
    assert final_checkpoint(killed_dir).name == final_checkpoint(reference_dir).name
    assert_same_weights(final_checkpoint(reference_dir), final_checkpoint(killed_dir))
    assert_same_weights(reference_dir / "checkpoint-best", killed_dir / "checkpoint-best")
    assert logged_losses(killed_dir) == logged_losses(reference_dir)
    assert evaluated_steps(killed_dir) == evaluated_steps(reference_dir)
    if (reference_dir / "metrics.json").is_file():
        expected = json.loads((reference_dir / "metrics.json").read_text())
        actual = json.loads((killed_dir / "metrics.json").read_text())
        assert expected.get("validation") == actual.get("validation")
        assert expected.get("test") == actual.get("test")


@pytest.mark.slow
@pytest.mark.parametrize("script", list(TRAINERS))
def test_sigkill_anywhere_then_resume_gives_the_uninterrupted_weights(script, worker, run_setup, tmp_path):
    argv_for, reference_dir = run_setup(script)
    killed_dir, logs = tmp_path / "killed", tmp_path / "logs"
    logs.mkdir()
    lives = run_with_kills(worker, script, argv_for(killed_dir), killed_dir, logs,
                           random.Random(f"{KILL_SEED}-{script}"))
    print(f"{script}: exit statuses of the lives {lives}")  # shown with pytest -s
    # the half-written checkpoint-step-4 was reported and removed, never loaded
    after_save_kill = read_log(logs / "life-1.log")
    assert "removing incomplete checkpoint" in after_save_kill and ".tmp-checkpoint-step-4-" in after_save_kill
    assert "checkpoint-step-2 at step 2" in after_save_kill
    assert not list(killed_dir.glob(".tmp-*"))
    assert_same_results(reference_dir, killed_dir)


@pytest.mark.slow
@pytest.mark.parametrize("script", list(TRAINERS))
def test_kill_between_the_last_checkpoint_and_the_final_evaluation(script, worker, run_setup, tmp_path):
    """A kill right after the last step's checkpoint (with --eval-steps 5 the last step is evaluated only
    because it ends the run: before the checkpoint, so the checkpoint records it): the resume goes straight
    to the end and gives the same results, checkpoint-best included."""
    argv_for, reference_dir = run_setup(script)
    killed_dir, logs = tmp_path / "killed", tmp_path / "logs"
    logs.mkdir()
    last_step = int(final_checkpoint(reference_dir).name.rsplit("-", 1)[1])
    progress = logs / "progress"
    pid = worker.start(script, argv_for(killed_dir), logs / "life-0.log",
                       {"progress": str(progress), "hang_after_save": last_step})
    wait_for(f"{progress}.saved")
    kill(pid)
    assert worker.wait() == -signal.SIGKILL
    assert worker.run(script, [*argv_for(killed_dir), "--resume"], logs / "life-1.log") == 0, \
        read_log(logs / "life-1.log")[-3000:]
    assert_same_results(reference_dir, killed_dir)


# ---------------------------------------------------------------- NaN and inf losses

def poison_backbone(monkeypatch, poisoned_calls):
    """Make the backbone's training-mode forward calls numbered in ``poisoned_calls`` return NaN states."""
    import itertools

    from transformers.models.bert import modeling_bert
    original = modeling_bert.BertModel.forward
    calls = itertools.count(1)

    def forward(self, *args, **kwargs):
        outputs = original(self, *args, **kwargs)
        if self.training and next(calls) in poisoned_calls:
            outputs.last_hidden_state = outputs.last_hidden_state * float("nan")
        return outputs
    monkeypatch.setattr(modeling_bert.BertModel, "forward", forward)


def in_process_argv(script, tmp_path, tiny_model_dir):
    argv = trainer_argv(script, tmp_path, tiny_model_dir, tmp_path / "out")
    return [str(argument) for argument in argv] + ["--max-nonfinite-steps", "3"]


class Always:
    """Every call number from ``start`` on."""

    def __init__(self, start):
        self.start = start

    def __contains__(self, number):
        return number >= self.start


@pytest.mark.parametrize("script", list(TRAINERS))
def test_a_nan_loss_skips_the_step_with_a_warning(script, tmp_path, tiny_model_dir, monkeypatch, capsys):
    module = __import__(script) if (REPO / f"{script}.py").is_file() else pytest.skip(f"{script}.py missing")
    poison_backbone(monkeypatch, {3})
    with pytest.warns(UserWarning, match="non-finite loss, skipping"):
        assert module.main(in_process_argv(script, tmp_path, tiny_model_dir)) == 0
    assert "skipped 1 optimizer steps with a non-finite loss" in capsys.readouterr().out
    weights = tensors(tmp_path / "out" / "checkpoint-best")
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())


@pytest.mark.parametrize("script", list(TRAINERS))
def test_nan_losses_in_a_row_abort_with_a_clear_message(script, tmp_path, tiny_model_dir, monkeypatch, capsys):
    module = __import__(script) if (REPO / f"{script}.py").is_file() else pytest.skip(f"{script}.py missing")
    poison_backbone(monkeypatch, Always(3))
    with pytest.warns(UserWarning, match="non-finite loss"):
        assert module.main(in_process_argv(script, tmp_path, tiny_model_dir)) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "3 optimizer steps in a row had a NaN/inf loss" in errors[0]
    for checkpoint in (tmp_path / "out").glob("checkpoint-*"):  # nothing non-finite was ever saved
        assert all(torch.isfinite(tensor).all() for tensor in tensors(checkpoint).values())


# ---------------------------------------------------------------- a run log cut short

@pytest.fixture(scope="module")
def finished_classifier_run(tiny_model_dir, tmp_path_factory):
    import train_classifier
    tmp_path = tmp_path_factory.mktemp("log")
    argv = tiny_run_argv("train_classifier", tmp_path, tiny_model_dir, tmp_path / "out")
    assert train_classifier.main(argv) == 0
    return argv, tmp_path / "out"


@pytest.fixture
def interrupted_classifier_run(finished_classifier_run, tmp_path):
    """A copy of a 2-step run without its last checkpoint: --resume continues from step 1 and appends to the log.
    Returns (argv, the copy's train_log.jsonl)."""
    argv, output_dir = finished_classifier_run
    shutil.copytree(output_dir, tmp_path / "out")
    shutil.rmtree(tmp_path / "out" / "checkpoint-step-2")
    argv = list(argv)
    argv[argv.index("--output-dir") + 1] = str(tmp_path / "out")
    return argv, tmp_path / "out" / "train_log.jsonl"


@pytest.mark.parametrize("torn", [b'{"step": 1, "loss": 0.5\n', b'{"step": 1, "loss": 0.5',
                                  b'{"step": 1, "note": "caf\xc3'],
                         ids=["with-newline", "no-newline", "cut-character"])
def test_a_torn_last_log_line_is_dropped_on_resume(torn, interrupted_classifier_run, capsys):
    """What a SIGKILL or a full disk mid-append leaves; the resumed run's rows must not join it."""
    import train_classifier
    argv, log = interrupted_classifier_run
    with open(log, "ab") as handle:
        handle.write(torn)
    assert train_classifier.main(argv + ["--resume"]) == 0, capsys.readouterr().err
    raw = log.read_bytes()
    assert torn.rstrip(b"\n") not in raw
    assert all(isinstance(json.loads(line), dict) for line in raw.splitlines() if line.strip())


def test_a_damaged_line_inside_the_log_is_one_line(interrupted_classifier_run, capsys):
    import train_classifier
    argv, log = interrupted_classifier_run
    lines = log.read_text().splitlines(keepends=True)
    log.write_text(lines[0] + '{"step": 1, "lo\n' + "".join(lines[1:]))
    before = log.read_bytes()
    capsys.readouterr()
    assert train_classifier.main(argv + ["--resume"]) == 2
    assert_one_error_line(capsys.readouterr().err, f"{log} line 2", "damaged run log")
    assert log.read_bytes() == before
