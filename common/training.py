"""What a training run needs around its loop: device and precision, the seed, early stopping, the
run context (process group, device, precision) and the run log. Optimization, checkpoints and DDP
have modules of their own.

The loops themselves stay in the scripts; these functions only build and save objects.
"""
import json
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from common import distributed
from common.errors import UserError


# ---------------------------------------------------------------- device and precision

def resolve_device(name, local_rank=0):
    """'auto' -> cuda:local_rank when available, else cpu; a device this machine lacks is a UserError."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    from common.inference import resolve_device as check_device_exists  # one check for every script
    return torch.device(check_device_exists(name))


def cpu_has_native_bf16():
    """True on CPUs with AVX512-BF16 or AMX, where bf16 matmuls beat fp32.

    Without them PyTorch emulates bf16 and a matmul runs far slower than fp32
    (measured ~100x on an AMD EPYC without avx512_bf16), so auto never picks it there.
    """
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


@dataclass
class Precision:
    """Autocast dtype (None = fp32) and whether a GradScaler is needed (fp16 only)."""
    name: str
    autocast_dtype: torch.dtype | None
    use_grad_scaler: bool

    def autocast(self, device):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)


def resolve_precision(name, device):
    """Turn ``--precision`` into a Precision for this device; explain impossible choices."""
    if name == "auto":
        if device.type == "cuda":
            name = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            name = "bf16" if cpu_has_native_bf16() else "fp32"
    if name == "fp16" and device.type != "cuda":
        raise UserError("--precision fp16 needs a CUDA device (use bf16 or fp32 on CPU)")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("--precision bf16: this GPU does not support bf16 (use fp16)")
    dtypes = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
    return Precision(name, dtypes[name], use_grad_scaler=(name == "fp16"))


# ---------------------------------------------------------------- early stopping

class EarlyStopping:
    """Track the best metric and the step that reached it; ``step(value, global_step)`` returns True
    when it improved.

    ``should_stop`` becomes True after ``patience`` evaluations without an improvement larger than
    ``min_delta``. Its state goes into every checkpoint.
    """

    def __init__(self, patience, min_delta=0.0, mode="max"):
        self.patience = patience
        self.min_delta = min_delta
        self.mode = mode
        self.best_metric = None
        self.best_step = None
        self.bad_evaluations = 0

    def step(self, value, global_step=None):
        improved = self.best_metric is None or self.is_better(value, self.best_metric, self.min_delta)
        if improved:
            self.best_metric, self.best_step = value, global_step
            self.bad_evaluations = 0
        else:
            self.bad_evaluations += 1
        return improved

    @property
    def should_stop(self):
        return self.patience > 0 and self.bad_evaluations >= self.patience

    def is_better(self, value, reference, margin=0.0):
        return value > reference + margin if self.mode == "max" else value < reference - margin

    def state_dict(self):
        return {"best_metric": self.best_metric, "best_step": self.best_step,
                "bad_evaluations": self.bad_evaluations}

    def load_state_dict(self, state):
        self.best_metric, self.best_step = state["best_metric"], state.get("best_step")
        self.bad_evaluations = state["bad_evaluations"]


def compare_with_untuned(early_stopping, untuned_row, metric_name, logger):
    """Whether the best trained model beats the untuned one (step 0) on validation; says so loudly
    when it does not. None when the run has no untuned evaluation (resumed from an older version)."""
    if not untuned_row or untuned_row.get(f"eval_{metric_name}") is None or early_stopping.best_metric is None:
        return None
    untuned_value = untuned_row[f"eval_{metric_name}"]
    beaten = early_stopping.best_step != 0 and early_stopping.is_better(early_stopping.best_metric, untuned_value)
    if not beaten:
        kept = "checkpoint-best is the untuned model" if early_stopping.best_step == 0 else \
            f"checkpoint-best ({early_stopping.best_metric:.4f}) is no better"
        logger.info(f"warning: fine-tuning did not beat the untuned model on validation {metric_name} "
                    f"({untuned_value:.4f} before training): {kept}. Check the data, the learning rate and the "
                    "number of steps, or compare with a simple baseline")
    return beaten


# ---------------------------------------------------------------- around the loop

def log_training_start(logger, args, context, output_dir, total_steps, sizes, details=(), batch_unit="",
                       settings=None):
    """The start-of-run banner: where outputs go, ``sizes`` ({name: count}), any ``details`` lines,
    epochs, effective batch size (counted in ``batch_unit``), total steps, then ``settings``
    ({name: value}), precision, device and processes."""
    effective_batch = args.batch_size * args.gradient_accumulation_steps * context.world_size
    settings = {**(settings or {}), "precision": args.precision_obj.name, "device": args.device_obj,
                "processes": context.world_size}
    lines = [f"***** training *****  outputs: {output_dir}", _name_values(sizes), *details,
             f"epochs: {args.epochs}  effective batch size: {effective_batch}{batch_unit}  total steps: {total_steps}",
             _name_values(settings)]
    logger.info("\n  ".join(lines))


def _name_values(values):
    return "  ".join(f"{name}: {value}" for name, value in values.items())


def is_due(global_step, every):
    """Whether ``global_step`` is a multiple of ``every`` (never when ``every`` is 0: that option is off)."""
    return every > 0 and global_step % every == 0


def evaluation_due(global_step, eval_steps, epoch_ends, total_steps):
    """Whether the step just taken is evaluated: every ``eval_steps``, and at the end of each epoch and of
    the run. Evaluating the epoch's last step here, before the step's checkpoint is written, keeps the
    checkpoint's early-stopping state current and scores those weights once, not once for the checkpoint
    and again at the epoch end."""
    return is_due(global_step, eval_steps) or epoch_ends or global_step >= total_steps


def evaluation_due_at_start(resume_from, global_step, evaluated_step, total_steps, early_stopping):
    """Whether to evaluate before the first step: on a fresh run the untuned model (the reference
    fine-tuning has to beat); on a resume, final weights whose checkpoint was saved before their
    evaluation ran (a kill in between; checkpoints of versions before ``evaluation_due`` came first)."""
    if resume_from is None:
        return True
    return global_step >= total_steps and evaluated_step != global_step and not early_stopping.should_stop


# ---------------------------------------------------------------- RNG state

def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


# ---------------------------------------------------------------- running a script

def run_in_context(args, run, use_distributed=True):
    """Set up the process group (under torchrun), device, precision and seed; call ``run(args, context)``.

    The process group is torn down however ``run`` ends, so a UserError on one rank never leaves the
    others waiting.
    """
    context = distributed.init_distributed(args.device) if use_distributed else distributed.DistributedContext()
    try:
        args.device_obj = resolve_device(args.device, context.local_rank)
        args.precision_obj = resolve_precision(args.precision, args.device_obj)
        set_seed(args.seed)
        return run(args, context)
    finally:
        distributed.cleanup_distributed(context)


def claim_run_dir(args, context, script):
    """Claim ``--output-dir`` for this run on the main process (common/rundir.py's rules: nothing the
    run did not create is touched), record the run id and the inputs' digests in ``args``, and return
    ``(run_dir, resume_from)``: the checkpoint ``--resume`` continues from, or None."""
    from common import checkpoints, rundir

    def claim():
        run_dir = rundir.prepare_run_dir(args.output_dir, "--output-dir", script, rundir.input_options(args),
                                         args.overwrite_output_dir, args.resume)
        if args.resume is not None:  # a damaged log is refused now, not after training; a torn last row
            read_run_log(run_dir.path / RUN_LOG_FILE, drop_torn_tail=True)  # is cut before rows are appended
        return run_dir

    run_dir = distributed.run_on_main(context, claim)
    args.run_id = run_dir.run_id
    args.input_digests = checkpoints.describe_inputs(args)
    return run_dir, checkpoints.find_resume_checkpoint(args.resume, run_dir.path, args.run_id)


# ---------------------------------------------------------------- run log

RUN_LOG_FILE = "train_log.jsonl"


def read_run_log(path, drop_torn_tail=False):
    """The rows of a run log (train_log.jsonl); [] when there is none.

    A last line that is not a JSON object is what a kill or a full disk mid-append leaves: it is
    ignored, and with ``drop_torn_tail`` cut from the file, so the next row starts a line of its
    own. A bad line before the last means the file is damaged: one error line naming it.
    """
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_bytes().split(b"\n")
    rows, offset = [], 0
    for number, line in enumerate(lines, 1):
        if line.strip():
            row = _log_row(line)
            if row is None:
                if any(later.strip() for later in lines[number:]):
                    raise UserError(f"{path} line {number}: damaged run log (not a JSON object); "
                                    "repair or delete that line")
                if drop_torn_tail:
                    os.truncate(path, offset)
                break
            rows.append(row)
        offset += len(line) + 1
    return rows


def _log_row(line):
    """One line of the run log as a dict, or None when it is not a JSON object."""
    try:
        row = json.loads(line)
    except ValueError:  # also a UnicodeDecodeError: a kill can cut a character in half
        return None
    return row if isinstance(row, dict) else None


class TrainingMeter:
    """Loss and throughput since the last log row. The one place a training row is built, so every
    trainer logs the same keys: step, epoch, loss, learning_rate, grad_norm, samples_per_second."""

    def __init__(self, device):
        self.loss_sum = torch.zeros((), device=device)  # summed on the device: no host sync per step
        self.passes, self.samples, self.started = 0, 0, time.perf_counter()

    def add(self, loss, samples):
        """One forward pass: its loss and how many samples (all processes) it saw."""
        self.loss_sum += loss.detach()
        self.passes += 1
        self.samples += samples

    def forget_loss(self):
        """Drop the losses of a skipped (non-finite) step from the next row's mean."""
        self.loss_sum.zero_()
        self.passes = 0

    def row(self, global_step, epoch, learning_rate, grad_norm):
        """The log row for the window that ends now; starts the next window."""
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        row = {"step": global_step, "epoch": epoch, "loss": (self.loss_sum / max(self.passes, 1)).item(),
               "learning_rate": learning_rate, "grad_norm": float(grad_norm),
               "samples_per_second": self.samples / elapsed}
        self.loss_sum.zero_()
        self.passes, self.samples, self.started = 0, 0, time.perf_counter()
        return row


def evaluation_row(global_step, epoch, metrics, early_stopping, improved, names=None):
    """The log row of an evaluation: ``eval_<name>`` for each of ``names`` (keys of ``metrics``; all when
    None), the best value so far, whether this one improved on it, and whether it scored the untuned
    model (step 0)."""
    return {"step": global_step, "epoch": epoch, **{f"eval_{name}": metrics[name] for name in names or metrics},
            "best": early_stopping.best_metric, "improved": improved, "untuned": global_step == 0}


class RunLogger:
    """Prints on the main process, appends rows to train_log.jsonl, mirrors them to W&B when given a run.

    ``describe_evaluation(row)`` gives the line printed for an evaluation row (one with ``eval_loss``).
    """

    def __init__(self, output_dir, is_main, describe_evaluation, wandb_run=None):
        self.path = Path(output_dir) / RUN_LOG_FILE
        self.is_main = is_main
        self.describe_evaluation = describe_evaluation
        self.wandb_run = wandb_run

    def info(self, message):
        if self.is_main:
            tqdm.write(message)

    def untuned_row(self):
        """The evaluation of the starting model (step 0) from train_log.jsonl (also after a resume), or None."""
        return next((row for row in read_run_log(self.path) if row.get("untuned")), None)

    def log(self, row, progress=None):
        """Write ``row``; a training row also shows its loss and learning rate on ``progress`` (a tqdm bar)."""
        if progress is not None:
            progress.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['learning_rate']:.2e}")
        if not self.is_main:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(row, step=row.get("step"))
        if "eval_loss" in row:
            tqdm.write(self.describe_evaluation(row) + (" (best)" if row.get("improved") else ""))


