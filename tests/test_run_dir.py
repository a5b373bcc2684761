"""Nothing a user owns is destroyed: the output directory, resume and checkpoint writes.

Every refusal is exit code 2 with one ``error:`` line, and every file that existed before
(base model, data, an earlier run's results) is byte-identical afterwards.
"""
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from common import checkpoints, rundir
from conftest import assert_one_error_line, snapshot_files, tiny_run_argv

REPO = Path(__file__).resolve().parents[1]
TRAINERS = ("train_classifier", "train_vector", "train_longdoc")


def run(script, argv, capsys):
    """main(argv) of a trainer -> (exit code, stderr)."""
    capsys.readouterr()
    code = __import__(script).main([str(argument) for argument in argv])
    return code, capsys.readouterr().err


def with_flag(argv, flag, value):
    """argv with ``flag`` set to ``value`` (replaced when present)."""
    argv = list(argv)
    if flag in argv:
        argv[argv.index(flag) + 1] = str(value)
        return argv
    return argv + [flag, str(value)]


@pytest.fixture(scope="module")
def finished_runs(tiny_model_dir, tmp_path_factory):
    """One finished 2-step run per trainer: {script: (argv, output_dir)}."""
    runs = {}
    for script in TRAINERS:
        tmp_path = tmp_path_factory.mktemp(script)
        argv = tiny_run_argv(script, tmp_path, tiny_model_dir, tmp_path / "out")
        assert __import__(script).main(argv) == 0
        runs[script] = (argv, tmp_path / "out")
    return runs


# ---------------------------------------------------------------- the output directory

@pytest.mark.parametrize("script", TRAINERS)
def test_an_output_directory_holding_the_base_model_is_refused(script, tiny_model_dir, tmp_path, capsys):
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    before = snapshot_files(base)
    argv = tiny_run_argv(script, tmp_path, base, base)
    code, err = run(script, argv, capsys)
    assert code == 2
    assert_one_error_line(err, str(base), "--model-name", "never writes into its inputs")
    assert snapshot_files(base) == before


@pytest.mark.parametrize("script", TRAINERS)
def test_a_directory_of_files_the_toolkit_did_not_write_is_refused(script, tiny_model_dir, tmp_path, capsys):
    """E.g. the base model's parent, or a copy of a model next to the data."""
    foreign = tmp_path / "downloads"
    shutil.copytree(tiny_model_dir, foreign / "some-model")
    before = snapshot_files(foreign)
    code, err = run(script, tiny_run_argv(script, tmp_path, tiny_model_dir, foreign), capsys)
    assert code == 2
    assert_one_error_line(err, str(foreign), "not written by this toolkit")
    assert snapshot_files(foreign) == before


@pytest.mark.parametrize("script", TRAINERS)
def test_a_finished_run_is_kept_until_overwrite_is_asked_for(script, finished_runs, tmp_path, capsys):
    argv, output_dir = finished_runs[script]
    (output_dir / "my-notes.txt").write_text("the user's own file")
    before = snapshot_files(output_dir)
    first_run_id = rundir.read_run_record(output_dir)["run_id"]
    code, err = run(script, argv, capsys)
    assert code == 2
    assert_one_error_line(err, "holds the results of an earlier run", "--overwrite-output-dir", "--resume")
    assert snapshot_files(output_dir) == before

    assert run(script, argv + ["--overwrite-output-dir"], capsys)[0] == 0
    assert rundir.read_run_record(output_dir)["run_id"] != first_run_id
    assert (output_dir / "my-notes.txt").read_text() == "the user's own file"
    assert len(checkpoints.list_checkpoints(output_dir)) == 2  # the earlier run's checkpoints are gone


def test_resume_where_only_results_remain_is_refused(tiny_model_dir, tmp_path, capsys):
    """--resume used to 'start from scratch' over a finished model that kept no step checkpoint."""
    argv = with_flag(tiny_run_argv("train_classifier", tmp_path, tiny_model_dir, tmp_path / "out"), "--save-steps", 0)
    assert run("train_classifier", argv, capsys)[0] == 0
    before = snapshot_files(tmp_path / "out")
    code, err = run("train_classifier", argv + ["--resume"], capsys)
    assert code == 2
    assert_one_error_line(err, "holds the results of an earlier run")
    assert snapshot_files(tmp_path / "out") == before


def test_resume_in_a_new_directory_starts_the_run(tiny_model_dir, tmp_path, capsys):
    """A retry loop that always passes --resume must work on its first try (nothing can be lost)."""
    argv = tiny_run_argv("train_classifier", tmp_path, tiny_model_dir, tmp_path / "out")
    code, err = run("train_classifier", argv + ["--resume"], capsys)
    assert code == 0 and "starting from the beginning" in err


def test_an_input_where_the_run_writes_is_refused(finished_runs, tmp_path, capsys):
    argv, output_dir = finished_runs["train_classifier"]
    data_in_outputs = output_dir / "metrics.json"
    shutil.copyfile(argv[argv.index("--data-path") + 1], data_in_outputs)
    before = snapshot_files(output_dir)
    code, err = run("train_classifier", with_flag(argv, "--data-path", data_in_outputs) + ["--overwrite-output-dir"],
                    capsys)
    assert code == 2
    assert_one_error_line(err, "--data-path", "lies where the run writes")
    assert snapshot_files(output_dir) == before


def test_two_runs_never_mix_their_checkpoints(finished_runs):
    _, output_dir = finished_runs["train_vector"]
    run_id = rundir.read_run_record(output_dir)["run_id"]
    assert checkpoints.list_checkpoints(output_dir, run_id)
    assert checkpoints.list_checkpoints(output_dir, "another-run") == []


# ---------------------------------------------------------------- resume verifies what it loads

@pytest.fixture
def interrupted_run(tiny_model_dir, tmp_path, capsys):
    """A classifier run stopped after step 1 of 2 (its checkpoint is what --resume loads)."""
    argv = tiny_run_argv("train_classifier", tmp_path, tiny_model_dir, tmp_path / "out")
    assert run("train_classifier", argv, capsys)[0] == 0
    shutil.rmtree(tmp_path / "out" / "checkpoint-step-2")
    return argv, tmp_path / "out"


def test_a_corrupted_checkpoint_is_refused_naming_the_file(interrupted_run, capsys):
    argv, output_dir = interrupted_run
    state_file = output_dir / "checkpoint-step-1" / checkpoints.TRAINER_STATE_FILE
    damaged = bytearray(state_file.read_bytes())
    middle = len(damaged) // 2
    damaged[middle:middle + 64] = bytes(byte ^ 0xFF for byte in damaged[middle:middle + 64])
    state_file.write_bytes(bytes(damaged))
    before = snapshot_files(output_dir)
    code, err = run("train_classifier", argv + ["--resume"], capsys)
    assert code == 2
    assert_one_error_line(err, str(state_file), "checksum mismatch")
    assert snapshot_files(output_dir) == before


def test_resume_with_other_data_shaping_options_lists_them(interrupted_run, capsys):
    argv, output_dir = interrupted_run
    changed = with_flag(with_flag(argv, "--batch-size", 3), "--max-length", 8) + ["--resume"]
    before = snapshot_files(output_dir)
    code, err = run("train_classifier", changed, capsys)
    assert code == 2
    assert_one_error_line(err, "--batch-size 4 -> 3", "--max-length 128 -> 8", "--resume-force")
    assert snapshot_files(output_dir) == before
    assert run("train_classifier", changed + ["--resume-force"], capsys)[0] == 0


def test_resume_with_another_freeze_backbone_is_one_line_even_when_forced(interrupted_run, capsys):
    """--freeze-backbone changes the optimizer's parameters: resuming across it was a ValueError traceback
    from torch; --val-ratio (another training split) resumed without a word."""
    argv, output_dir = interrupted_run
    before = snapshot_files(output_dir)
    code, err = run("train_classifier", argv + ["--freeze-backbone", "--val-ratio", "0.3", "--resume"], capsys)
    assert code == 2
    assert_one_error_line(err, "--freeze-backbone False -> True", "--val-ratio 0.1 -> 0.3")
    assert snapshot_files(output_dir) == before
    code, err = run("train_classifier", argv + ["--freeze-backbone", "--resume", "--resume-force"], capsys)
    assert code == 2
    assert_one_error_line(err, "optimizer state does not fit", "--freeze-backbone")


def test_resume_with_another_weight_decay_or_dropout_is_refused(interrupted_run, capsys):
    """The saved optimizer state would overwrite another --weight-decay without a word; --dropout and
    --label-smoothing change every step from the resumed one on."""
    argv, output_dir = interrupted_run
    changed = argv + ["--weight-decay", "0.2", "--dropout", "0.3", "--label-smoothing", "0.1", "--resume"]
    before = snapshot_files(output_dir)
    code, err = run("train_classifier", changed, capsys)
    assert code == 2
    assert_one_error_line(err, "--weight-decay 0.01 -> 0.2", "--dropout 0.1 -> 0.3", "--label-smoothing 0.0 -> 0.1")
    assert snapshot_files(output_dir) == before


def test_resume_after_the_data_changed_is_refused(interrupted_run, capsys):
    argv, _ = interrupted_run
    data_path = Path(argv[argv.index("--data-path") + 1])
    data_path.write_text(data_path.read_text() + json.dumps({"text": "new", "label": "positive"}) + "\n")
    code, err = run("train_classifier", argv + ["--resume"], capsys)
    assert code == 2
    assert_one_error_line(err, "--data-path content changed")


def test_resume_with_another_label_set_is_one_line(interrupted_run, capsys):
    argv, _ = interrupted_run
    code, err = run("train_classifier", argv + ["--labels", "negative,positive,neutral", "--resume"], capsys)
    assert code == 2
    assert_one_error_line(err, "--labels")


def copy_of_finished_run(finished_runs, tmp_path, script="train_classifier"):
    """A copy of a finished run, to damage: (its argv, the copy)."""
    argv, output_dir = finished_runs[script]
    shutil.copytree(output_dir, tmp_path / "copy")
    return with_flag(argv, "--output-dir", tmp_path / "copy"), tmp_path / "copy"


@pytest.mark.parametrize("raw", [b'{"run_id": "x"', b"[]", b'{"script": "train_classifier.py"}', b"\xff\xfe{"],
                         ids=["truncated", "list", "no-run-id", "not-utf8"])
def test_a_damaged_run_json_is_named_and_nothing_is_deleted(raw, finished_runs, tmp_path, capsys):
    """It used to be called 'not written by this toolkit', which hid the cause."""
    argv, output_dir = copy_of_finished_run(finished_runs, tmp_path)
    (output_dir / rundir.RUN_FILE).write_bytes(raw)
    before = snapshot_files(output_dir)
    for extra in (["--resume"], ["--overwrite-output-dir"], []):
        code, err = run("train_classifier", argv + extra, capsys)
        assert code == 2
        assert_one_error_line(err, str(output_dir / rundir.RUN_FILE), "damaged run.json")
    assert snapshot_files(output_dir) == before


@pytest.mark.parametrize("text", ["[]", "{}", '{"config.json": 5}', '"sums"'])
def test_a_checksum_list_that_lists_no_files_is_refused(text, finished_runs, tmp_path, capsys):
    """Every checkpoint this toolkit writes has files to check: an empty or malformed list verifies nothing."""
    argv, output_dir = copy_of_finished_run(finished_runs, tmp_path)
    manifest = output_dir / "checkpoint-step-2" / checkpoints.CHECKSUM_FILE
    manifest.write_text(text)
    before = snapshot_files(output_dir)
    code, err = run("train_classifier", argv + ["--resume"], capsys)
    assert code == 2
    assert_one_error_line(err, str(manifest), "damaged checksum list")
    assert snapshot_files(output_dir) == before


# ---------------------------------------------------------------- atomic directory writes

def write_marker(text):
    def write(directory):
        (Path(directory) / "weights.bin").write_text(text)
    return write


@pytest.mark.parametrize("exchange_supported", [True, False])
def test_a_directory_is_replaced_whole(exchange_supported, tmp_path, monkeypatch):
    if not exchange_supported:
        monkeypatch.setattr(checkpoints, "_exchange", lambda first, second: False)
    target = tmp_path / "checkpoint-best"
    checkpoints.write_directory_atomically(target, write_marker("old"))
    checkpoints.write_directory_atomically(target, write_marker("new"))
    assert (target / "weights.bin").read_text() == "new"
    assert json.loads((target / checkpoints.CHECKSUM_FILE).read_text())["weights.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-best"]


def test_a_kill_between_the_two_renames_loses_nothing(tmp_path):
    """Where no atomic exchange exists the old version is parked as .old-*: it comes back."""
    parked = tmp_path / ".old-checkpoint-best-4242"
    parked.mkdir()
    (parked / "weights.bin").write_text("old")
    checkpoints.recover_interrupted_writes(tmp_path)
    assert (tmp_path / "checkpoint-best" / "weights.bin").read_text() == "old"
    assert not parked.exists()


def test_checkpoint_directories_follow_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        checkpoints.write_directory_atomically(tmp_path / "checkpoint-best", write_marker("x"))
    finally:
        os.umask(previous)
    assert (tmp_path / "checkpoint-best").stat().st_mode & 0o777 == 0o755


def test_a_full_disk_while_saving_is_one_line(tiny_model_dir, tmp_path):
    """RLIMIT_FSIZE makes writes fail with EFBIG, as a full disk does; inputs stay intact."""
    argv = tiny_run_argv("train_classifier", tmp_path, tiny_model_dir, tmp_path / "out")
    before = snapshot_files(tiny_model_dir, tmp_path / "d.jsonl")
    file_limit = 20_000  # bytes: the logs fit, the weights do not

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))
    result = subprocess.run([sys.executable, str(REPO / "train_classifier.py"), *argv], capture_output=True,
                            text=True, timeout=300, preexec_fn=limit_file_size, cwd=REPO,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    assert result.returncode == 2, result.stderr
    assert_one_error_line(result.stderr, "cannot write")
    assert not list((tmp_path / "out").glob(".tmp-*"))
    assert snapshot_files(tiny_model_dir, tmp_path / "d.jsonl") == before


def test_vector_metrics_never_replace_an_input_or_a_model_file(finished_runs, capsys):
    argv, output_dir = finished_runs["train_vector"]
    test_path = argv[argv.index("--train-path") + 1]
    for target in (test_path, output_dir / "checkpoint-best" / "model.safetensors"):
        before = snapshot_files(test_path, output_dir)
        code, err = run("train_vector", ["--mode", "evaluate", "--test-path", test_path, "--output-dir", output_dir,
                                         "--metrics-path", target, "--device", "cpu"], capsys)
        assert code == 2
        assert_one_error_line(err, "--metrics-path", "would overwrite")
        assert snapshot_files(test_path, output_dir) == before


def test_checkpoint_best_checksums_still_hold_after_calibration_rewrites_config(tiny_model_dir, tmp_path, capsys,
                                                                               monkeypatch):
    """finish() stores the fitted temperature in checkpoint-best/config.json after the directory was written."""
    from common import calibration
    original = calibration.calibration_report

    def applied(logits, labels, **kwargs):
        return dict(original(logits, labels, **kwargs), temperature=1.7, applied=True)
    monkeypatch.setattr(calibration, "calibration_report", applied)
    argv = tiny_run_argv("train_classifier", tmp_path, tiny_model_dir, tmp_path / "out")
    assert run("train_classifier", argv, capsys)[0] == 0
    best = tmp_path / "out" / "checkpoint-best"
    assert json.loads((best / "config.json").read_text())["toolkit"]["temperature"] == 1.7
    checkpoints.verify_checksums(best)
