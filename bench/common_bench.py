"""Measuring helpers shared by the bench scripts: peak RSS, the machine's matmul peak,
model FLOP counts, optimizer-step timestamps and per-batch token statistics.

Nothing here knows about a particular training loop: the step timer hooks every
torch optimizer, and the batch recorder wraps any collate function, so the toolkit's
loop and the Hugging Face Trainer are measured by the same code.
"""
import resource
import sys
import time

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook


def peak_rss_mib():
    """Peak resident set size of this process so far, in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def measure_matmul_peak(size=2048, repeats=5, dtype=torch.float32):
    """Best achieved FLOP/s of a square ``torch.matmul`` (the denominator of model FLOP utilisation)."""
    left = torch.randn(size, size, dtype=dtype)
    right = torch.randn(size, size, dtype=dtype)
    torch.matmul(left, right)  # warm-up: thread pool and oneDNN/MKL kernel selection
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        torch.matmul(left, right)
        best = min(best, time.perf_counter() - started)
    return 2 * size ** 3 / best


def encoder_dims(config):
    """(layers, hidden, intermediate) of a BERT-style config."""
    return config.num_hidden_layers, config.hidden_size, config.intermediate_size


def training_flops(token_count, squared_length_sum, layers, hidden, intermediate):
    """Model FLOPs of one training pass (forward + backward = 3x forward) over real tokens.

    Per token and layer the forward pass does the Q/K/V/output projections (8 h^2) and the
    feed-forward block (4 h i); attention scores and the weighted sum add 4 h n per token
    for a sequence of n tokens, i.e. 4 h n^2 per sequence. Padding is not counted: work
    spent on pad tokens is waste, and it shows as a lower utilisation.
    """
    dense = token_count * (8 * hidden * hidden + 4 * hidden * intermediate)
    attention = 4 * hidden * squared_length_sum
    return 3 * layers * (dense + attention)


class StepTimer:
    """Timestamps at the end of every optimizer step of any torch optimizer in this process."""

    def __init__(self):
        self.step_ends = []
        self._handle = register_optimizer_step_post_hook(self._record)

    def _record(self, optimizer, args, kwargs):
        self.step_ends.append(time.perf_counter())

    def close(self):
        self._handle.remove()


# where a training step's self CPU time goes, by operator name (first matching pattern wins)
PROFILE_CATEGORIES = (
    ("Python and data loading between ops", ("ProfilerStep",)),  # the step's own self time: no operator ran
    ("attention (sdpa)", ("scaled_dot_product", "flash_attention", "_efficient_attention")),
    ("optimizer (AdamW)", ("adam", "_foreach_", "lerp", "addcdiv", "addcmul")),
    ("matmul (linear layers)", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "mkldnn")),
    ("layer norm", ("layer_norm",)),
    ("GELU", ("gelu",)),
    ("dropout", ("dropout", "bernoulli")),
    ("embeddings", ("embedding", "index_select", "index_add")),
    ("softmax and loss", ("softmax", "nll_loss", "cross_entropy")),
    ("gradient clipping and norms", ("norm", "clamp", "_foreach_mul")),
    ("element-wise and copies", ("aten::add", "aten::mul", "aten::div", "aten::sub", "copy_", "aten::to",
                                 "aten::clone", "fill_", "zero_", "aten::where", "aten::sum", "aten::mean",
                                 "aten::tanh", "aten::cat", "aten::empty", "aten::contiguous", "aten::expand")),
)


class StepProfiler:
    """torch.profiler over ``steps`` optimizer steps after the first ``skip_steps`` of any loop in this process
    (an optimizer step hook drives its schedule, so the toolkit and the Trainer are cut at the same points)."""

    def __init__(self, skip_steps, steps):
        from torch.profiler import ProfilerActivity, profile, schedule
        self.steps = steps
        self.profiler = profile(activities=[ProfilerActivity.CPU],
                                schedule=schedule(wait=max(skip_steps - 1, 0), warmup=1, active=steps, repeat=1))
        self.profiler.start()
        self._handle = register_optimizer_step_post_hook(lambda *args: self.profiler.step())

    def close(self):
        self._handle.remove()
        self.profiler.stop()

    def summary(self, top=15):
        """{"categories": {name: share of self CPU time}, "per_step_ms": {...}, "top_ops": [...], "table": str}."""
        events = [event for event in self.profiler.key_averages() if event.self_cpu_time_total > 0]
        total = sum(event.self_cpu_time_total for event in events)
        categories = {}
        for event in events:
            name = next((category for category, patterns in PROFILE_CATEGORIES
                         if any(pattern in event.key for pattern in patterns)), "other operators")
            categories[name] = categories.get(name, 0.0) + event.self_cpu_time_total
        ranked = sorted(events, key=lambda event: event.self_cpu_time_total, reverse=True)[:top]
        return {"profiled_steps": self.steps, "self_cpu_ms_per_step": total / 1000 / self.steps,
                "categories": {name: value / total for name, value in
                               sorted(categories.items(), key=lambda item: item[1], reverse=True)},
                "top_ops": [{"op": event.key, "share": event.self_cpu_time_total / total, "calls": event.count}
                            for event in ranked],
                "table": self.profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)}


class BatchRecorder:
    """Wrap a collate function; record samples, real tokens and padded tokens of each batch.

    ``active`` is switched off after training so evaluation batches are not counted.
    """

    def __init__(self, collate_fn):
        self.collate_fn = collate_fn
        self.batches = []  # (samples, real tokens, padded tokens, sum of squared lengths)
        self.first_call = None
        self.active = True

    def __call__(self, features):
        batch = self.collate_fn(features)
        if self.active:
            if self.first_call is None:
                self.first_call = time.perf_counter()
            lengths = batch["attention_mask"].sum(dim=1)
            self.batches.append((int(lengths.numel()), int(lengths.sum()), int(batch["attention_mask"].numel()),
                                 int((lengths * lengths).sum())))
        return batch


def summarize_window(recorder, timer, warmup_steps, dims):
    """Throughput over optimizer steps warmup_steps+1 .. last, as a dict of plain numbers.

    Batch k (0-based) is consumed by optimizer step k+1 (no gradient accumulation), so the
    timed window covers batches warmup_steps .. steps-1.
    """
    steps = len(timer.step_ends)
    if steps <= warmup_steps:
        raise RuntimeError(f"only {steps} optimizer steps ran; need more than {warmup_steps} warm-up steps")
    window = recorder.batches[warmup_steps:steps]
    seconds = timer.step_ends[-1] - timer.step_ends[warmup_steps - 1] if warmup_steps else \
        timer.step_ends[-1] - recorder.first_call
    samples = sum(batch[0] for batch in window)
    tokens = sum(batch[1] for batch in window)
    padded = sum(batch[2] for batch in window)
    flops = training_flops(tokens, sum(batch[3] for batch in window), *dims)
    return {"steps": steps, "timed_steps": steps - warmup_steps, "seconds": seconds,
            "warmup_seconds": timer.step_ends[warmup_steps - 1] - recorder.first_call if warmup_steps else 0.0,
            "samples_per_second": samples / seconds, "tokens_per_second": tokens / seconds,
            "padding_fraction": 1 - tokens / padded, "model_flops_per_second": flops / seconds,
            # per step, so a reader can fit time = overhead + cost per padded token (see docs/bench_training.md)
            "step_seconds": [end - start for start, end in zip(timer.step_ends[warmup_steps - 1:-1],
                                                                timer.step_ends[warmup_steps:])] if warmup_steps else [],
            "step_padded_tokens": [batch[2] for batch in window] if warmup_steps else []}
