"""The run directory: where a training run writes, and the rules that keep it from destroying
anything it did not create.

A directory a trainer writes into holds ``run.json`` (run id, script, start time). A run may
  - claim a new or empty directory, or one holding only an earlier run's start-up files
    (no checkpoint, no results: that run died before it produced anything);
  - continue its own run with ``--resume``;
  - replace an earlier run's results with ``--overwrite-output-dir`` (only what a run writes is
    removed; other files stay).
Anything else is refused with one line: a directory with files this toolkit did not write (a
base model, a data folder), or one holding a finished run. An input file that the run would
overwrite is refused too. ``--resume`` where no checkpoint exists yet starts from the beginning
only when nothing would be lost (a retry loop that always passes --resume keeps working).
"""
import fnmatch
import json
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from common.checkpoints import CHECKPOINT_PREFIX, recover_interrupted_writes
from common.errors import UserError

RUN_FILE = "run.json"
# Everything a run writes at the top of its directory; --overwrite-output-dir removes only these.
RUN_OUTPUT_PATTERNS = (
    RUN_FILE, "checkpoint-*", ".tmp-*", ".old-*", ".*.publishing", "train_log.jsonl", "training_args.json",
    "dataset_summary.json", "metrics.json", "errors.jsonl", "*.png", "best_checkpoint.json",
    "eval_metrics.json", "eval_results.json", "config.json", "model.safetensors", "rotation.safetensors",
    "checksums.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
    "added_tokens.json", "MODEL_CARD.md",
)
# What shows an earlier run produced something worth keeping.
RESULT_PATTERNS = ("checkpoint-*", "metrics.json", "best_checkpoint.json", "model.safetensors")


def matches(name, patterns):
    return any(fnmatch.fnmatch(name, pattern) for pattern in patterns)


def read_run_record(directory):
    """run.json of a directory this toolkit wrote, or None when there is none.

    A run.json that cannot be read is an error naming it, not a foreign directory: calling it
    foreign would hide the cause, and nothing in the directory is deleted either way.
    """
    path = Path(directory) / RUN_FILE
    try:
        record = json.loads(path.read_bytes())
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as error:
        raise UserError(f"{path}: cannot read run.json ({error.strerror or error})") from None
    except ValueError:  # also a UnicodeDecodeError
        record = None
    if not isinstance(record, dict) or not isinstance(record.get("run_id"), str):
        raise UserError(f"{path}: damaged run.json (expected a JSON object with a run_id); restore it or "
                        "choose a new output directory (nothing was changed)")
    return record


@dataclass
class RunDirectory:
    """A directory claimed for a run. Nothing in it changes until ``begin()``, which is called once
    the run's data and model have been checked: bad data never costs an earlier run's results."""
    path: Path
    run_id: str
    script: str
    replaces_earlier_outputs: bool = False

    def begin(self):
        """Remove what an earlier run left (when replacing it) and record this run in run.json."""
        if self.replaces_earlier_outputs:
            remove_run_outputs(self.path)
        if read_run_record(self.path) is None or self.replaces_earlier_outputs:
            record = {"run_id": self.run_id, "script": self.script,
                      "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            (self.path / RUN_FILE).write_text(json.dumps(record, indent=2), encoding="utf-8")
        return self.path


def prepare_run_dir(path, flag, script, inputs=(), overwrite=False, resume=None):
    """Check that a run of ``script`` may write into ``path``; return its RunDirectory (not yet begun).

    ``inputs`` are the paths the run reads; one that lies where the run writes is refused.
    """
    directory = Path(path)
    if directory.exists() and not directory.is_dir():
        raise UserError(f"{flag} {path}: exists and is a file, not a directory")
    refuse_inputs_in_outputs(directory, flag, inputs)
    record = read_run_record(directory) if directory.is_dir() else None
    entries = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
    if entries and record is None:
        foreign = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        raise UserError(f"{flag} {path}: not empty and not written by this toolkit ({foreign}); "
                        "it may hold a model or data: choose a new directory")
    new_run = RunDirectory(_writable(directory, flag), uuid.uuid4().hex[:12], script, record is not None)
    if record is None:
        return new_run
    recover_interrupted_writes(directory)
    has_results = any(matches(name, RESULT_PATTERNS) for name in entries)
    has_checkpoints = any(name.startswith(CHECKPOINT_PREFIX) for name in entries)
    if resume is not None and (has_checkpoints or resume != "latest"):
        return RunDirectory(directory, record["run_id"], script)
    if has_results and not overwrite:
        options = "--resume to continue it, " if has_checkpoints else ""
        raise UserError(f"{flag} {path}: holds the results of an earlier run ({record.get('script')}, "
                        f"started {record.get('started')}); pass {options}--overwrite-output-dir to replace "
                        "them, or choose a new directory")
    return new_run  # replaces an earlier run's start-up files, or results the user lets go


INPUT_OPTIONS = ("data_path", "train_path", "val_path", "test_path", "config", "model_name", "model_path", "corpus",
                 "unlabeled_path", "retriever")


def input_options(args):
    """[(flag, path)] of every input a script's args name, for ``prepare_run_dir``."""
    return [(f"--{name.replace('_', '-')}", getattr(args, name)) for name in INPUT_OPTIONS
            if isinstance(getattr(args, name, None), str)]


def refuse_inputs_in_outputs(directory, flag, inputs):
    """An input file that sits where the run writes (e.g. --data-path OUT/metrics.json) would be destroyed."""
    try:
        resolved_dir = directory.resolve()
    except (OSError, RuntimeError):
        raise UserError(f"{flag} {directory}: a symbolic link loop") from None
    for name, value in inputs:
        if not value:
            continue
        try:
            resolved = Path(value).resolve()
        except (OSError, RuntimeError):  # a symlink loop: the data reader names it
            continue
        if resolved == resolved_dir:
            raise UserError(f"{flag} {directory} is the same directory as {name} {value}: "
                            "a run never writes into its inputs; choose another directory")
        try:
            first_part = resolved.relative_to(resolved_dir).parts[0]
        except ValueError:
            continue
        if matches(first_part, RUN_OUTPUT_PATTERNS):
            raise UserError(f"{name} {value}: lies where the run writes its outputs ({flag} {directory}); "
                            "move it or choose another directory")


def remove_run_outputs(directory):
    """Remove what an earlier run wrote (only names a run writes; other files stay)."""
    for entry in list(Path(directory).iterdir()):
        if matches(entry.name, RUN_OUTPUT_PATTERNS):
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()


def _writable(directory, flag):
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test-", delete=True).close()
    except OSError as error:
        raise UserError(f"{flag} {directory}: cannot write there ({error.strerror})") from None
    return directory


def prepare_results_dir(path, flag, overwrite=False):
    """An output directory for an evaluation-only run: new, empty, or a toolkit directory.

    Its result files (metrics.json...) may replace an earlier run's only with --overwrite-output-dir.
    """
    directory = Path(path)
    record = read_run_record(directory) if directory.is_dir() else None
    if directory.is_dir() and any(directory.iterdir()) and record is None:
        raise UserError(f"{flag} {path}: not empty and not written by this toolkit; choose a new directory")
    if record is not None and (directory / "metrics.json").exists() and not overwrite:
        raise UserError(f"{flag} {path}: already holds metrics.json of an earlier run; pass "
                        "--overwrite-output-dir to replace it or choose a new directory")
    return RunDirectory(_writable(directory, flag), uuid.uuid4().hex[:12], "evaluation").begin()
