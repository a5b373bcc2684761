"""The CUDA paths, proved on a GPU: bench/gpu_check.sh runs this and prints its table.

Per trainer and precision (fp16 with GradScaler, bf16): the loss falls, and a run interrupted
right after a checkpoint and resumed ends with the same weights, bit for bit, as the run that was
never interrupted (deterministic algorithms on). Then DDP with two GPUs when there are two,
onnxruntime's CUDA provider through export_onnx.py's parity gate, infer.py --device cuda against
--device cpu, and bench/serve_load.py against a server on the GPU. Small data written here
(English phrases, so any English encoder fits); every check is a row: PASS, FAIL or SKIP with why.

    python bench/gpu_check.py --model ../shared/models/all-MiniLM-L6-v2 --work-dir bench/results/gpu_check
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS, for the resume check
os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from common import checkpoints  # noqa: E402

TRAINERS = ("train_classifier", "train_longdoc", "train_vector")
POSITIVE = ["good movie", "great film", "very happy", "love it", "this is good", "a great movie", "what a fine day"]
NEGATIVE = ["bad movie", "terrible film", "very sad", "hate it", "this is bad", "a terrible movie", "what a dull day"]
STEPS, CRASH_STEP = 16, 8  # 64 records, batch 8, 2 epochs; interrupted after the step-8 checkpoint
TRAINER_FLAGS = {"train_classifier": ["--batch-size", "8", "--max-length", "32"],
                 "train_longdoc": ["--batch-size", "8", "--max-length", "16", "--stride", "4"],
                 "train_vector": ["--batch-size", "8", "--max-length", "32"]}


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="../shared/models/all-MiniLM-L6-v2", help="English encoder directory")
    parser.add_argument("--work-dir", default="bench/results/gpu_check", help="data, runs and results.json")
    parser.add_argument("--device", default="cuda", help="cuda (cpu only to try this script's own logic)")
    parser.add_argument("--precisions", default="fp16,bf16", help="training precisions to check")
    return parser


# ---------------------------------------------------------------- data

def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return str(path)


def write_data(directory):
    """{script: (train file, validation file)}: 64 training and 16 validation records each."""
    def texts(count):
        return [(phrase, label) for index in range(count // 2)
                for phrase, label in ((POSITIVE[index % 7], "positive"), (NEGATIVE[index % 7], "negative"))]

    def pairs(count):
        return [{"query": f"a review: {text}", "document": text, "rel": 1.0} for text, _ in texts(count)]
    data = {}
    for split, count in (("train", 64), ("val", 16)):
        data.setdefault("train_classifier", []).append(
            write_jsonl(directory / f"classifier-{split}.jsonl", [{"text": t, "label": y} for t, y in texts(count)]))
        data.setdefault("train_longdoc", []).append(write_jsonl(
            directory / f"longdoc-{split}.jsonl", [{"text": " ".join([t] * 6), "label": y} for t, y in texts(count)]))
        data.setdefault("train_vector", []).append(write_jsonl(directory / f"vector-{split}.jsonl", pairs(count)))
    return data


# ---------------------------------------------------------------- training checks

class Interrupted(Exception):
    """Raised right after the step-CRASH_STEP checkpoint: a crash at the worst moment for resume."""


def trainer_argv(script, args, data, precision, output_dir, *extra):
    train, val = data[script]
    return ["--model-name", args.model, "--data-path", train, "--val-path", val, "--output-dir", str(output_dir),
            "--precision", precision, "--device", args.device, "--epochs", "2", "--learning-rate", "1e-4",
            "--logging-steps", "1", "--save-steps", str(CRASH_STEP), "--save-total-limit", "0", "--eval-steps",
            str(CRASH_STEP), "--patience", "0", "--seed", "42", *TRAINER_FLAGS[script], *extra]


def run_script(script, argv):
    import importlib
    return importlib.import_module(script).main(argv)


def interrupted_run(script, argv):
    original = checkpoints.save_checkpoint

    def save_then_crash(output_dir, write_model, state, save_total_limit):
        original(output_dir, write_model, state, save_total_limit)
        if state["global_step"] == CRASH_STEP:
            raise Interrupted()
    checkpoints.save_checkpoint = save_then_crash
    try:
        run_script(script, argv)
    except Interrupted:
        return True
    finally:
        checkpoints.save_checkpoint = original
    return False


def losses(output_dir):
    rows = [json.loads(line) for line in (Path(output_dir) / "train_log.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows if "loss" in row]


def check_training(script, precision, args, data, work_dir):
    """(result, detail): loss falls over the run, and crash-at-step-8 + --resume ends bit-identical."""
    full, resumed = work_dir / f"{script}-{precision}-full", work_dir / f"{script}-{precision}-resumed"
    if run_script(script, trainer_argv(script, args, data, precision, full)) != 0:
        return "FAIL", "training exited non-zero"
    loss = losses(full)
    first, last = sum(loss[:3]) / 3, sum(loss[-3:]) / 3
    if not interrupted_run(script, trainer_argv(script, args, data, precision, resumed)):
        return "FAIL", f"loss {first:.3f} -> {last:.3f}; the interrupted run never reached step {CRASH_STEP}"
    if run_script(script, trainer_argv(script, args, data, precision, resumed, "--resume")) != 0:
        return "FAIL", "--resume exited non-zero"
    expected = load_file(str(full / f"checkpoint-step-{STEPS}" / "model.safetensors"))
    actual = load_file(str(resumed / f"checkpoint-step-{STEPS}" / "model.safetensors"))
    worst = max(float((expected[name].float() - actual[name].float()).abs().max()) for name in expected)
    falls, exact = last < first, worst == 0.0
    detail = f"loss {first:.3f} -> {last:.3f}; resume max |diff| {worst:.2e}"
    return ("PASS" if falls and exact else "FAIL"), detail


def check_ddp(args, data, work_dir):
    if args.device != "cuda" or torch.cuda.device_count() < 2:
        return "SKIP", f"{torch.cuda.device_count()} GPU(s): DDP needs two"
    output_dir = work_dir / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO_ROOT / "train_classifier.py"),
               *trainer_argv("train_classifier", args, data, "bf16", output_dir, "--save-steps", "0")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=work_dir)
    if result.returncode != 0:
        return "FAIL", (result.stderr.strip().splitlines() or ["exit %d" % result.returncode])[-1]
    loss = losses(output_dir)
    return ("PASS" if loss[-1] < loss[0] else "FAIL"), f"2 processes (nccl), loss {loss[0]:.3f} -> {loss[-1]:.3f}"


# ---------------------------------------------------------------- inference checks

def check_onnx_export(args, model_dir, validation, work_dir):
    import export_onnx
    import onnxruntime
    if args.device == "cuda" and "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        return "SKIP", "onnxruntime has no CUDA provider here (pip install onnxruntime-gpu to check it)"
    output = work_dir / "onnx" / "model.onnx"
    status = export_onnx.main(["--model-path", str(model_dir), "--output-path", str(output), "--device", args.device,
                               "--validation-file", validation])
    report = json.loads(export_onnx.default_report_path(output, rejected=status != 0).read_text())
    detail = f"max |torch - onnx| {report.get('max_abs_diff', float('nan')):.2e}, optimized {report.get('optimized')}"
    return ("PASS" if status == 0 else "FAIL"), detail + ("" if status == 0 else "; " + "; ".join(report["reasons"]))


def check_infer(args, model_dir, validation, work_dir):
    import infer
    labels = {}
    for device in ("cpu", args.device):
        output = work_dir / f"infer-{device}.jsonl"
        if infer.main(["--model-path", str(model_dir), "--file", validation, "--output", str(output),
                       "--device", device]) != 0:
            return "FAIL", f"infer.py --device {device} exited non-zero"
        labels[device] = [json.loads(line)["label"] for line in output.read_text().splitlines()]
    agreement = sum(a == b for a, b in zip(labels["cpu"], labels[args.device])) / len(labels["cpu"])
    return ("PASS" if agreement >= 0.99 else "FAIL"), f"labels agree with --device cpu on {agreement:.3f}"


def check_serving(args, vector_dir, work_dir):
    from bench import serve_load
    output = work_dir / "serve_load.json"
    serve_load.main(["--model-dir", str(vector_dir), "--device", args.device, "--concurrency", "1,8",
                     "--requests", "64", "--time-limit", "30", "--batch-sizes", "64", "--max-batch-tokens", "none",
                     "--output", str(output)])
    rows = json.loads(output.read_text())["results"]
    failed = sum(row["errors"] + row["rejected_429"] for row in rows)
    best = max(row["requests_per_second"] for row in rows)
    return ("PASS" if failed == 0 else "FAIL"), f"{failed} failed requests; {best} requests/s at best"


# ---------------------------------------------------------------- the table

def guarded(function, *arguments):
    """A check that raises is a FAIL row with the exception's first line, not the end of the run."""
    started = time.perf_counter()
    try:
        result, detail = function(*arguments)
    except Exception as error:  # noqa: BLE001 - every failure becomes a row of the table
        result, detail = "FAIL", f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    return result, detail, time.perf_counter() - started


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.device == "cuda":
        torch.use_deterministic_algorithms(True, warn_only=True)
    work_dir = Path(args.work_dir).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    data = write_data(work_dir)
    rows = []
    for script in TRAINERS:
        for precision in args.precisions.split(","):
            rows.append((f"{script} {precision}", *guarded(check_training, script, precision, args, data, work_dir)))
    rows.append(("DDP train_classifier bf16", *guarded(check_ddp, args, data, work_dir)))
    classifier = work_dir / f"train_classifier-{args.precisions.split(',')[-1]}-full" / "checkpoint-best"
    vector = work_dir / f"train_vector-{args.precisions.split(',')[-1]}-full" / "checkpoint-best"
    validation = data["train_classifier"][1]
    rows.append(("export_onnx.py parity", *guarded(check_onnx_export, args, classifier, validation, work_dir)))
    rows.append((f"infer.py --device {args.device}", *guarded(check_infer, args, classifier, validation, work_dir)))
    rows.append(("serve_load.py", *guarded(check_serving, args, vector, work_dir)))
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    print(f"\nGPU check on {name} (torch {torch.__version__}, CUDA {torch.version.cuda}):")
    print(f"| {'check':<34} | result | {'seconds':>7} | detail |")
    print(f"|{'-' * 36}|--------|{'-' * 9}|--------|")
    for check, result, detail, seconds in rows:
        print(f"| {check:<34} | {result:<6} | {seconds:>7.1f} | {detail} |")
    (work_dir / "results.json").write_text(json.dumps(
        {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda,
         "rows": [dict(zip(("check", "result", "detail", "seconds"), row)) for row in rows]}, indent=2))
    return 1 if any(row[1] == "FAIL" for row in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
