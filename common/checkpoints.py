"""Checkpoints: directories written atomically with a checksum of every file, the resume state
inside them, and the checks ``--resume`` makes before it trusts one.

A checkpoint directory is a loadable model directory plus ``trainer_state.pt`` (optimizer,
scheduler, scaler, RNG, position, early stopping, args), ``trainer_state.json`` (a readable
summary with the run id) and ``checksums.json`` (sha256 of each file, written last).
"""
import ctypes
import errno
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from common import files, modeldir
from common.errors import UserError

TRAINER_STATE_FILE = "trainer_state.pt"
TRAINER_SUMMARY_FILE = "trainer_state.json"
CHECKSUM_FILE = "checksums.json"
CHECKPOINT_PREFIX = "checkpoint-step-"
HASH_CHUNK_BYTES = 1 << 20

# Options that shape the data stream or the model: resuming with another value breaks the
# exact-resume guarantee (position in the epoch is counted in batches of the old size) or the
# model itself (another label set), so --resume compares them and --resume-force accepts them.
RESUME_SENSITIVE_OPTIONS = (
    "model_name", "labels", "num_labels", "batch_size", "gradient_accumulation_steps", "max_length",
    "query_max_length", "doc_max_length", "seed", "epochs", "num_epochs", "max_steps", "learning_rate",
    "extend_vocab", "truncation_side", "normalize", "text_field", "label_field", "loss", "pooling",
    "projection_dim", "stride", "max_chunks", "chunk_selection", "aggregation", "data_split", "new_token_lr",
    "negatives_per_query", "matryoshka_dims", "matryoshka_weights", "matryoshka_rotation", "query_instruction",
    "passage_instruction",
    "problem_type", "rerank_loss", "rerank_group_size", "false_negative_margin",
    # which records train and in what order: the split without --val-path, the sampler, the batching,
    # the positives of graded pairs, the names a multi-label string splits into
    "val_ratio", "sampler", "group_by_length", "relevance_threshold", "label_separator",
    # the parameters the optimizer holds and the head's layers (another value fails to load the state)
    "freeze_backbone", "head_layernorm",
    # the scale of regression targets
    "standardize_targets",
    # what each step does: the saved optimizer state would overwrite another weight decay or epsilon
    # without a word, and the others change the loss or the update from the resumed step on
    "weight_decay", "adam_epsilon", "max_grad_norm", "dropout", "label_smoothing", "temperature",
    # early stopping's best value is in this metric's units: another metric cannot continue it
    "metric_for_best_model",
)
INPUT_OPTIONS = ("data_path", "train_path", "val_path", "unlabeled_path")  # files whose content must not change under a resume


# ---------------------------------------------------------------- writing

def write_directory_atomically(final_dir, write_contents):
    """Write a directory through a temporary sibling, then swap it in.

    A kill during ``write_contents(tmp_dir)`` leaves only a ``.tmp-*`` directory, which is never
    loaded. The swap is one atomic exchange where the OS offers it (Linux renameat2), so some
    whole version of ``final_dir`` exists at every instant; elsewhere the old version is parked
    as ``.old-*`` for a moment and ``recover_interrupted_writes`` restores it after a kill.
    A full disk or a read-only place is reported as one line naming the directory.
    """
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".tmp-{final_dir.name}-", dir=final_dir.parent))
    os.chmod(tmp_dir, 0o777 & ~current_umask())  # mkdtemp makes it 0700: others could not load the model
    try:
        write_contents(tmp_dir)
        write_checksums(tmp_dir)
        _swap_into_place(tmp_dir, final_dir)
    except BaseException as error:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        if _is_write_failure(error):
            raise UserError(f"{final_dir}: cannot write ({_first_line(error)}); earlier results are intact") from None
        raise
    return final_dir


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _swap_into_place(tmp_dir, final_dir):
    if not final_dir.exists():
        os.replace(tmp_dir, final_dir)
    elif _exchange(tmp_dir, final_dir):
        shutil.rmtree(tmp_dir, ignore_errors=True)  # now holds the previous version
    else:
        old_dir = final_dir.with_name(f".old-{final_dir.name}-{os.getpid()}")
        os.replace(final_dir, old_dir)
        os.replace(tmp_dir, final_dir)
        shutil.rmtree(old_dir, ignore_errors=True)


def _exchange(first, second):
    """Atomically swap two paths with Linux's renameat2(RENAME_EXCHANGE); False where unsupported."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # old kernel or a file system without it
        return False
    raise OSError(code, os.strerror(code), str(second))


def _is_write_failure(error):
    """An OSError (full disk, EFBIG, read-only) or safetensors' own error for the same causes."""
    return isinstance(error, OSError) or type(error).__name__ == "SafetensorError"


def _first_line(error):
    text = getattr(error, "strerror", None) or str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def recover_interrupted_writes(directory):
    """Undo what a kill left half-done in ``directory``: remove ``.tmp-*`` writes; put back an
    ``.old-*`` version whose replacement never arrived (or drop it when the new one did)."""
    directory = Path(directory)
    for leftover in directory.glob(".tmp-*"):
        print(f"warning: removing incomplete checkpoint {leftover} (interrupted save)", file=sys.stderr)
        shutil.rmtree(leftover, ignore_errors=True)
    for parked in directory.glob(".old-*"):
        name = parked.name[len(".old-"):].rsplit("-", 1)[0]
        if (directory / name).exists():
            shutil.rmtree(parked, ignore_errors=True)
        else:
            print(f"warning: restoring {directory / name} from an interrupted save", file=sys.stderr)
            os.replace(parked, directory / name)


# ---------------------------------------------------------------- checksums

def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(HASH_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_checksums(directory):
    """Record the sha256 of every file in ``directory`` (fsynced first, so the sums describe what is on disk)."""
    directory = Path(directory)
    sums = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != CHECKSUM_FILE):
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
        sums[path.relative_to(directory).as_posix()] = file_sha256(path)
    (directory / CHECKSUM_FILE).write_text(json.dumps(sums, indent=1), encoding="utf-8")


def verify_checksums(directory):
    """Refuse a checkpoint whose files differ from the sums written with it (bit rot, a bad copy, tampering)."""
    directory = Path(directory)
    manifest = directory / CHECKSUM_FILE
    if not manifest.is_file():
        raise UserError(f"--resume {directory}: no {CHECKSUM_FILE} (written by an older version?); "
                        "--resume-force loads it unverified")
    try:
        sums = json.loads(manifest.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"--resume {manifest}: unreadable checksum list") from None
    # write_checksums always lists the checkpoint's files: an empty list would verify nothing
    if not isinstance(sums, dict) or not sums or not all(isinstance(value, str) for value in sums.values()):
        raise UserError(f"--resume {manifest}: damaged checksum list (expected a JSON object of file name to "
                        "sha256, one entry per file); --resume-force loads the checkpoint unverified")
    for name, expected in sums.items():
        path = directory / name
        if not path.is_file():
            raise UserError(f"--resume {directory}: {name} is missing")
        if file_sha256(path) != expected:
            raise UserError(f"--resume {path}: checksum mismatch (the file changed after it was saved)")


# ---------------------------------------------------------------- resume state

def training_state(optimizer, scheduler, scaler, early_stopping, args, *, epoch, step_in_epoch, global_step,
                   evaluated_step, **extras):
    """The one checkpoint schema of every trainer: what exact resume needs, and what the run was."""
    return {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            "rng": capture_rng_state(), "epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": global_step,
            "evaluated_step": evaluated_step, "early_stopping": early_stopping.state_dict(), **describe_run(args),
            **extras}


def save_if_best(early_stopping, value, global_step, output_dir, write_model, is_main, untuned_competes=True):
    """Step ``early_stopping`` with an evaluation's ``value``; when it improved, write checkpoint-best with
    ``write_model`` (main process only). Returns whether it improved. With ``untuned_competes=False`` the
    untuned model (step 0) is a reference only and leaves early stopping as it was."""
    improved = (untuned_competes or global_step > 0) and early_stopping.step(value, global_step)
    if improved and is_main:
        write_directory_atomically(Path(output_dir) / "checkpoint-best", write_model)
    return improved


def save_checkpoint(output_dir, write_model, state, save_total_limit):
    """checkpoint-step-N: the model directory ``write_model(folder)`` writes plus the resume state, written
    atomically; then only the newest ``save_total_limit`` checkpoints of this run are kept."""
    def write(folder):
        write_model(folder)
        save_training_state(folder, state)
    write_directory_atomically(Path(output_dir) / f"{CHECKPOINT_PREFIX}{state['global_step']}", write)
    rotate_checkpoints(output_dir, save_total_limit, state.get("run_id"))


def save_training_state(directory, state):
    """Write the resume state (optimizer, scheduler, scaler, RNG, counters, args) into a checkpoint dir."""
    torch.save(state, Path(directory) / TRAINER_STATE_FILE)
    summary = {key: state[key] for key in ("global_step", "epoch", "step_in_epoch", "run_id", "options", "inputs")
               if key in state}
    summary["best_metric"] = state.get("early_stopping", {}).get("best_metric")
    summary.update(state.get("summary", {}))
    (Path(directory) / TRAINER_SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str))


def load_training_state(checkpoint_dir):
    """Load resume state with ``weights_only=True`` (no arbitrary pickles)."""
    path = Path(checkpoint_dir) / TRAINER_STATE_FILE
    if not path.is_file():
        raise UserError(f"--resume {checkpoint_dir}: no {TRAINER_STATE_FILE} there (not a training checkpoint)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file: say which, do not crash
        raise UserError(f"--resume {checkpoint_dir}: {TRAINER_STATE_FILE} is unreadable ({error})") from None


def describe_inputs(args):
    """{option: sha256} of the training and validation files, stored with each checkpoint."""
    return {name: file_sha256(getattr(args, name)) for name in INPUT_OPTIONS
            if getattr(args, name, None) and Path(getattr(args, name)).is_file()}


def resume_options(args):
    """The data-shaping options of a run, as JSON values (see RESUME_SENSITIVE_OPTIONS)."""
    values = json.loads(json.dumps(vars(args), default=str))
    return {name: values[name] for name in RESUME_SENSITIVE_OPTIONS if name in values}


def describe_run(args):
    """What a checkpoint records of its run: run id, data-shaping options, input digests, all options."""
    return {"run_id": getattr(args, "run_id", None), "options": resume_options(args),
            "inputs": getattr(args, "input_digests", {}), "args": json.loads(json.dumps(vars(args), default=str))}


def resume_differences(summary, args):
    """The data-shaping options and input files that differ between a checkpoint's run and this one."""
    saved, current = summary.get("options", {}), resume_options(args)
    differences = [f"--{name.replace('_', '-')} {saved[name]!r} -> {current[name]!r}"
                   for name in saved if name in current and saved[name] != current[name]]
    saved_inputs, current_inputs = summary.get("inputs", {}), describe_inputs(args)
    differences += [f"--{name.replace('_', '-')} content changed" for name in saved_inputs
                    if name in current_inputs and saved_inputs[name] != current_inputs[name]]
    return differences


def check_resume(checkpoint_dir, args):
    """Before anything is written: refuse a checkpoint that fails its checksums, or that was made
    with other data-shaping options or data (listing them), unless ``--resume-force``."""
    if checkpoint_dir is None or getattr(args, "resume_force", False):
        return
    verify_checksums(checkpoint_dir)
    differences = resume_differences(checkpoint_summary(checkpoint_dir) or {}, args)
    if differences:
        raise UserError(f"--resume {checkpoint_dir}: this run's options differ from the checkpoint's: "
                        f"{'; '.join(differences)} (--resume-force accepts them, without the exact-resume guarantee)")


class ResumePosition(NamedTuple):
    """Where the loop continues: its counters, and the whole loaded state (for a script's extras)."""
    global_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    evaluated_step: int = -1  # the step of the last evaluation (-1: none yet)
    state: dict | None = None


def resume_training(checkpoint_dir, model, optimizer, scheduler, scaler, early_stopping, logger, **extras):
    """Load a checkpoint's weights into ``model`` and its optimizer, scheduler, scaler, early-stopping and
    RNG states, and each of ``extras`` (name=object with ``load_state_dict``, or None) that it saved; return
    the loop's ResumePosition (the start of training when ``checkpoint_dir`` is None).
    ``check_resume`` has vetted the checkpoint before the run wrote anything."""
    if checkpoint_dir is None:
        return ResumePosition(state={})
    state = load_training_state(checkpoint_dir)
    modeldir.load_weights(model, checkpoint_dir)
    try:
        optimizer.load_state_dict(state["optimizer"])
    except ValueError as error:  # --resume-force past a changed --freeze-backbone: other trainable parameters
        raise UserError(f"--resume {checkpoint_dir}: its optimizer state does not fit this run's trainable "
                        f"parameters ({error}); resume with the checkpoint's --freeze-backbone") from None
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    early_stopping.load_state_dict(state["early_stopping"])
    restore_rng_state(state["rng"])
    for name, holder in extras.items():
        if holder is not None and state.get(name) is not None:
            holder.load_state_dict(state[name])
    position = ResumePosition(state["global_step"], state["epoch"], state["step_in_epoch"],
                              state.get("evaluated_step", -1), state)
    logger.info(f"resumed from {checkpoint_dir} at step {position.global_step} (epoch {position.epoch}, "
                f"batch {position.step_in_epoch})")
    return position


# ---------------------------------------------------------------- RNG state

def capture_rng_state():
    """Every RNG the loop touches, in a form ``torch.load(weights_only=True)`` accepts."""
    numpy_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)),
                  int(numpy_state[2]), int(numpy_state[3]), float(numpy_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state):
    random.setstate(_as_tuple(state["python"]))
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


# ---------------------------------------------------------------- finding and rotating checkpoints

def checkpoint_summary(directory):
    """trainer_state.json of a checkpoint, or None when it is absent or unreadable."""
    try:
        return json.loads((Path(directory) / TRAINER_SUMMARY_FILE).read_text())
    except (OSError, ValueError):
        return None


def list_checkpoints(output_dir, run_id=None):
    """Complete step checkpoints (of one run when ``run_id`` is given), oldest first, by recorded step."""
    found = []
    for directory in Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*"):
        summary = checkpoint_summary(directory)
        if not directory.is_dir() or not isinstance(summary, dict) or "global_step" not in summary \
                or not (directory / TRAINER_STATE_FILE).is_file():
            continue
        if run_id is None or summary.get("run_id") == run_id:
            found.append((summary["global_step"], directory))
    return [directory for _, directory in sorted(found)]


def check_resume_argument(resume):
    """Fail fast, before any model is loaded, when ``--resume PATH`` is not a training checkpoint."""
    if resume is None or resume == "latest":
        return
    if not (Path(resume) / TRAINER_STATE_FILE).is_file():
        raise UserError(f"--resume {resume}: no {TRAINER_STATE_FILE} there (not a training checkpoint)")


def find_resume_checkpoint(resume, output_dir, run_id=None):
    """``--resume`` -> the checkpoint to continue from (latest of this run, or the given path), or None
    when the run has none yet (rundir.prepare_run_dir has already refused that where results would be lost).
    """
    if resume is None:
        return None
    recover_interrupted_writes(output_dir)
    if resume != "latest":
        if not Path(resume).is_dir():
            raise UserError(f"--resume {resume}: not a directory")
        return Path(resume)
    checkpoints = list_checkpoints(output_dir, run_id)
    if not checkpoints:
        print(f"--resume: no checkpoint yet in {output_dir}: starting from the beginning", file=sys.stderr)
        return None
    return checkpoints[-1]


def rotate_checkpoints(output_dir, save_total_limit, run_id=None):
    """Keep only the newest ``save_total_limit`` step checkpoints (0 or less keeps all)."""
    if save_total_limit is None or save_total_limit <= 0:
        return
    for stale in list_checkpoints(output_dir, run_id)[:-save_total_limit]:
        shutil.rmtree(stale, ignore_errors=True)


def rewrite_toolkit(model_dir, toolkit):
    """Store a changed toolkit block (e.g. the fitted temperature) in config.json, atomically, and
    refresh the directory's checksums so they still describe what is on disk."""
    config_path = Path(model_dir) / modeldir.CONFIG_FILE
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["toolkit"] = toolkit
    files.write_output_file(config_path, json.dumps(config, indent=2, ensure_ascii=False), "--output-dir")
    if (Path(model_dir) / CHECKSUM_FILE).is_file():
        write_checksums(model_dir)
