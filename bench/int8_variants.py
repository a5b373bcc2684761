"""int8 on a fine-tuned classifier: export_onnx.py's variant search (each recipe's batch-1 latency,
label agreement with fp32 torch and accuracy drop on the validation file) and --optimize auto's choice,
then eager torch, the fp32 export and the kept int8 export side by side: batch-1 latency (the same
inputs, the backends taking turns) and accuracy on the test file.

    python bench/int8_variants.py --data-dir data/reviews --work-dir bench/results/int8_variants

Without --model-path it first fine-tunes --backbone briefly with train_classifier.py (toolkit
defaults, --train-records records, one epoch) so the figures are for a trained head and encoder,
not a random or frozen one.
"""
import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import export_onnx  # noqa: E402
import train_classifier  # noqa: E402
from common import data, inference  # noqa: E402


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--model-path", default=None, help="a fine-tuned classifier directory (default: fine-tune one)")
    add("--backbone", default="../shared/models/all-MiniLM-L6-v2", help="encoder to fine-tune")
    add("--data-dir", default="data/reviews", help="train.jsonl, val.jsonl and test.jsonl with text/label")
    add("--work-dir", default="bench/results/int8_variants", help="the model, exports and results.json")
    add("--train-records", type=int, default=2000, help="training records for the brief fine-tune")
    add("--max-length", type=int, default=128, help="tokens per input")
    add("--test-records", type=int, default=1000, help="test records scored by each backend")
    add("--timed-texts", type=int, default=64, help="test texts timed at batch 1")
    add("--runs", type=int, default=7, help="rounds of batch-1 calls (median reported)")
    add("--threads", type=int, default=2, help="torch intra-op threads (match the machine's cores)")
    add("--seed", type=int, default=13)
    return parser


def fine_tune(args, work_dir):
    """One short train_classifier.py run with the toolkit's defaults; returns checkpoint-best."""
    output_dir = work_dir / "model"
    if (output_dir / "checkpoint-best").is_dir():  # a rerun measures the same model again
        return output_dir / "checkpoint-best"
    subset = work_dir / "train-subset.jsonl"
    lines = (Path(args.data_dir) / "train.jsonl").read_text(encoding="utf-8").splitlines()[:args.train_records]
    subset.write_text("\n".join(lines) + "\n", encoding="utf-8")
    status = train_classifier.main(["--data-path", str(subset), "--val-path", str(Path(args.data_dir) / "val.jsonl"),
                                    "--model-name", args.backbone, "--epochs", "1", "--batch-size", "32",
                                    "--max-length", str(args.max_length), "--seed", str(args.seed),
                                    "--device", "cpu", "--output-dir", str(output_dir), "--logging-steps", "20"])
    if status:
        raise SystemExit(f"train_classifier.py exited with {status}")
    return output_dir / "checkpoint-best"


def export(model_path, output, validation_file, *flags):
    argv = ["--model-path", str(model_path), "--output-path", str(output), *flags]
    if validation_file:
        argv += ["--validation-file", str(validation_file)]
    started = time.perf_counter()
    status = export_onnx.main(argv)
    if status == 2:
        raise SystemExit(f"export_onnx.py {' '.join(argv)}: usage error")
    report_path = export_onnx.default_report_path(output, rejected=status != 0)  # a refusal is a result too
    return json.loads(report_path.read_text(encoding="utf-8")), time.perf_counter() - started


def test_accuracy(loaded, texts, gold, batch_size=32):
    labels = np.array([row["label_id"] for row in inference.classify(loaded, texts, batch_size=batch_size)])
    return labels, float((labels == gold).mean())


def main(argv=None):
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    work_dir = Path(args.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    model_path = Path(args.model_path) if args.model_path else fine_tune(args, work_dir)
    validation = Path(args.data_dir) / "val.jsonl"
    fp32_report, fp32_seconds = export(model_path, work_dir / "onnx" / "fp32.onnx", None)
    int8_report, int8_seconds = export(model_path, work_dir / "onnx" / "int8.onnx", validation, "--quantize", "int8")

    torch_loaded = inference.load_torch_model(model_path)
    backends = {"torch eager": torch_loaded,
                f"onnx fp32 (optimized {fp32_report['optimized']})": inference.load_onnx_model(
                    work_dir / "onnx" / "fp32.onnx")}
    if int8_report["passed"]:  # a refused int8 export has no row here; its variants' table says why
        backends[f"onnx int8 ({int8_report['int8_variant']})"] = inference.load_onnx_model(
            work_dir / "onnx" / "int8.onnx")
    examples = data.load_text_examples(str(Path(args.data_dir) / "test.jsonl"))[:args.test_records]
    texts = [example.text for example in examples]
    label2id = {name: index for index, name in torch_loaded.id2label.items()}
    gold = np.array([label2id[example.raw_label] for example in examples])
    collator = data.PaddingCollator(torch_loaded.tokenizer.pad_token_id)
    rows = [collator([feature]) for feature in inference.encode_inputs(torch_loaded, texts[:args.timed_texts])]
    latencies = export_onnx.batch1_latencies_ms(list(backends.values()), rows, args.runs)
    torch_labels = None
    table = []
    for (name, loaded), latency in zip(backends.items(), latencies):
        labels, accuracy = test_accuracy(loaded, texts, gold)
        torch_labels = labels if torch_labels is None else torch_labels
        table.append({"backend": name, "batch1_ms": latency, "speedup_vs_torch": latencies[0] / latency,
                      "test_accuracy": accuracy, "agreement_with_torch": float((labels == torch_labels).mean())})
    results = {"command": "python bench/int8_variants.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "machine": platform.processor() or platform.machine(), "torch_threads": args.threads,
               "date": time.strftime("%Y-%m-%d"), "model": str(model_path.name), "test_records": len(texts),
               "timed_texts": len(rows), "side_by_side": table,
               "optimize_auto_fp32": fp32_report.get("optimize_timings"),
               "int8_passed": int8_report["passed"], "int8_variants": int8_report.get("int8_variants"),
               "int8_validation": int8_report.get("validation"),
               "export_seconds": {"fp32": fp32_seconds, "int8": int8_seconds}}
    (work_dir / "results.json").write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")
    print(f"\n{'backend':<34} {'batch-1 ms':>10} {'vs torch':>9} {'test acc':>9} {'agreement':>9}")
    for row in table:
        print(f"{row['backend']:<34} {row['batch1_ms']:>10.2f} {row['speedup_vs_torch']:>8.2f}x "
              f"{row['test_accuracy']:>9.4f} {row['agreement_with_torch']:>9.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
