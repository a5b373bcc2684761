"""Classification quality: train_classifier.py against the HF Trainer on the same data and settings.

    python bench/quality.py                                   # the headline table (3 seeds each + baselines)
    python bench/quality.py --configs toolkit-pooler,toolkit-no-grouping --seeds 13,14,15
    python bench/quality.py --train 2000 --test 1000          # a cheaper data size

Data: the real Chinese reviews of bench/prepare_reviews.py (built under --data-dir when missing; the
sample is fixed by --data-seed). Every configuration trains in its own process, once per seed, with the
same settings: --epochs 2, --batch-size 32, --learning-rate 5e-5, --max-length 128, warmup ratio 0.1,
weight decay 0.01, fp32 and the toolkit's vocabulary extension (common/vocab.py extend_vocabulary,
min count --extend-vocab 3; the Trainer's tokenizer gets the same tokens and resize_token_embeddings).
Each run records validation and test metrics after every epoch, so "best on validation" and "last"
are compared without extra training. Runs are cached under --work-dir (run.json per run); --rerun
forces them. The table goes to stdout and to --output (JSON).

Configurations (--configs, comma-separated):
  toolkit, trainer                 the headline pair (toolkit defaults: CLS pooling without the pooler,
                                   length-grouped batches, checkpoint-best by validation macro-F1)
  *-no-extend                      without --extend-vocab
  toolkit-pooler                   --pooling pooler: the checkpoint's pooler (dense + tanh), like the Trainer
  toolkit-no-grouping              --group-by-length false
  toolkit-val-from-train           no --val-path: the toolkit holds out 10% of train for validation
  toolkit-random-rows, trainer-random-rows   added rows drawn N(0, initializer_range) (mean_resizing=False)
  toolkit-pooler-random-rows       both of the above
  toolkit-matched-rows             added rows drawn from the old rows' per-dimension mean and std
  toolkit-pooler-matched-rows      --pooling pooler and matched rows
  toolkit-unk-rows, toolkit-mean-rows   --new-token-init unk / mean (the default is random rows)
  toolkit-new-token-lr             --new-token-lr 5e-4 (10x the learning rate for the added rows)
  toolkit-new-token-lr-30x         --new-token-lr 1.5e-3 (30x the learning rate for the added rows)
  toolkit-bf16                     --precision bf16 (what --precision auto picks on a CPU with native bf16)
  toolkit-mlm                      --mlm-adapt-steps 250 (two passes of masked-LM over the training texts)
  toolkit-mlm-new-token-lr         both of the above
  toolkit-5-epochs                 --epochs 5 --patience 2, --precision auto (bf16 on a CPU with native bf16)
  toolkit-mlm-unlabeled            --epochs 3 --patience 2, --precision auto, after --mlm-adapt-steps 500 (one
                                   pass) on the training texts and --unlabeled-path (the reviews in no split:
                                   prepare_reviews.py --unlabeled), whose [UNK] characters --extend-vocab also adds
  toolkit-mean-pooling             --pooling mean (all-MiniLM-L6-v2 was trained with mean pooling), --precision auto
  toolkit-max-length-256           --max-length 256 (19% of the training reviews pass 128 tokens), --precision auto
  toolkit-max-length-256-mean-pooling   both of the above
  toolkit-cooccurrence             --new-token-init cooccurrence (the default since 2026-12-03), --precision auto
  toolkit-max-length-256-cooccurrence   both of the 256-token recipe and the above
  toolkit-max-length-256-cooccurrence-unlabeled   the same, the co-occurrence counted over --unlabeled-path too
  toolkit-max-length-256-unlabeled      its control: --extend-vocab over --unlabeled-path too, --new-token-init random
  (rows measured before 2026-12-03 ran with random added rows, the default then; --toolkit-dir with the
  commit bench/README.md names reruns them as measured)
  toolkit-max-length-256-cooccurrence-mlm-unlabeled   the co-occurrence recipe after --mlm-adapt-steps 500 on the
                                   training texts and --unlabeled-path (masked-LM from placed rows, not random ones)
  toolkit-max-length-256-cooccurrence-unlabeled-3-epochs   the co-occurrence recipe with --epochs 3
  toolkit-max-length-256-cooccurrence-unlabeled-3-epochs-fused   the same with --fuse-baseline: the model's
                                   probabilities fused with the TF-IDF baseline's, its share tuned on validation
                                   (the reported figures are the fused model's; "model_alone" keeps the model's)
  toolkit-max-length-256-cooccurrence-unlabeled-4-epochs   the co-occurrence recipe with --epochs 4
  toolkit-max-length-256-cooccurrence-unlabeled-lr-1e-4    the co-occurrence recipe with --learning-rate 1e-4
  toolkit-max-length-256-cooccurrence-unlabeled-10-epochs  the co-occurrence recipe with the trainer's --epochs 10 and
                                   its early stopping (--patience 3)
  toolkit-max-length-256-cooccurrence-pseudo-labels   self-training: the co-occurrence recipe's model (same seed,
                                   run first) labels unlabeled.txt with infer.py; the reviews it gives a calibrated
                                   probability >= 0.9 join train.jsonl, and the same recipe trains on both
  (the *-random-rows and *-matched-rows patches measured snapshots from before --new-token-init existed)
  trainer-cls                      the Trainer's model with its pooler bypassed (CLS state -> dropout -> linear)
  trainer-group-by-length          train_sampling_strategy="group_by_length"
  untuned                          the toolkit's starting model (pretrained encoder, new head), no training
  tfidf                            char 1-3-gram TF-IDF + logistic regression (seedless)
  majority                         the most frequent training label (seedless)
"""
import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIGS = "majority,tfidf,untuned,toolkit,trainer"
TOOLKIT, TRAINER = "toolkit", "trainer"

# name -> system, --extend-vocab on/off, extra toolkit flags, monkeypatches, Trainer arguments, validation file,
# epochs and precision when not the bench's (--epochs, fp32), unlabeled text (data_dir/unlabeled.txt)
# the closest recipe to TF-IDF (issue 14): whole reviews, added rows placed from their neighbours
PLACED_256 = ["--max-length", "256", "--new-token-init", "cooccurrence"]
CONFIGS = {
    "toolkit": {"system": TOOLKIT},
    "trainer": {"system": TRAINER},
    "toolkit-no-extend": {"system": TOOLKIT, "extend": False},
    "trainer-no-extend": {"system": TRAINER, "extend": False},
    "toolkit-pooler": {"system": TOOLKIT, "flags": ["--pooling", "pooler"]},
    "toolkit-no-grouping": {"system": TOOLKIT, "flags": ["--group-by-length", "false"]},
    "toolkit-val-from-train": {"system": TOOLKIT, "val_file": False},
    "toolkit-random-rows": {"system": TOOLKIT, "patches": ["random_rows"]},
    "toolkit-pooler-random-rows": {"system": TOOLKIT, "flags": ["--pooling", "pooler"], "patches": ["random_rows"]},
    "trainer-random-rows": {"system": TRAINER, "patches": ["random_rows"]},
    "toolkit-matched-rows": {"system": TOOLKIT, "patches": ["matched_rows"]},
    "toolkit-pooler-matched-rows": {"system": TOOLKIT, "flags": ["--pooling", "pooler"], "patches": ["matched_rows"]},
    "toolkit-unk-rows": {"system": TOOLKIT, "flags": ["--new-token-init", "unk"]},
    "toolkit-mean-rows": {"system": TOOLKIT, "flags": ["--new-token-init", "mean"]},
    "toolkit-new-token-lr": {"system": TOOLKIT, "flags": ["--new-token-lr", "5e-4"]},
    "toolkit-new-token-lr-30x": {"system": TOOLKIT, "flags": ["--new-token-lr", "1.5e-3"]},
    "toolkit-bf16": {"system": TOOLKIT, "precision": "bf16"},  # what --precision auto picks on AVX512-BF16
    "toolkit-mlm": {"system": TOOLKIT, "flags": ["--mlm-adapt-steps", "250"]},
    "toolkit-mlm-new-token-lr": {"system": TOOLKIT, "flags": ["--mlm-adapt-steps", "250", "--new-token-lr", "5e-4"]},
    "toolkit-5-epochs": {"system": TOOLKIT, "epochs": 5, "precision": "auto", "flags": ["--patience", "2"]},
    "toolkit-mlm-unlabeled": {"system": TOOLKIT, "epochs": 3, "precision": "auto", "unlabeled": True,
                              "flags": ["--patience", "2", "--mlm-adapt-steps", "500"]},
    "toolkit-mean-pooling": {"system": TOOLKIT, "precision": "auto", "flags": ["--pooling", "mean"]},
    "toolkit-max-length-256": {"system": TOOLKIT, "precision": "auto", "flags": ["--max-length", "256"]},
    "toolkit-max-length-256-mean-pooling": {"system": TOOLKIT, "precision": "auto",
                                            "flags": ["--max-length", "256", "--pooling", "mean"]},
    # the 256-token recipe with one regularizer each (issue 14: still below TF-IDF without them)
    "toolkit-max-length-256-fgm": {"system": TOOLKIT, "precision": "auto",
                                   "flags": ["--max-length", "256", "--adversarial", "fgm"]},
    "toolkit-max-length-256-fgm-0.1": {"system": TOOLKIT, "precision": "auto",
                                       "flags": ["--max-length", "256", "--adversarial", "fgm", "--adv-epsilon", "0.1"]},
    "toolkit-max-length-256-rdrop": {"system": TOOLKIT, "precision": "auto",
                                     "flags": ["--max-length", "256", "--rdrop-alpha", "1.0"]},
    "toolkit-max-length-256-ema": {"system": TOOLKIT, "precision": "auto",
                                   "flags": ["--max-length", "256", "--ema-decay", "0.99"]},
    # added rows placed from the tokens they appear beside (issue 14: a start with meaning, no MLM steps)
    "toolkit-cooccurrence": {"system": TOOLKIT, "precision": "auto", "flags": ["--new-token-init", "cooccurrence"]},
    "toolkit-max-length-256-cooccurrence": {"system": TOOLKIT, "precision": "auto", "flags": PLACED_256},
    "toolkit-max-length-256-cooccurrence-unlabeled": {"system": TOOLKIT, "precision": "auto", "unlabeled": True,
                                                      "flags": PLACED_256},
    "toolkit-max-length-256-unlabeled": {"system": TOOLKIT, "precision": "auto", "unlabeled": True,
                                         "flags": ["--max-length", "256", "--new-token-init", "random"]},
    "toolkit-max-length-256-cooccurrence-mlm-unlabeled": {"system": TOOLKIT, "precision": "auto", "unlabeled": True,
                                                          "flags": [*PLACED_256, "--mlm-adapt-steps", "500"]},
    # the closest recipe with more training: a third or fourth epoch, or twice the learning rate (issue 14)
    "toolkit-max-length-256-cooccurrence-unlabeled-3-epochs": {
        "system": TOOLKIT, "precision": "auto", "unlabeled": True, "epochs": 3, "flags": PLACED_256},
    # the 3-epoch recipe fused with its TF-IDF baseline, the share tuned on validation (--fuse-baseline)
    "toolkit-max-length-256-cooccurrence-unlabeled-3-epochs-fused": {
        "system": TOOLKIT, "precision": "auto", "unlabeled": True, "epochs": 3,
        "flags": [*PLACED_256, "--fuse-baseline", "true"]},
    "toolkit-max-length-256-cooccurrence-unlabeled-4-epochs": {
        "system": TOOLKIT, "precision": "auto", "unlabeled": True, "epochs": 4, "flags": PLACED_256},
    "toolkit-max-length-256-cooccurrence-unlabeled-10-epochs": {  # train_classifier.py's own --epochs default
        "system": TOOLKIT, "precision": "auto", "unlabeled": True, "epochs": 10, "flags": PLACED_256},
    "toolkit-max-length-256-cooccurrence-unlabeled-lr-1e-4": {
        "system": TOOLKIT, "precision": "auto", "unlabeled": True, "flags": [*PLACED_256, "--learning-rate", "1e-4"]},
    # self-training: the recipe's model labels the unlabeled reviews; those it is sure of join the training file
    "toolkit-max-length-256-cooccurrence-pseudo-labels": {
        "system": TOOLKIT, "precision": "auto", "unlabeled": True,
        "teacher": "toolkit-max-length-256-cooccurrence-unlabeled", "min_probability": 0.9,
        "flags": PLACED_256},
    "trainer-cls": {"system": TRAINER, "patches": ["cls_head"]},
    "trainer-group-by-length": {"system": TRAINER, "trainer_args": {"train_sampling_strategy": "group_by_length"}},
    "untuned": {"system": "untuned"},
    "tfidf": {"system": "tfidf", "seedless": True},
    "majority": {"system": "majority", "seedless": True},
}


# ---------------------------------------------------------------- arguments

def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help="comma-separated configurations (see above)")
    parser.add_argument("--seeds", default="13,14,15", help="comma-separated training seeds")
    parser.add_argument("--model", default="../shared/models/all-MiniLM-L6-v2", help="pretrained encoder (path)")
    parser.add_argument("--data-dir", default="data/reviews_quality", help="train/val/test.jsonl (built when missing)")
    parser.add_argument("--train", type=int, default=4000, help="training records when the data is built")
    parser.add_argument("--val", type=int, default=500, help="validation records when the data is built")
    parser.add_argument("--test", type=int, default=2000, help="test records when the data is built")
    parser.add_argument("--data-seed", type=int, default=13, help="sampling seed of prepare_reviews.py")
    parser.add_argument("--unlabeled", type=int, default=30000,
                        help="most reviews in no split written to unlabeled.txt when the data is built")
    parser.add_argument("--work-dir", default="runs/quality", help="one directory per configuration and seed")
    parser.add_argument("--output", default="bench/results/quality.json", help="summary JSON")
    parser.add_argument("--toolkit-dir", default=str(REPO_ROOT),
                        help="checkout whose train_classifier.py and common/ are measured; a `git archive` copy "
                             "names its commit in a COMMIT file, which the summary records")
    parser.add_argument("--epochs", type=int, default=2, help="training epochs")
    parser.add_argument("--batch-size", type=int, default=32, help="training batch size")
    parser.add_argument("--learning-rate", type=float, default=5e-5, help="peak AdamW learning rate")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per input")
    parser.add_argument("--warmup-ratio", type=float, default=0.1, help="share of steps with linear warmup")
    parser.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    parser.add_argument("--extend-vocab", type=int, default=3, help="min count of an [UNK] piece to be added")
    parser.add_argument("--rerun", action="store_true", help="retrain runs that already have a run.json")
    add_worker_args(parser)
    return parser


# ---------------------------------------------------------------- data and metrics

def ensure_data(args):
    data_dir = Path(args.data_dir)
    expected = {"train": args.train, "val": args.val, "test": args.test}
    if all((data_dir / f"{name}.jsonl").is_file() and count_lines(data_dir / f"{name}.jsonl") == size
           for name, size in expected.items()) and (data_dir / "unlabeled.txt").is_file():
        return data_dir
    subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "prepare_reviews.py"), "--output-dir", str(data_dir),
                    "--train", str(args.train), "--val", str(args.val), "--test", str(args.test),
                    "--seed", str(args.data_seed), "--unlabeled", str(args.unlabeled)], check=True)
    return data_dir


def count_lines(path):
    with open(path, encoding="utf-8") as handle:
        return sum(1 for line in handle if line.strip())


def read_split(data_dir, name):
    with open(Path(data_dir) / f"{name}.jsonl", encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    return [r["text"] for r in records], [r["label"] for r in records]


def score(true_labels, predicted_labels):
    from sklearn.metrics import accuracy_score, f1_score
    return {"accuracy": float(accuracy_score(true_labels, predicted_labels)),
            "macro_f1": float(f1_score(true_labels, predicted_labels, average="macro"))}


# ---------------------------------------------------------------- monkeypatches (bench only, never the product)

def apply_patches(patches):
    if "random_rows" in patches:
        # transformers 5 draws added rows from N(mean, 1e-9 * covariance) of the old rows: every new
        # token starts as (nearly) the same vector. mean_resizing=False gives N(0, initializer_range).
        from transformers import PreTrainedModel
        original = PreTrainedModel.resize_token_embeddings

        def resize_without_mean(self, new_num_tokens=None, pad_to_multiple_of=None, mean_resizing=True):
            return original(self, new_num_tokens, pad_to_multiple_of, mean_resizing=False)
        PreTrainedModel.resize_token_embeddings = resize_without_mean
    if "matched_rows" in patches:
        # added rows drawn per dimension from the old rows' mean and standard deviation: as spread out as
        # real tokens (the N(0, 0.02) of mean_resizing=False is about a third of their spread here)
        import torch
        from transformers import PreTrainedModel
        original = PreTrainedModel.resize_token_embeddings

        def resize_matched(self, new_num_tokens=None, pad_to_multiple_of=None, mean_resizing=True):
            old_rows = self.get_input_embeddings().weight.shape[0]
            embeddings = original(self, new_num_tokens, pad_to_multiple_of, mean_resizing=False)
            with torch.no_grad():
                old = embeddings.weight[:old_rows]  # (old_vocab, hidden)
                added = embeddings.weight[old_rows:]
                added.copy_(old.mean(0) + torch.randn_like(added) * old.std(0))
            return embeddings
        PreTrainedModel.resize_token_embeddings = resize_matched


# ---------------------------------------------------------------- workers: one run each, in a fresh process

def run_toolkit(args, spec, run_dir):
    sys.path.insert(0, args.toolkit_dir)
    import train_classifier
    apply_patches(spec.get("patches", []))
    data_dir = Path(args.data_dir).resolve()
    train_path = data_dir / "train.jsonl"
    if spec.get("teacher"):
        train_path = add_pseudo_labels(args, spec, run_dir, train_path)
    train_count = count_lines(train_path)
    if spec.get("val_file", True):
        val_flags = ["--val-path", str(data_dir / "val.jsonl")]
    else:
        val_flags = []
        train_count -= round(0.1 * train_count)
    if spec.get("unlabeled"):
        val_flags += ["--unlabeled-path", str(data_dir / "unlabeled.txt")]
    steps_per_epoch = -(-train_count // args.batch_size)
    epoch_count, precision = spec.get("epochs", args.epochs), spec.get("precision", "fp32")
    output_dir = run_dir / "toolkit_output"
    argv = ["--data-path", str(train_path), *val_flags, "--test-path", str(data_dir / "test.jsonl"),
            "--model-name", args.model, "--epochs", str(epoch_count), "--batch-size", str(args.batch_size),
            "--learning-rate", str(args.learning_rate), "--max-length", str(args.max_length),
            "--warmup-ratio", str(args.warmup_ratio), "--weight-decay", str(args.weight_decay),
            "--extend-vocab", str(args.extend_vocab if spec.get("extend", True) else 0),
            "--precision", precision, "--device", "cpu", "--seed", str(args.seed), "--output-dir", str(output_dir),
            "--save-steps", str(steps_per_epoch), "--save-total-limit", str(epoch_count + 1),
            "--logging-steps", "25", *spec.get("flags", [])]
    started = time.perf_counter()
    status = train_classifier.main(argv)
    train_seconds = time.perf_counter() - started
    if status:
        raise SystemExit(f"train_classifier.py exited with {status}")
    metrics = json.loads((output_dir / "metrics.json").read_text(encoding="utf-8"))
    log_rows = [json.loads(line) for line in (output_dir / "train_log.jsonl").read_text().splitlines() if line]
    val_by_step = {row["step"]: row for row in log_rows if "eval_loss" in row}
    epochs = []
    for checkpoint in sorted(output_dir.glob("checkpoint-step-*"), key=lambda p: int(p.name.rsplit("-", 1)[1])):
        step = int(checkpoint.name.rsplit("-", 1)[1])
        eval_dir = run_dir / f"eval_step_{step}"
        train_classifier.main(["--eval-only", "--model-path", str(checkpoint), "--test-path",
                               str(data_dir / "test.jsonl"), "--output-dir", str(eval_dir), "--precision", precision,
                               "--device", "cpu"])
        test = json.loads((eval_dir / "metrics.json").read_text(encoding="utf-8"))["test"]
        val = val_by_step.get(step, {})
        epochs.append({"step": step, "val": {"accuracy": val.get("eval_accuracy"), "macro_f1": val.get("eval_macro_f1")},
                       "test": {"accuracy": test["accuracy"], "macro_f1": test["macro_f1"]}})
        shutil.rmtree(checkpoint)  # optimizer state: ~270 MB each
    # a fused model reports what its directory answers: the model and the baseline together
    reported = metrics["fusion"]["evaluation"] if "fusion" in metrics else metrics["test"]
    return {"reported": {"accuracy": reported["accuracy"], "macro_f1": reported["macro_f1"]},
            "model_alone": {"accuracy": metrics["test"]["accuracy"], "macro_f1": metrics["test"]["macro_f1"]},
            "fusion_weight": metrics.get("fusion", {}).get("weight"), "epochs": epochs, "temperature": metrics.get("calibration", {}).get("temperature"),
            "train_seconds": train_seconds, "argv": argv}


def add_pseudo_labels(args, spec, run_dir, train_path):
    """Label unlabeled.txt with the teacher run's published model (infer.py, calibrated probabilities) and
    write train_path's records followed by every review labelled with probability >= min_probability."""
    teacher_model = Path(args.teacher_dir) / "toolkit_output" / "checkpoint-best"
    predictions_path = run_dir / "teacher_predictions.jsonl"
    subprocess.run([sys.executable, str(Path(args.toolkit_dir) / "infer.py"), "--model-path", str(teacher_model),
                    "--file", str(Path(args.data_dir) / "unlabeled.txt"), "--output", str(predictions_path),
                    "--device", "cpu"], check=True)
    predictions = [json.loads(line) for line in predictions_path.read_text(encoding="utf-8").splitlines() if line]
    kept = [{"text": p["input"], "label": p["label"]} for p in predictions
            if p["probability"] >= spec["min_probability"]]
    counts = {label: sum(r["label"] == label for r in kept) for label in sorted({r["label"] for r in kept})}
    print(f"pseudo-labels: kept {len(kept)} of {len(predictions)} unlabeled reviews at probability >= "
          f"{spec['min_probability']} ({counts})", flush=True)
    combined_path = run_dir / "train_with_pseudo_labels.jsonl"
    with open(combined_path, "w", encoding="utf-8") as out:
        out.write(train_path.read_text(encoding="utf-8"))
        out.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in kept)
    return combined_path


def extend_tokenizer(args, tokenizer, train_texts, extend):
    if not extend:
        return []
    sys.path.insert(0, args.toolkit_dir)
    from common.vocab import extend_vocabulary
    return extend_vocabulary(tokenizer, train_texts, args.extend_vocab)


def run_trainer(args, spec, run_dir):
    """The Hugging Face Trainer as a user would write it: AutoModelForSequenceClassification, a datasets map
    with truncation, DataCollatorWithPadding; same settings as the toolkit run."""
    import numpy as np
    from datasets import Dataset
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainingArguments, set_seed)
    apply_patches(spec.get("patches", []))
    model_path = args.model
    splits = {name: read_split(args.data_dir, name) for name in ("train", "val", "test")}
    names = sorted(set(splits["train"][1]))  # the toolkit's label order: sorted names
    label2id = {name: index for index, name in enumerate(names)}
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    added = extend_tokenizer(args, tokenizer, splits["train"][0], spec.get("extend", True))
    set_seed(args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_path, num_labels=len(names), id2label=dict(enumerate(names)), label2id=label2id)
    if added:
        model.resize_token_embeddings(len(tokenizer))
    if "cls_head" in spec.get("patches", []):
        model.bert.pooler.forward = lambda hidden_states: hidden_states[:, 0]  # (batch, hidden): no dense, no tanh

    def encode(name):
        texts, labels = splits[name]
        dataset = Dataset.from_dict({"text": texts, "label": [label2id[label] for label in labels]})
        return dataset.map(lambda batch: tokenizer(batch["text"], truncation=True, max_length=args.max_length),
                           batched=True, remove_columns=["text"])

    def compute_metrics(prediction):
        return score(prediction.label_ids, np.argmax(prediction.predictions, axis=-1))

    training_args = TrainingArguments(
        output_dir=str(run_dir / "trainer_output"), num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=64,
        learning_rate=args.learning_rate, warmup_steps=args.warmup_ratio, weight_decay=args.weight_decay,
        lr_scheduler_type="linear", eval_strategy="epoch", save_strategy="no", logging_steps=25,
        report_to="none", seed=args.seed, use_cpu=True, bf16=False, fp16=False,
        **spec.get("trainer_args", {}))
    trainer = Trainer(model=model, args=training_args, train_dataset=encode("train"),
                      eval_dataset={"val": encode("val"), "test": encode("test")},
                      data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=compute_metrics)
    started = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - started
    by_step = {}
    for row in trainer.state.log_history:
        for split in ("val", "test"):
            if f"eval_{split}_accuracy" in row:
                by_step.setdefault(row["step"], {"step": row["step"]})[split] = {
                    "accuracy": row[f"eval_{split}_accuracy"], "macro_f1": row[f"eval_{split}_macro_f1"]}
    epochs = [by_step[step] for step in sorted(by_step)]
    shutil.rmtree(run_dir / "trainer_output", ignore_errors=True)
    return {"reported": epochs[-1]["test"], "epochs": epochs, "added_tokens": len(added),
            "train_seconds": train_seconds}


def run_untuned(args, spec, run_dir):
    """The toolkit's model before its first step: pretrained encoder, extended vocabulary, new head."""
    import types

    import torch
    sys.path.insert(0, args.toolkit_dir)
    from common import modeldir
    from train_classifier import build_model
    model_path = args.model
    train_texts, train_labels = read_split(args.data_dir, "train")
    test_texts, test_labels = read_split(args.data_dir, "test")
    names = sorted(set(train_labels))
    tokenizer = modeldir.load_tokenizer(model_path)
    extend_tokenizer(args, tokenizer, train_texts, spec.get("extend", True))
    torch.manual_seed(args.seed)
    model_args = types.SimpleNamespace(model_name=model_path, trust_remote_code=False, pooling="cls", dropout=0.1,
                                       head_layernorm=False, freeze_backbone=False)
    model = build_model(model_args, len(names), tokenizer).eval()
    predictions = []
    with torch.no_grad():
        for start in range(0, len(test_texts), 64):
            batch = tokenizer(test_texts[start:start + 64], truncation=True, max_length=args.max_length,
                              padding=True, return_tensors="pt")
            predictions += model(**batch).argmax(-1).tolist()
    return {"reported": score([names.index(label) for label in test_labels], predictions)}


def run_tfidf(args, spec, run_dir):
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    train_texts, train_labels = read_split(args.data_dir, "train")
    test_texts, test_labels = read_split(args.data_dir, "test")
    vectorizer = TfidfVectorizer(analyzer="char", ngram_range=(1, 3), sublinear_tf=True)
    classifier = LogisticRegression(max_iter=2000).fit(vectorizer.fit_transform(train_texts), train_labels)
    return {"reported": score(test_labels, classifier.predict(vectorizer.transform(test_texts)))}


def run_majority(args, spec, run_dir):
    _, train_labels = read_split(args.data_dir, "train")
    _, test_labels = read_split(args.data_dir, "test")
    majority = max(sorted(set(train_labels)), key=train_labels.count)
    return {"reported": score(test_labels, [majority] * len(test_labels))}


WORKERS = {TOOLKIT: run_toolkit, TRAINER: run_trainer, "untuned": run_untuned, "tfidf": run_tfidf,
           "majority": run_majority}


def run_worker(args):
    spec = CONFIGS[args.worker]
    run_dir = Path(args.run_dir).resolve()
    args.data_dir = str(Path(args.data_dir).resolve())
    result = WORKERS[spec["system"]](args, spec, run_dir)
    result.update({"config": args.worker, "seed": None if spec.get("seedless") else args.seed})
    (run_dir / "run.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    return 0


# ---------------------------------------------------------------- driver

def launch(args, name, seed):
    """Run one configuration and seed in its own process unless its run.json exists; return the result."""
    run_dir = Path(args.work_dir).resolve() / (name if CONFIGS[name].get("seedless") else f"{name}-seed{seed}")
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--seed", str(seed),
               "--run-dir", str(run_dir)] + forwarded_flags(args)
    teacher = CONFIGS[name].get("teacher")
    if teacher:
        launch(args, teacher, seed)  # its published model labels the unlabeled text
        command += ["--teacher-dir", str(Path(args.work_dir).resolve() / f"{teacher}-seed{seed}")]
    result = run_in_process(run_dir, command, f"[quality] {name} seed {seed}", args.rerun)
    print(f"[quality] {name} seed {seed}: test accuracy {result['reported']['accuracy']:.4f}, "
          f"macro-F1 {result['reported']['macro_f1']:.4f} ({result['wall_seconds']:.0f} s)", flush=True)
    return result


def add_worker_args(parser):
    """The hidden options of one run in its own process (internal): what a worker command passes."""
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=13, help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    parser.add_argument("--teacher-dir", help=argparse.SUPPRESS)


def run_in_process(run_dir, command, label, rerun=False, env=None):
    """Run ``command`` (a worker writing ``run_dir/run.json``) with its output in ``run_dir/log.txt``, unless
    run.json exists already; return that result with the wall-clock time added."""
    result_path = run_dir / "run.json"
    if result_path.is_file() and not rerun:
        return json.loads(result_path.read_text(encoding="utf-8"))
    if run_dir.exists():
        shutil.rmtree(run_dir)  # an interrupted or forced run starts clean (the trainers refuse foreign dirs)
    run_dir.mkdir(parents=True)
    print(f"{label}: running (log {run_dir / 'log.txt'})", flush=True)
    started = time.perf_counter()
    with open(run_dir / "log.txt", "w", encoding="utf-8") as log:
        completed = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                                   env={**os.environ, "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false",
                                        **(env or {})})
    if completed.returncode or not result_path.is_file():
        raise SystemExit(f"{label} failed (exit {completed.returncode}); see {run_dir / 'log.txt'}")
    result = json.loads(result_path.read_text(encoding="utf-8"))
    result["wall_seconds"] = time.perf_counter() - started
    result_path.write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result


def parse_configs(text, known):
    """The comma-separated --configs names, each checked against ``known``."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in known]
    if unknown:
        raise SystemExit(f"--configs: unknown {unknown}; known: {sorted(known)}")
    return names


def forwarded_flags(args):
    flags = []
    for name in ("model", "data_dir", "toolkit_dir", "epochs", "batch_size", "learning_rate", "max_length",
                 "warmup_ratio", "weight_decay", "extend_vocab"):
        value = getattr(args, name)
        if name in ("data_dir", "toolkit_dir") or (name == "model" and Path(value).exists()):
            value = str(Path(value).resolve())  # a path given relative to where the bench was started
        flags += ["--" + name.replace("_", "-"), str(value)]
    return flags


def mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(name, results):
    """Mean and std over seeds of the reported model, the last epoch and the best epoch on validation."""
    row = {"config": name, "seeds": [r["seed"] for r in results]}
    views = {"reported": [r["reported"] for r in results]}
    if all(r.get("epochs") for r in results):
        views["last"] = [r["epochs"][-1]["test"] for r in results]
        views["best_on_val"] = [max(r["epochs"], key=lambda e: e["val"]["macro_f1"])["test"] for r in results]
    for view, metrics in views.items():
        for metric in ("accuracy", "macro_f1"):
            mean, std = mean_std([m[metric] for m in metrics])
            row[f"{view}_{metric}"] = {"mean": mean, "std": std, "values": [m[metric] for m in metrics]}
    seconds = [r.get("train_seconds") for r in results if r.get("train_seconds")]
    if seconds:
        row["train_seconds_mean"] = statistics.fmean(seconds)
    return row


def format_cell(cell):
    if cell is None or cell["mean"] is None:
        return "-"
    if len(cell["values"]) == 1:
        return f"{100 * cell['mean']:.2f}"
    return f"{100 * cell['mean']:.2f} ± {100 * cell['std']:.2f}"


def format_table(rows):
    lines = ["| configuration | runs | test accuracy % | test macro-F1 % | last epoch acc % | best-on-val epoch acc % |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['config']} | {len(row['seeds'])} | {format_cell(row['reported_accuracy'])} | "
                     f"{format_cell(row['reported_macro_f1'])} | {format_cell(row.get('last_accuracy'))} | "
                     f"{format_cell(row.get('best_on_val_accuracy'))} |")
    return "\n".join(lines)


def describe_machine():
    model_name, flags = "", []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not model_name:
                model_name = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line.split(":", 1)[1].split()
    except OSError:
        pass
    import torch
    import transformers
    return {"cpu": model_name or platform.processor(), "cores": os.cpu_count(),
            "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__, "transformers": transformers.__version__, "date": date.today().isoformat()}


def toolkit_commit(toolkit_dir):
    """HEAD of the measured checkout; for an exported snapshot (git archive), the hash in its COMMIT file."""
    completed = subprocess.run(["git", "-C", toolkit_dir, "rev-parse", "HEAD"], capture_output=True, text=True)
    if completed.returncode == 0:
        return completed.stdout.strip()
    marker = Path(toolkit_dir) / "COMMIT"
    return marker.read_text().strip() if marker.is_file() else None


def recorded_command(argv, toolkit_dir):
    """The bench command as results/*.json records it, naming no path of this machine: a path inside the
    repository relative to it, a --toolkit-dir snapshot elsewhere by the commit it holds."""
    words = []
    for word in argv:
        path = Path(word)
        if path.is_absolute() and path.resolve().is_relative_to(REPO_ROOT):
            word = str(path.resolve().relative_to(REPO_ROOT))
        elif path.is_absolute() and path.resolve() == Path(toolkit_dir).resolve():
            word = f"<snapshot of {toolkit_commit(toolkit_dir) or 'an unknown commit'}>"
        elif path.is_absolute():
            word = "<path outside the repository>"
        words.append(word)
    return "python bench/quality.py " + " ".join(words)


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.worker:
        return run_worker(args)
    names = parse_configs(args.configs, CONFIGS)
    seeds = [int(seed) for seed in args.seeds.split(",")]
    ensure_data(args)
    rows = []
    for name in names:
        results = [launch(args, name, seed) for seed in ([seeds[0]] if CONFIGS[name].get("seedless") else seeds)]
        rows.append(summarize(name, results))
    print(format_table(rows))
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(output.read_text(encoding="utf-8")) if output.is_file() else {}
    merged = {row["config"]: row for row in previous.get("rows", [])}
    merged.update({row["config"]: row for row in rows})  # earlier configurations stay; re-measured ones are replaced
    summary = {"machine": describe_machine(), "toolkit_commit": toolkit_commit(args.toolkit_dir),
               "data": {"dir": args.data_dir, "train": count_lines(Path(args.data_dir) / "train.jsonl"),
                        "val": count_lines(Path(args.data_dir) / "val.jsonl"),
                        "test": count_lines(Path(args.data_dir) / "test.jsonl"), "data_seed": args.data_seed},
               "settings": {key: getattr(args, key) for key in ("model", "epochs", "batch_size", "learning_rate",
                                                                  "max_length", "warmup_ratio", "weight_decay",
                                                                  "extend_vocab")},
               "command": recorded_command(argv if argv is not None else sys.argv[1:], args.toolkit_dir),
               "rows": list(merged.values())}
    output.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
