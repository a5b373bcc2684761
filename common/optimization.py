"""Optimization: AdamW, the warmup schedule, the grad scaler, the one optimizer step every loop
takes, and the guard against non-finite losses."""
import math
import warnings

import torch

from common.errors import UserError


def build_optimization(model, args, batches_per_epoch, device, precision):
    """(optimizer, scheduler, scaler, total_steps): AdamW, warmup + decay and a grad scaler (a no-op
    unless fp16) for ``args.epochs`` passes of ``batches_per_epoch`` forward passes, capped by --max-steps."""
    total_steps = math.ceil(batches_per_epoch / args.gradient_accumulation_steps) * args.epochs
    if args.max_steps > 0:
        total_steps = min(total_steps, args.max_steps)
    optimizer = build_optimizer(model, args.learning_rate, args.weight_decay, args.adam_epsilon, device)
    scale_new_token_updates(optimizer, model, args)
    warmup_steps = resolve_warmup_steps(total_steps, args.warmup_ratio, args.warmup_steps)
    scheduler = build_scheduler(optimizer, args.scheduler, warmup_steps, total_steps)
    return optimizer, scheduler, build_grad_scaler(precision, device), total_steps


def build_grad_scaler(precision, device):
    """A GradScaler that is a no-op unless fp16: one code path for every precision."""
    return torch.amp.GradScaler(device.type, enabled=precision.use_grad_scaler)


def build_optimizer(model, learning_rate, weight_decay, adam_epsilon=1e-8, device=None):
    """AdamW without weight decay on biases and LayerNorm weights (all 1-D parameters).

    Uses the fused kernel on CUDA and on CPU: on CPU it is never slower than the multi-tensor
    (foreach) path, and much faster when the cores are contended (figures: bench/README.md,
    "Fused AdamW on CPU").
    """
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (no_decay if parameter.ndim < 2 else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    fused = device is None or device.type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=learning_rate, eps=adam_epsilon, fused=fused or None)


def scale_new_token_updates(optimizer, model, args):
    """--new-token-lr: the embedding rows --extend-vocab added move ``new_token_lr / learning_rate`` times
    as far per step as every other weight.

    The added rows share one tensor with the pretrained rows, so no parameter group can hold them, and
    scaling their gradients would change nothing under AdamW (it divides each gradient by its own
    running size). Instead each step's update of those rows is scaled after the step: exactly AdamW
    with the larger learning rate there, weight decay included.
    """
    new_token_lr = getattr(args, "new_token_lr", None)
    embeddings = next((module for module in model.modules() if hasattr(module, "first_added_row")), None)
    if new_token_lr is None or embeddings is None:
        return
    ratio, rows = new_token_lr / args.learning_rate, slice(embeddings.first_added_row, None)
    before_step = {}

    def remember_rows(optimizer, args, kwargs):
        before_step["rows"] = embeddings.weight.detach()[rows].clone()

    def scale_their_update(optimizer, args, kwargs):
        with torch.no_grad():
            old = before_step.pop("rows")
            embeddings.weight[rows] = old + ratio * (embeddings.weight[rows] - old)

    optimizer.register_step_pre_hook(remember_rows)
    optimizer.register_step_post_hook(scale_their_update)


def resolve_warmup_steps(total_steps, warmup_ratio=None, warmup_steps=None):
    """``--warmup-steps`` wins when given; else ``warmup_ratio * total_steps``."""
    if warmup_steps is not None and warmup_steps >= 0:
        return min(int(warmup_steps), total_steps)
    return int(round((warmup_ratio or 0.0) * total_steps))


def build_scheduler(optimizer, scheduler_type, warmup_steps, total_steps):
    """Linear (default) or cosine decay after a linear warmup."""
    import transformers  # imported where used: --help should not wait for it
    if scheduler_type == "cosine":
        return transformers.get_cosine_schedule_with_warmup(optimizer, warmup_steps, total_steps)
    return transformers.get_linear_schedule_with_warmup(optimizer, warmup_steps, total_steps)


def optimizer_step(model, optimizer, scheduler, scaler, max_grad_norm):
    """Unscale, clip, step, update the scale; return (grad_norm tensor, stepped).

    Unscale before clipping so the threshold applies to the true gradients. The
    scheduler advances only when the scaler did not skip the step (scale went down),
    not whenever the scale changed.
    """
    scaler.unscale_(optimizer)
    parameters = [p for p in model.parameters() if p.grad is not None]
    grad_norm = torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm if max_grad_norm > 0 else float("inf"))
    scale_before = scaler.get_scale() if scaler.is_enabled() else None
    scaler.step(optimizer)
    scaler.update()
    stepped = scale_before is None or scaler.get_scale() >= scale_before
    if stepped:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, stepped


class NonFiniteLossGuard:
    """Skip optimizer steps whose loss is NaN/inf; abort after ``limit`` in a row.

    The loop calls ``add(loss)`` after each forward pass and ``skip_step`` at the end of each
    accumulation window. fp16 overflow is the GradScaler's job, so with a scaler the guard is off
    (``enabled=False``).
    """

    def __init__(self, limit, device=None, enabled=True):
        self.limit = limit
        self.enabled = enabled
        self.consecutive = 0
        self.skipped_total = 0
        self.window_loss = torch.zeros((), device=device)  # summed on the device: one host sync a window

    def add(self, loss):
        """One forward pass's loss, summed over the accumulation window."""
        self.window_loss += loss.detach()

    def skip_step(self, optimizer, global_step):
        """At the end of a window: True, with the window's gradients dropped, when its loss is not finite."""
        skip = self.enabled and self.should_skip(self.window_loss, global_step)
        self.window_loss.zero_()
        if skip:
            optimizer.zero_grad(set_to_none=True)
        return skip

    def report(self, logger):
        """Say at the end of training how many steps were skipped (nothing when none were)."""
        if self.skipped_total:
            logger.info(f"skipped {self.skipped_total} optimizer steps with a non-finite loss")

    def should_skip(self, loss_sum, global_step):
        if torch.isfinite(loss_sum).item():
            self.consecutive = 0
            return False
        self.consecutive += 1
        self.skipped_total += 1
        warnings.warn(f"step {global_step}: non-finite loss, skipping this optimizer step")
        if self.consecutive >= self.limit:
            raise TrainingAborted(
                f"{self.consecutive} optimizer steps in a row had a NaN/inf loss at step {global_step}: "
                "lower --learning-rate, check the data, or use --precision fp32")
        return True


class TrainingAborted(UserError):
    """Training cannot continue for a reason the user can act on."""
