"""Runs training scripts in forked children so tests can SIGKILL them (tests/test_kill_resume.py).

Importing torch and transformers takes seconds; this process imports them once and forks a
child per run, so a test can kill and restart a trainer many times cheaply. Protocol, one JSON
object per line: the test writes {"script", "argv", "log", "hooks"}; the worker answers
{"pid": N} when the child starts and {"status": S} when it ends (exit code, or -signal).

Hooks, installed in the child before ``main`` runs:
  progress      file that gets one line per optimizer step, so the test knows training runs
  step_sleep    seconds to sleep after each optimizer step, spreading kills over the run
  hang_in_save  step N: the save of checkpoint-step-N writes its temporary directory, touches
                ``<progress>.in-save`` and sleeps before the rename, waiting to be killed
  hang_after_save  step N: once checkpoint-step-N is complete, touch ``<progress>.saved`` and sleep
"""
import importlib
import json
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from common import checkpoints, optimization  # noqa: E402

SCRIPTS = ("train_classifier", "train_vector", "train_longdoc")


def install_hooks(hooks):
    progress = Path(hooks["progress"]) if hooks.get("progress") else None
    original_step = optimization.optimizer_step

    def optimizer_step(*args, **kwargs):
        result = original_step(*args, **kwargs)
        if progress is not None:
            with open(progress, "a") as handle:
                handle.write("step\n")
        time.sleep(hooks.get("step_sleep", 0.0))
        return result
    optimization.optimizer_step = optimizer_step

    hang_step = hooks.get("hang_in_save")
    original_fsync = checkpoints.write_checksums

    def fsync_then_hang(directory):
        original_fsync(directory)
        if hang_step is not None and Path(directory).name.startswith(f".tmp-checkpoint-step-{hang_step}-"):
            Path(f"{progress}.in-save").write_text(str(directory))
            time.sleep(600)  # the rename never comes: the test kills us here
    checkpoints.write_checksums = fsync_then_hang

    after_step = hooks.get("hang_after_save")
    original_write = checkpoints.write_directory_atomically

    def write_then_hang(final_dir, write_contents):
        result = original_write(final_dir, write_contents)
        if after_step is not None and Path(final_dir).name == f"checkpoint-step-{after_step}":
            Path(f"{progress}.saved").write_text(str(final_dir))
            time.sleep(600)  # killed after the checkpoint, before whatever follows it
        return result
    checkpoints.write_directory_atomically = write_then_hang


def run_child(command):
    """In the forked child: redirect output to the log, install hooks, run main, exit."""
    log = os.open(command["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    exit_code = 3
    try:
        torch.set_num_threads(1)  # same arithmetic in every run, and gentle on shared CPUs
        install_hooks(command.get("hooks", {}))
        exit_code = importlib.import_module(command["script"]).main(command["argv"])
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code if isinstance(exit_code, int) else 3)


def main():
    for script in SCRIPTS:  # import before forking: the children then start at once
        try:
            importlib.import_module(script)
        except ModuleNotFoundError as error:
            if error.name != script:
                raise
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        pid = os.fork()
        if pid == 0:
            run_child(command)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        print(json.dumps({"status": code}), flush=True)


if __name__ == "__main__":
    main()
