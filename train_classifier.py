"""Fine-tune a BERT-family encoder for text classification with an explicit PyTorch loop.

Example:
    python train_classifier.py --data-path examples/messages.json --output-dir output \
        --model-name hfl/chinese-bert-wwm-ext --labels low_value,normal,interrupt --epochs 3

Reads {"text", "label"}, {"message", "context", "label"} or chat {"messages": [...]} records from
JSON, JSONL, CSV or TSV; writes output/checkpoint-best (a self-describing model directory),
metrics.json, train_log.jsonl, errors.jsonl and plots. Runs unchanged under torchrun.

A cross-encoder reranker from the vector trainer's pair files ({"query", "document", "rel"} or
{"query", "pos", "neg"}), evaluated on each query's documents and behind a bi-encoder:
    python train_classifier.py --problem-type rerank --data-path train.jsonl --val-path valid.jsonl \
        --test-path test.jsonl --model-name all-MiniLM-L6-v2 --retriever vector_model --output-dir reranker
"""
import argparse
import json
import sys
from contextlib import nullcontext
from pathlib import Path

from common.choices import POOLINGS, RERANK_LOSSES
from common.cli import (ArgumentParser, add_baseline_fusion_arg, add_checkpoint_args, add_data_path_args,
                        add_data_text_args, add_flag, add_optimization_args, add_problem_type_args, add_runtime_args,
                        add_vocabulary_args, apply_option_ranges, check_baseline_fusion, exit_on_help, parse_bool,
                        parse_with_config, resolve_default_warmup, write_effective_config)
from common.errors import UserError, report_user_errors
from common.metrics import ALL_SELECTABLE_METRICS, format_report, majority_baseline, selection_mode

# config-file keys (sections of seed 000's default.yaml) whose flag has another name
SECTION_ALIASES = {
    ("model", "name"): "model_name", ("training", "fp16"): "fp16", ("scheduler", "type"): "scheduler",
    ("scheduler", "num_warmup_steps"): "warmup_steps", ("logging", "steps"): "logging_steps",
    ("early_stopping", "metric"): "metric_for_best_model", ("output", "dir"): "output_dir",
}
VALIDATION_SPLITS = ("validation", "val", "dev")  # default split names of a save_to_disk --val-path
CONFIG_CONVERTERS = {"fp16": lambda enabled: ("precision", "fp16") if enabled else (None, None)}


# ---------------------------------------------------------------- arguments

def build_parser():
    parser = ArgumentParser(description=__doc__.split("\n\n")[0],
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    group = add_data_path_args(parser)
    add_flag(group, "val-ratio", type=float, default=0.1, help="validation share when --val-path is absent")
    add_flag(group, "group-field", help="record field (topic, month, source) to report metrics per group")
    add_data_text_args(parser)
    add_vocabulary_args(parser)

    group = parser.add_argument_group("model")
    add_flag(group, "model-name", aliases=("model-name-or-path",), default="hfl/chinese-bert-wwm-ext",
             help="hub name or local path of the encoder")
    add_flag(group, "num-labels", type=int, help="expected number of labels (checked against the data)")
    add_flag(group, "max-length", type=int, default=128, help="tokens per input, special tokens included")
    add_flag(group, "pooling", choices=POOLINGS, default="cls", help="how token states become one vector")
    add_flag(group, "dropout", type=float, default=0.1, help="dropout before the classification layer")
    add_flag(group, "head-layernorm", action="store_true", help="LayerNorm before the classification layer")
    add_flag(group, "freeze-backbone", action="store_true", help="train only the head (frozen feature extractor)")
    add_flag(group, "compile", action="store_true",
             help="torch.compile the model (on CPU: minutes of compiling, no faster; see docs)")
    add_problem_type_args(parser)
    group = parser.add_argument_group("reranker (--problem-type rerank, see docs/train_classifier.md)")
    add_flag(group, "rerank-loss", choices=RERANK_LOSSES, default="pointwise",
             help="pointwise: BCE of each pair against rel / max rel; listwise: softmax over one positive and "
                  "its negatives")
    add_flag(group, "rerank-group-size", type=int, default=8,
             help="listwise: pairs per group (one positive, the rest negatives); --batch-size counts groups")
    add_flag(group, "retriever", help="bi-encoder model directory (train_vector.py): evaluate retrieve-then-rerank "
                                      "on the test (else validation) pairs")
    add_flag(group, "rerank-top", type=int, default=50, help="with --retriever: how many retrieved documents "
                                                              "the reranker reorders")

    add_optimization_args(parser, epochs=10, batch_size=32, eval_batch_size=64)

    group = parser.add_argument_group("techniques (see docs/train_classifier.md)")
    add_flag(group, "loss", choices=["ce", "focal"], default="ce", help="cross-entropy or focal loss")
    add_flag(group, "focal-gamma", type=float, default=2.0, help="focal loss focusing parameter")
    add_flag(group, "class-weights", choices=["none", "balanced", "effective"], default="none",
             help="per-class loss weights from training frequencies")
    add_flag(group, "class-weights-beta", type=float, default=0.999, help="beta of effective-number weights")
    add_flag(group, "sampler", choices=["random", "weighted"], default="random",
             help="weighted: draw examples inversely to class frequency")
    add_flag(group, "label-smoothing", type=float, default=0.0, help="label smoothing epsilon")
    add_flag(group, "rdrop-alpha", type=float, default=0.0, help="R-Drop weight of the symmetric KL (0: off)")
    add_flag(group, "adversarial", choices=["none", "fgm", "pgd"], default="none",
             help="adversarial training on the word embeddings")
    add_flag(group, "adv-epsilon", type=float, default=1.0, help="adversarial perturbation size")
    add_flag(group, "adv-steps", type=int, default=3, help="PGD steps")
    add_flag(group, "ema-decay", type=float, default=0.0, help="EMA of weights for evaluation/saving (0: off)")
    add_flag(group, "calibrate", type=parse_bool, default=True,
             help="fit a temperature on the validation set and store it with the model")
    add_baseline_fusion_arg(group)

    group = add_checkpoint_args(parser, logging_steps=100)
    add_flag(group, "metric-for-best-model", default=None, choices=ALL_SELECTABLE_METRICS,
             help="validation metric that picks the best model (default: macro_f1; multi_label: micro_f1; "
                  "regression: rmse; rerank: ndcg@10)")
    add_flag(group, "save-strategy", choices=["steps", "no"], default="steps", help="'no' skips step checkpoints")
    add_flag(group, "eval-only", action="store_true", help="evaluate --model-path on --test-path, no training")
    add_flag(group, "model-path", help="model directory for --eval-only")
    add_flag(group, "wandb", action="store_true", help="log to Weights & Biases (needs the wandb package)")
    add_flag(group, "wandb-project", default="bert-classifier", help="W&B project name")
    add_runtime_args(parser)
    return apply_option_ranges(parser)


def parse_args(argv=None):
    args = parse_with_config(build_parser(), argv, SECTION_ALIASES, CONFIG_CONVERTERS)
    resolve_default_warmup(args, warmup_ratio=0.1)
    adaptation.resolve_vocabulary_options(args)
    if args.eval_only:
        if not args.model_path or not args.test_path:
            raise UserError("--eval-only needs --model-path and --test-path")
    elif not args.data_path:
        raise UserError("--data-path is required (training data file)")
    checkpoints.check_resume_argument(args.resume)
    if not args.eval_only:
        problem_types.resolve_problem_type(args)
        check_baseline_fusion(args)
    if args.sampler == "weighted" and args.class_weights != "none":
        print("warning: --sampler weighted together with --class-weights corrects the imbalance twice; "
              "the guide says pick one", file=sys.stderr)
    return args


# --help answers before the imports below: they load torch, which takes seconds (common/cli.py)
if __name__ == "__main__":
    exit_on_help(build_parser)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from common import (adaptation, checkpoints, data, distributed, fusion, model_card, modeldir,  # noqa: E402
                    optimization, problem_types, reranking, rundir, training)
from common.heads import SequenceClassifier  # noqa: E402
from common.text import build_normalizer  # noqa: E402


# ---------------------------------------------------------------- data

def load_splits(args, problem, label_names=None):
    """Read and validate every split before anything expensive; returns (splits, label_set, format)."""
    grouped_path = args.test_path or args.val_path or args.data_path  # the file whose groups are reported

    def read(path, split=None, default_splits=("train",)):
        return data.load_text_examples(path, args.text_field, args.label_field, args.group_field,
                                       args.skip_invalid, split=split, default_splits=default_splits,
                                       parse_label=problem.parse_label, require_group_field=path == grouped_path)
    label_field = args.label_field or "label"
    train_examples = read(args.data_path, args.data_split) if args.data_path else []
    label_set = data.LabelSet(label_names) if label_names else problem.build_label_set(
        train_examples, args.labels, label_field)
    if args.num_labels and args.num_labels != len(label_set.names):
        raise UserError(f"--num-labels {args.num_labels} but the labels are {label_set.names}")
    splits = {"train": problem.resolve(label_set, train_examples, args.skip_invalid, label_field)}
    if args.val_path:
        splits["val"] = problem.resolve(label_set, read(args.val_path, default_splits=VALIDATION_SPLITS),
                                        args.skip_invalid, label_field)
    if args.test_path:
        splits["test"] = problem.resolve(label_set, read(args.test_path, default_splits=("test",)),
                                         args.skip_invalid, label_field)
    data.report_skipped(*splits.values())
    if not args.val_path and splits["train"]:
        record_format = splits["train"].record_format
        splits["train"], splits["val"] = problem.split_validation(splits["train"], args.val_ratio, args.seed, label_set)
        splits["train"] = data.ExampleList(splits["train"])
        splits["train"].record_format = record_format
    if splits["train"]:
        problem.check_coverage(splits["train"], splits["val"], label_set)
    return splits, label_set


def load_rerank_splits(args, normalize=None):
    """A reranker's splits: graded query/document pairs (or query/pos/neg records); without --val-path,
    whole queries are held out for validation. Returns (splits, label_set of the one score).

    With ``normalize``, a text it empties is refused (data.normalize_texts), checked before the held-out
    split so a query-group file's passages are named by their own fields (``pos[0]``, ``neg[1]``)."""
    def read(path, split=None, default_splits=("train",)):
        return reranking.load_rerank_pairs(path, args.skip_invalid, split, default_splits)
    splits = {"train": read(args.data_path, args.data_split)} if args.data_path else {}
    if args.val_path:
        splits["val"] = read(args.val_path, default_splits=VALIDATION_SPLITS)
    if args.test_path:
        splits["test"] = read(args.test_path, default_splits=("test",))
    data.report_skipped(*splits.values())
    if normalize is not None:
        data.normalize_texts(splits, normalize)
    if not args.val_path and "train" in splits:
        splits["train"], splits["val"] = reranking.split_by_query(splits["train"], args.val_ratio, args.seed)
    for name, pairs in splits.items():
        reranking.check_split(pairs, name)
    return splits, data.LabelSet(["relevance"])


def encode_rerank_splits(splits, tokenizer, args, normalize):
    """Tokenize a reranker's splits once (listwise training: groups of one positive and its negatives).
    Returns ({split: RerankDataset}, summary lines).

    The pointwise targets are rel / the highest rel of the training and validation pairs, so the top grade
    is 1 and no binary cross-entropy target is above 1, even when only a validation pair has the top
    grade; a test split (ranked, never trained on) is scaled by its own top grade where that is higher.
    """
    trained_on = [pair.rel for name in ("train", "val") for pair in splits.get(name, ())]
    rel_scale = max(trained_on or [pair.rel for pair in splits["test"]])
    datasets, summaries = {}, []
    for name, pairs in splits.items():
        groups = None
        if name == "train" and args.rerank_loss == "listwise":
            groups = reranking.listwise_groups(pairs, args.rerank_group_size, args.seed)
        scale = max([rel_scale, *(pair.rel for pair in pairs)])
        datasets[name] = reranking.build_rerank_dataset(tokenizer, pairs, args.max_length, args.truncation_side,
                                                        normalize, scale, groups)
        summaries.append(reranking.summarize(name, pairs, datasets[name], args.max_length))
    return datasets, summaries


def check_retriever(path):
    """--retriever must be a bi-encoder model directory: checked before training, not after it."""
    if not Path(path).is_dir():
        raise UserError(f"--retriever {path}: not a directory (a train_vector.py model directory)")
    _, toolkit = modeldir.read_model_config(path)
    if toolkit.get("task") != "vector":
        raise UserError(f"--retriever {path}: a {toolkit.get('task')} model, not a bi-encoder (vector) model")


def encode_splits(splits, normalized, tokenizer, args, normalize, label_set, problem):
    """Tokenize every split once (its texts already ``normalized`` by data.normalize_texts: [[text] per
    example]); print the dataset summary. Returns {split: EncodedDataset}."""
    datasets, summaries = {}, []
    for name, examples in splits.items():
        for example, (text,) in zip(examples, normalized[name]):
            example.text = text
            example.context = normalize(example.context) if example.context else example.context
        stats = data.EncodedBatchStats()
        datasets[name] = data.build_classification_dataset(tokenizer, examples, args.max_length,
                                                           args.truncation_side, stats)
        for feature, example in zip(datasets[name].features, examples):
            feature["labels"] = problem.target(example.label, len(label_set.names))
        summaries.append(data.summarize_split(name, examples, label_set, stats, args.max_length,
                                              problem.summarize_labels(examples, label_set)))
    return datasets, summaries


def build_collator(args):
    """Pads a batch; a reranker's examples (groups of pairs) are flattened into one batch of pairs."""
    if args.problem_type == "rerank":
        return reranking.RerankCollator(args.pad_token_id)
    return data.PaddingCollator(args.pad_token_id)


def build_train_loader(dataset, args, context, sample_weights=None):
    sampler = data.LengthGroupedBatchSampler(
        dataset.lengths, args.batch_size, shuffle=True, seed=args.seed, group_by_length=args.group_by_length,
        rank=context.rank, world_size=context.world_size, sample_weights=sample_weights)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=build_collator(args),
                                       num_workers=args.num_workers, pin_memory=torch.cuda.is_available(),
                                       generator=data.private_generator(args.seed))


def build_eval_loader(dataset, args, context):
    """This rank's shard, length-sorted (fast); predictions are put back in order by index."""
    shard = torch.utils.data.Subset(dataset, data.shard_indices(len(dataset), context.rank, context.world_size))
    lengths = [dataset.lengths[i] for i in shard.indices]
    sampler = data.LengthGroupedBatchSampler(lengths, args.eval_batch_size, shuffle=False)
    return torch.utils.data.DataLoader(shard, batch_sampler=sampler, generator=data.private_generator(args.seed),
                                       collate_fn=build_collator(args))


# ---------------------------------------------------------------- model

def build_model(args, num_labels, tokenizer, domain_texts=()):
    return SequenceClassifier.from_pretrained_encoder(args, num_labels, tokenizer, domain_texts)


def build_toolkit_block(args, model, normalize_spec, record_format, problem, temperature=1.0):
    """Everything inference needs to reproduce training-time preprocessing and read the outputs."""
    toolkit = {"task": "classification", "head": model.head_settings, "temperature": temperature,
               **problem.toolkit_settings(),
               "preprocessing": {"max_length": args.max_length, "truncation_side": args.truncation_side,
                                 "context": "pair", "context_truncation": "keep_recent_end",
                                 "normalize": normalize_spec, "record_format": record_format}}
    if problem.name == "rerank":  # [CLS] query [SEP] document [SEP]; the document is cut first
        toolkit["preprocessing"].update(context=reranking.PREPROCESSING_PAIR, context_truncation="document_first",
                                        record_format="query_document")
    return toolkit


# ---------------------------------------------------------------- evaluation

@torch.no_grad()
def predict_logits(model, loader, device, precision):
    """(logits, labels, indices) for this rank's shard, in loader order."""
    was_training = model.training
    model.eval()
    logits, labels, indices = [], [], []
    for batch in tqdm(loader, desc="evaluate", leave=False, disable=None):  # None: only on a terminal
        with precision.autocast(device):
            batch_logits = model(**modeldir.to_device(batch, device))
        logits.append(batch_logits.float().cpu())
        labels.append(batch["labels"])
        indices.append(batch["index"])
    model.train(was_training)
    return torch.cat(logits), torch.cat(labels), torch.cat(indices)


def evaluate(model, loader, device, precision, context, label_names, problem):
    """Metrics over the whole split (gathered across ranks), plus the logits in input order."""
    shards = distributed.gather_objects(context, predict_logits(model, loader, device, precision))
    logits = torch.cat([shard[0] for shard in shards])
    labels = torch.cat([shard[1] for shard in shards])
    order = torch.argsort(torch.cat([shard[2] for shard in shards]))
    logits, labels = logits[order], labels[order]
    return problem.evaluation_metrics(logits, labels, label_names), logits, labels


# ---------------------------------------------------------------- techniques

def build_techniques(args, model, train_dataset, num_labels, problem):
    """Loss function, adversary, EMA and sampling weights from the technique flags (common/techniques.py)."""
    from common import techniques
    train_labels = np.array([f["labels"] for f in train_dataset.features])
    loss_fn = problem.build_training_loss(args, train_labels, num_labels)
    adversary = None
    if args.adversarial == "fgm":
        adversary = techniques.FGM(model, epsilon=args.adv_epsilon)
    elif args.adversarial == "pgd":
        adversary = techniques.PGD(model, epsilon=args.adv_epsilon, alpha=args.adv_epsilon / 3, steps=args.adv_steps)
    ema = techniques.ExponentialMovingAverage(model, args.ema_decay) if args.ema_decay > 0 else None
    sample_weights = None
    if args.sampler == "weighted":  # single_label only (problem_types refuses it otherwise)
        sample_weights = (1.0 / np.maximum(np.bincount(train_labels, minlength=num_labels), 1))[train_labels]
    return loss_fn, adversary, ema, sample_weights


def compute_loss(model, inputs, labels, loss_fn, rdrop_alpha, consistency=None):
    """Task loss; with R-Drop, two dropout passes (one batched forward) plus their consistency term
    (``consistency``: the problem type's; the symmetric KL of two softmaxes by default)."""
    if rdrop_alpha <= 0:
        return loss_fn(model(**inputs), labels)
    from common.techniques import symmetric_kl
    doubled = {key: torch.cat([value, value]) for key, value in inputs.items()}
    logits_a, logits_b = model(**doubled).chunk(2)
    task_loss = (loss_fn(logits_a, labels) + loss_fn(logits_b, labels)) / 2
    return task_loss + rdrop_alpha * (consistency or symmetric_kl)(logits_a, logits_b)


def adversarial_backward(adversary, model, inputs, labels, loss_fn, args, scaler, precision, device):
    """Extra backward passes on perturbed word embeddings; embeddings are restored afterwards."""
    scale = 1.0 / args.gradient_accumulation_steps
    if args.adversarial == "fgm":
        adversary.attack()
        with precision.autocast(device):
            adversarial_loss = loss_fn(model(**inputs), labels) * scale
        scaler.scale(adversarial_loss).backward()
        adversary.restore()
        return
    adversary.backup_grad()
    for step in range(args.adv_steps):
        adversary.attack(first=step == 0)
        if step < args.adv_steps - 1:
            model.zero_grad(set_to_none=True)
        else:
            adversary.restore_grad()
        with precision.autocast(device):
            adversarial_loss = loss_fn(model(**inputs), labels) * scale
        scaler.scale(adversarial_loss).backward()
    adversary.restore()


# ---------------------------------------------------------------- the training loop

def train(args, model, tokenizer, datasets, label_set, toolkit, context, output_dir, logger, problem,
          resume_from=None):
    device, precision = args.device_obj, args.precision_obj
    loss_fn, adversary, ema, sample_weights = build_techniques(args, distributed.unwrap(model), datasets["train"],
                                                              len(label_set.names), problem)
    train_loader = build_train_loader(datasets["train"], args, context, sample_weights)
    val_loader = build_eval_loader(datasets["val"], args, context)
    write_model = modeldir.classifier_writer(distributed.unwrap(model), tokenizer, toolkit, args, label_set.id2label)
    optimizer, scheduler, scaler, total_steps = optimization.build_optimization(model, args, len(train_loader),
                                                                               device, precision)
    early_stopping = training.EarlyStopping(args.patience, args.min_delta, selection_mode(args.metric_for_best_model))
    nonfinite_guard = optimization.NonFiniteLossGuard(args.max_nonfinite_steps, device, not scaler.is_enabled())
    # ---- resume: model weights, optimizer, scheduler, scaler, RNG, position, early stopping
    global_step, start_epoch, skip_batches, evaluated_step, _ = checkpoints.resume_training(
        resume_from, distributed.unwrap(model), optimizer, scheduler, scaler, early_stopping, logger, ema=ema)
    training.log_training_start(logger, args, context, output_dir, total_steps,
                                {"examples": len(datasets["train"]), "validation": len(datasets["val"])})

    def run_evaluation(epoch):
        """Evaluate (with EMA weights when enabled); save checkpoint-best on improvement."""
        nonlocal evaluated_step
        evaluated_step = global_step  # the same weights are never scored twice
        with ema.average_parameters(distributed.unwrap(model)) if ema is not None else nullcontext():
            metrics, _, _ = evaluate(distributed.unwrap(model), val_loader, device, precision, context, label_set.names,
                                     problem)
            # the untuned model (step 0) is a reference only: its head is random
            improved = checkpoints.save_if_best(early_stopping, metrics[args.metric_for_best_model], global_step,
                                                output_dir, write_model, context.is_main, untuned_competes=False)
        logger.log(training.evaluation_row(global_step, epoch, metrics, early_stopping, improved,
                                           (*problem.logged_metrics, args.metric_for_best_model)))

    model.train()
    meter = training.TrainingMeter(device)  # loss and throughput for the log rows
    progress = tqdm(total=total_steps, initial=global_step, disable=not context.is_main, desc="train")
    if training.evaluation_due_at_start(resume_from, global_step, evaluated_step, total_steps, early_stopping):
        run_evaluation(start_epoch)  # the untuned model, or final weights whose evaluation a kill prevented
    for epoch in range(start_epoch, args.epochs):
        if global_step >= total_steps or early_stopping.should_stop:
            break
        train_loader.batch_sampler.set_epoch(epoch, skip_batches)
        batches_done, batches_in_epoch = skip_batches, len(train_loader.batch_sampler.all_batches())
        for batch in train_loader:
            batches_done += 1
            inputs, labels = modeldir.to_device(batch, device), batch["labels"].to(device)
            window_ends = batches_done % args.gradient_accumulation_steps == 0 or batches_done == batches_in_epoch
            # ---- forward under autocast, scaled backward (gradient sync only on the window's last pass)
            with distributed.sync_gradients(model, window_ends):
                with precision.autocast(device):
                    loss = compute_loss(model, inputs, labels, loss_fn, args.rdrop_alpha, problem.consistency)
                scaler.scale(loss / args.gradient_accumulation_steps).backward()
                if adversary is not None:
                    adversarial_backward(adversary, model, inputs, labels, loss_fn, args, scaler, precision, device)
            meter.add(loss, len(labels) * context.world_size)
            nonfinite_guard.add(loss)
            if not window_ends:
                continue
            # ---- optimizer step: skip non-finite losses (fp16 overflow is the scaler's job)
            if nonfinite_guard.skip_step(optimizer, global_step):
                meter.forget_loss()
                continue
            grad_norm, _ = optimization.optimizer_step(model, optimizer, scheduler, scaler, args.max_grad_norm)
            if ema is not None:
                ema.update(distributed.unwrap(model))
            global_step += 1
            progress.update(1)
            # ---- logging, evaluation, checkpoint
            if global_step % args.logging_steps == 0:
                logger.log(meter.row(global_step, epoch, scheduler.get_last_lr()[0], grad_norm), progress)
            epoch_ends = batches_done == batches_in_epoch
            if training.evaluation_due(global_step, args.eval_steps, epoch_ends, total_steps):
                run_evaluation(epoch)
            if args.save_strategy == "steps" and training.is_due(global_step, args.save_steps) and context.is_main:
                checkpoints.save_checkpoint(output_dir, write_model, checkpoints.training_state(
                    optimizer, scheduler, scaler, early_stopping, args, epoch=epoch, step_in_epoch=batches_done,
                    global_step=global_step, evaluated_step=evaluated_step,
                    ema=ema.state_dict() if ema is not None else None), args.save_total_limit)
            distributed.barrier(context)
            if global_step >= total_steps or early_stopping.should_stop:
                break
        skip_batches = 0
        if evaluated_step != global_step:
            run_evaluation(epoch)  # its last step was skipped (non-finite loss)
        if early_stopping.should_stop:
            logger.info(f"early stopping: no improvement in {args.patience} evaluations")
            break
    progress.close()
    nonfinite_guard.report(logger)
    return early_stopping


# ---------------------------------------------------------------- after training: test, calibration, reports

def finish(args, model_dir, datasets, splits, label_set, context, output_dir, logger, train_labels, results=None,
           tune=True):
    """Reload the best model, calibrate (or tune thresholds) on validation, evaluate val and test, write reports.

    ``tune``: fit the temperature or the multi-label thresholds on validation (not for --eval-only,
    which uses the model's stored ones)."""
    model, tokenizer, toolkit, _ = SequenceClassifier.from_directory(model_dir, args.device_obj)
    problem = problem_types.from_toolkit(toolkit)
    results = dict(results or {})
    val_metrics, val_logits, val_labels = evaluate(model, build_eval_loader(datasets["val"], args, context),
                                                   args.device_obj, args.precision_obj, context, label_set.names,
                                                   problem)
    results["validation"] = val_metrics
    if problem.name != "single_label":
        return finish_problem_type(args, model, model_dir, toolkit, problem, datasets, splits, label_set, context,
                                   output_dir, logger, train_labels, results, (val_logits, val_labels), tune)
    if args.calibrate and context.is_main:
        from common.calibration import calibration_report, format_calibration, write_reliability_diagram
        report = calibration_report(val_logits, val_labels)  # temperature 1.0 unless the fit can be trusted
        results["calibration"] = report
        toolkit["temperature"] = report["temperature"]
        checkpoints.rewrite_toolkit(model_dir, toolkit)
        write_reliability_diagram(output_dir / "reliability_diagram.png",
                                  torch.softmax(val_logits / report["temperature"], -1).numpy(), val_labels.numpy(),
                                  title="validation, after temperature scaling" if report["applied"] else "validation")
        logger.info(format_calibration(report))
    report_split = "test" if "test" in datasets else "validation"
    if "test" in datasets:
        results["test"], test_logits, test_labels = evaluate(
            model, build_eval_loader(datasets["test"], args, context), args.device_obj, args.precision_obj,
            context, label_set.names, problem)
    else:
        test_logits, test_labels = val_logits, val_labels
    if context.is_main:
        examples = splits["test" if "test" in datasets else "val"]
        if train_labels is not None:
            results["majority_baseline"] = majority_baseline(train_labels, test_labels.numpy(), len(label_set.names))
        fusion.report_baseline(args, model_dir, toolkit, results, report_split,
                               splits["train"] if train_labels is not None else None,  # None: --eval-only
                               (splits["val"], val_logits.numpy(), val_labels.numpy()),
                               (examples, test_logits.numpy(), test_labels.numpy()), label_set.names, logger.info)
        write_reports(output_dir, results, report_split, examples, test_logits, test_labels, label_set, args, logger)
    return results


def finish_problem_type(args, model, model_dir, toolkit, problem, datasets, splits, label_set, context, output_dir,
                        logger, train_labels, results, validation, tune):
    """``finish`` for multi-label and regression models: thresholds tuned on validation (multi-label),
    then validation and test at the stored settings, beside the fixed-0.5 decision and a constant baseline."""
    evaluated = {"validation": validation}
    if "test" in datasets:
        _, *evaluated["test"] = evaluate(model, build_eval_loader(datasets["test"], args, context), args.device_obj,
                                         args.precision_obj, context, label_set.names, problem)
    report_split = problem_types.final_results(problem, results, evaluated, label_set.names, train_labels, args,
                                               tune, logger.info)
    if tune and context.is_main:  # multi-label: the thresholds tuned on validation go with the model
        toolkit.update(problem.toolkit_settings())
        checkpoints.rewrite_toolkit(model_dir, toolkit)
    if context.is_main:
        examples = splits["test" if "test" in datasets else "val"]
        logits, labels = evaluated[report_split]
        if args.group_field:
            results[f"{report_split}_by_group"] = metrics_by_group(examples, logits, labels, label_set, problem)
        if "train" in splits and args.baseline != "none":
            from common.baselines import add_problem_baseline
            train_targets = [problem.target(e.label, len(label_set.names)) for e in splits["train"]]
            add_problem_baseline(results, report_split, problem, splits["train"], train_targets, examples,
                                 labels.numpy(), label_set.names, logger.info)
        problem_types.write_error_rows(output_dir / "errors.jsonl", problem.error_rows(
            examples, logits, labels, label_set.names))
        (output_dir / "metrics.json").write_text(json.dumps(results, indent=2, ensure_ascii=False), encoding="utf-8")
        write_curves(output_dir)
    return results


def finish_reranker(args, model_dir, splits, context, output_dir, logger, results=None, tune=True):
    """Reload the best reranker; ranking metrics on validation and test beside TF-IDF; with --retriever,
    the retriever's top --rerank-top reordered by the reranker, and by the reranker's score fused with the
    retriever's (its share tuned on validation and stored with the model when ``tune``, else the stored
    one), before and after; metrics.json."""
    results = dict(results or {})
    if not context.is_main:
        return results
    from common import inference
    reranker = inference.load_torch_model(model_dir, args.device_obj)
    scores = {}
    for split, name in (("val", "validation"), ("test", "test")):
        if split in splits:
            results[name], scores[split] = reranking.score_groups(reranker, splits[split], args.eval_batch_size)
    report_split, report_name = ("test", "test") if "test" in splits else ("val", "validation")
    pairs = splits[report_split]
    if args.baseline != "none":
        from common.baselines import format_comparison, retrieval_baseline
        results["baseline"] = retrieval_baseline([p.query for p in pairs], [p.document for p in pairs],
                                                 [p.rel for p in pairs], reranking.EVALUATION_KS)
        logger.info(f"{report_name} ranking of each query's listed documents:\n" + format_comparison(
            results[report_name], results["baseline"], ["ndcg@10", "mrr@10", "map@10", "recall@10"]))
    if args.retriever:
        retriever = inference.load_model(args.retriever, device=args.device_obj)
        weight = (reranker.toolkit.get("fusion") or {}).get("retriever_weight")
        if tune and "val" in splits:
            weight, results["fusion_tuning"] = tune_fusion(args, retriever, reranker, model_dir, splits["val"],
                                                           scores["val"], logger)
        report = reranking.retrieve_then_rerank(retriever, pairs, scores[report_split], args.rerank_top,
                                                args.eval_batch_size, retriever_weight=weight)
        report["split"] = report_name
        report["lowered_ndcg"] = reranking.report_rerank_change(report, logger.info)
        if "fusion_tuning" in results and report_name == "validation":
            report["fused_on_tuning_queries"] = True
            logger.info("(no --test-path: the fused figure is on the validation queries its share was tuned on)")
        results["retrieve_then_rerank"] = report
    (output_dir / "metrics.json").write_text(json.dumps(results, indent=2, ensure_ascii=False), encoding="utf-8")
    write_curves(output_dir)
    return results


def tune_fusion(args, retriever, reranker, model_dir, val_pairs, val_scores, logger):
    """The retriever's share in the fused score with the best validation NDCG@10, stored in the reranker's
    toolkit block ("fusion") so --eval-only with a --retriever reuses it. Returns (share, tuning table)."""
    candidates = reranking.retrieve(retriever, val_pairs, val_scores, args.eval_batch_size)
    weight, table = reranking.tune_fusion_weight(candidates, args.rerank_top)
    checkpoints.rewrite_toolkit(model_dir, dict(reranker.toolkit, fusion={"retriever_weight": weight,
                                                                          "rerank_top": args.rerank_top}))
    logger.info("validation NDCG@10 by the retriever's share of the fused score: " +
                ", ".join(f"{share:g}: {value:.4f}" for share, value in table.items()) + f"; stored {weight:g}")
    return weight, {"retriever_weight": weight, "validation_ndcg@10": {f"{share:g}": value
                                                                       for share, value in table.items()}}


def write_curves(output_dir):
    from common.plots import write_training_curves_png
    log_path = output_dir / training.RUN_LOG_FILE
    if log_path.is_file():
        write_training_curves_png(output_dir / "training_curves.png", training.read_run_log(log_path))


def write_reports(output_dir, results, split_name, examples, logits, labels, label_set, args, logger):
    """metrics.json, errors.jsonl, per-group metrics, report and plots for the final evaluation split."""
    probs = torch.softmax(logits, -1).numpy()
    predictions = probs.argmax(-1)
    metrics = results["test" if split_name == "test" else "validation"]
    logger.info(f"\n{split_name} classification report:\n" +
                format_report(labels.numpy(), predictions, label_set.names, metrics["confusion_matrix"]))
    if args.group_field:
        results[f"{split_name}_by_group"] = metrics_by_group(examples, logits, labels, label_set,
                                                             problem_types.SingleLabel())
    with open(output_dir / "errors.jsonl", "w", encoding="utf-8") as handle:
        for example, true_id, predicted, row in zip(examples, labels.tolist(), predictions, probs):
            if true_id != predicted:
                handle.write(json.dumps({
                    "where": example.locator, "text": example.text, "context": example.context,
                    "true_label": label_set.names[true_id], "predicted_label": label_set.names[predicted],
                    "probabilities": {name: round(float(p), 4) for name, p in zip(label_set.names, row)}},
                    ensure_ascii=False) + "\n")
    (output_dir / "metrics.json").write_text(json.dumps(results, indent=2, ensure_ascii=False), encoding="utf-8")
    from common.plots import most_confused_pairs, write_confusion_matrix_png
    write_confusion_matrix_png(output_dir / "confusion_matrix.png", metrics["confusion_matrix"], label_set.names)
    pairs = most_confused_pairs(metrics["confusion_matrix"], label_set.names)
    if pairs:
        logger.info("most confused (true -> predicted: count): " +
                    "; ".join(f"{t} -> {p}: {c}" for t, p, c in pairs))
    write_curves(output_dir)


def metrics_by_group(examples, logits, labels, label_set, problem):
    """The problem type's headline metrics per --group-field value."""
    groups = {}
    for index, example in enumerate(examples):
        groups.setdefault(example.group, []).append(index)
    return {group: {key: value for key, value in problem.evaluation_metrics(
                logits[indices], labels[indices], label_set.names).items()
                if key in (*problem.headline_metrics, "num_examples")}
            for group, indices in sorted(groups.items(), key=lambda item: str(item[0]))}


# ---------------------------------------------------------------- logging

def describe_evaluation(row):
    if "eval_accuracy" in row:
        return (f"step {row['step']}: eval loss {row['eval_loss']:.4f}, accuracy {row['eval_accuracy']:.4f}, "
                f"macro-F1 {row['eval_macro_f1']:.4f}")
    shown = [f"{key[len('eval_'):]} {value:.4f}" for key, value in row.items()
             if key.startswith("eval_") and isinstance(value, float)]
    return f"step {row['step']}: eval " + ", ".join(shown)


def start_wandb(args, is_main):
    if not args.wandb or not is_main:
        return None
    try:
        import wandb
    except ImportError:
        print("--wandb: the wandb package is not installed (pip install wandb); continuing without it",
              file=sys.stderr)
        return None
    return wandb.init(project=args.wandb_project, config=vars(args))


# ---------------------------------------------------------------- main

def run_eval_only(args, context):
    """--eval-only: evaluate a saved model on --test-path with its stored preprocessing."""
    output_dir = rundir.prepare_results_dir(args.output_dir, "--output-dir", args.overwrite_output_dir)
    model, tokenizer, toolkit, config = SequenceClassifier.from_directory(args.model_path)
    label_names = [config.id2label[index] for index in range(len(config.id2label))]
    args.data_path, args.val_path = None, None
    problem_types.resolve_problem_type(args, toolkit.get("problem_type") or "single_label")
    if args.problem_type == "rerank":
        return run_rerank_eval_only(args, context, output_dir)
    problem = problem_types.from_toolkit(toolkit)  # with its stored thresholds or target scaling
    splits, label_set = load_splits(args, problem, label_names)
    preprocessing = toolkit["preprocessing"]
    args.max_length, args.truncation_side = preprocessing["max_length"], preprocessing["truncation_side"]
    args.pad_token_id = tokenizer.pad_token_id
    normalize, test_split = build_normalizer(preprocessing.get("normalize")), {"test": splits["test"]}
    datasets, summaries = encode_splits(test_split, data.normalize_texts(test_split, normalize), tokenizer, args,
                                        normalize, label_set, problem)
    print(data.format_summary(summaries))
    datasets["val"], splits["val"] = datasets["test"], splits["test"]
    args.calibrate = False
    results = finish(args, args.model_path, datasets, splits, label_set, context, output_dir,
                     training.RunLogger(output_dir, context.is_main, describe_evaluation), None, tune=False)
    print(json.dumps({key: results["test"][key] for key in problem.headline_metrics} |
                     fusion.fused_headline(results)))
    return 0


def run_rerank_eval_only(args, context, output_dir):
    """--eval-only for a reranker: ranking metrics on --test-path (and retrieve-then-rerank with --retriever)."""
    if args.retriever:
        check_retriever(args.retriever)
    splits, _ = load_rerank_splits(args)
    results = finish_reranker(args, args.model_path, splits, context, output_dir,
                              training.RunLogger(output_dir, context.is_main, describe_evaluation), tune=False)
    print(json.dumps({key: results["test"][key] for key in reranking.Rerank.headline_metrics}))
    return 0


@report_user_errors
def main(argv=None):
    args = parse_args(argv)
    return training.run_in_context(args, run_eval_only if args.eval_only else run_training)


def run_training(args, context):
    # ---- validate everything cheap before loading the model or tokenizing
    run_dir, resume_from = training.claim_run_dir(args, context, "train_classifier.py")
    output_dir = run_dir.path
    checkpoints.check_resume(resume_from, args)
    problem = problem_types.from_args(args)
    rerank = problem.name == "rerank"
    normalize_spec = None
    if args.normalize:
        from common.text import describe, normalizer_spec
        normalize_spec = normalizer_spec(args.normalize)
        print(f"text normalization: {describe(normalize_spec)} (stored with the model, applied at inference)")
    normalize = build_normalizer(normalize_spec)
    # texts --normalize empties are refused here, before the model loads
    splits, label_set = load_rerank_splits(args, normalize) if rerank else load_splits(args, problem)
    normalized = None if rerank else data.normalize_texts(splits, normalize)
    if rerank and args.retriever:
        check_retriever(args.retriever)
    modeldir.check_max_lengths(args.model_name, args, args.trust_remote_code)
    tokenizer = modeldir.load_tokenizer(args.model_name, args.trust_remote_code)
    if rerank:
        training_texts = (normalize(text) for pair in splits["train"] for text in (pair.query, pair.document))
    else:
        training_texts = (text for (text,) in normalized["train"])  # normalized above
    domain_texts = adaptation.prepare_domain(args, tokenizer, training_texts, normalize)
    args.pad_token_id = tokenizer.pad_token_id
    if rerank:
        datasets, summaries = encode_rerank_splits(splits, tokenizer, args, normalize)
    else:
        datasets, summaries = encode_splits(splits, normalized, tokenizer, args, normalize, label_set, problem)
    problem.fit_training_data(splits["train"], args)  # regression: --standardize-targets' mean and std
    if context.is_main:
        print("dataset summary:\n" + "\n".join(summaries) if rerank else data.format_summary(summaries))

    # ---- model
    record_format = getattr(splits["train"], "record_format", "text")  # a reranker's is query_document
    model = build_model(args, problem.num_outputs(label_set), tokenizer, domain_texts).to(args.device_obj)
    if context.is_main:  # data and model are checked: only now may an earlier run's outputs go
        run_dir.begin()
        write_effective_config(args, output_dir)
        (output_dir / "dataset_summary.json").write_text(json.dumps(summaries, indent=2, ensure_ascii=False),
                                                          encoding="utf-8")
    toolkit = build_toolkit_block(args, model, normalize_spec, record_format, problem)
    adaptation.adapt_before_training(model.backbone, tokenizer, domain_texts, args, resume_from, context.is_main)
    if args.compile:
        model = torch.compile(model)
    if context.enabled:
        model = DistributedDataParallel(model, device_ids=[args.device_obj.index]
                                        if args.device_obj.type == "cuda" else None)
    logger = training.RunLogger(output_dir, context.is_main, describe_evaluation,
                                start_wandb(args, context.is_main))
    logger.info(f"model: {args.model_name}, {modeldir.describe_parameters(model)}")

    early_stopping = train(args, model, tokenizer, datasets, label_set, toolkit, context, output_dir, logger,
                           problem, resume_from)
    distributed.barrier(context)
    best_dir = output_dir / "checkpoint-best"
    if not best_dir.is_dir():
        raise UserError("training ended before any evaluation: no checkpoint-best was written")
    untuned_row = logger.untuned_row()
    untuned = {"validation": untuned_row, "beaten": training.compare_with_untuned(
        early_stopping, untuned_row, args.metric_for_best_model, logger)}
    if rerank:
        results = finish_reranker(args, best_dir, splits, context, output_dir, logger, {"untuned": untuned})
    else:
        train_labels = np.array([f["labels"] for f in datasets["train"].features])
        results = finish(args, best_dir, datasets, splits, label_set, context, output_dir, logger, train_labels,
                         {"untuned": untuned})
    if context.is_main:
        headline = results.get("test", results["validation"])
        best_value = results["validation"].get(args.metric_for_best_model, early_stopping.best_metric)
        logger.info(f"best model: {best_dir} ({args.metric_for_best_model} on validation {best_value:.4f}); "
                    "final " + ", ".join(f"{name} {headline[name]:.4f}" for name in problem.headline_metrics))
        card = model_card.write_model_card(best_dir, "train_classifier.py", args, results, problem.headline_metrics)
        logger.info(f"model card: {card}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
