"""Fine-tune a BERT-family encoder to classify long documents: sliding windows, document-level loss.

Example:
    python train_longdoc.py --data-path data/news/train.jsonl --val-path data/news/val.jsonl \
        --output-dir output/longdoc --model-name bert-base-chinese --max-length 512 --stride 128 \
        --aggregation mean --batch-size 4 --chunk-batch-size 16 --epochs 3

Reads {"text", "label"} records (plus an optional "id") from JSON, JSONL, CSV or TSV. Each document
is cut into overlapping token windows (common/longdoc.py); a batch's chunks run through the model in
micro-batches of --chunk-batch-size, their logits are aggregated per document (mean, max or
logsumexp) and the cross-entropy on the document logits is backpropagated. Memory stays bounded by
--chunk-batch-size however long a document is: when a batch has more chunks than one micro-batch,
a no-grad pass collects every chunk's logits (n_chunks x K), the document loss gives the gradient
with respect to them, and a second pass re-runs each micro-batch with gradients (same dropout
masks: the RNG state is replayed) and backpropagates that gradient slice. Writes
output/checkpoint-best (a model directory that infer.py reads), metrics.json (document level,
all three aggregations side by side), errors.jsonl and train_log.jsonl. Runs unchanged under torchrun.
"""
import argparse
import json

from common.choices import AGGREGATIONS, CHUNK_SELECTIONS, POOLINGS
from common.cli import (ArgumentParser, add_baseline_fusion_arg, add_checkpoint_args, add_data_path_args,
                        add_data_text_args, add_flag, add_optimization_args, add_problem_type_args, add_runtime_args,
                        add_vocabulary_args, apply_option_ranges, check_baseline_fusion, exit_on_help,
                        parse_with_config, resolve_default_warmup, write_effective_config)
from common.errors import UserError, report_user_errors
from common.metrics import ALL_SELECTABLE_METRICS, format_report, majority_baseline, selection_mode

SECTION_ALIASES = {
    ("model", "name"): "model_name", ("training", "fp16"): "fp16", ("scheduler", "type"): "scheduler",
    ("scheduler", "num_warmup_steps"): "warmup_steps", ("logging", "steps"): "logging_steps",
    ("early_stopping", "metric"): "metric_for_best_model", ("output", "dir"): "output_dir",
}
CONFIG_CONVERTERS = {"fp16": lambda enabled: ("precision", "fp16") if enabled else (None, None)}
VALIDATION_SPLITS = ("validation", "val", "dev")


# ---------------------------------------------------------------- arguments

def build_parser():
    parser = ArgumentParser(description=__doc__.split("\n\n")[0],
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    group = add_data_path_args(parser, what="documents")
    add_flag(group, "val-ratio", type=float, default=0.1, help="validation share when --val-path is absent")
    add_data_text_args(parser)
    add_vocabulary_args(parser)

    group = parser.add_argument_group("model")
    add_flag(group, "model-name", default="bert-base-chinese", help="hub name or local path of the encoder")
    add_flag(group, "num-labels", type=int, help="expected number of labels (checked against the data)")
    add_flag(group, "max-length", type=int, default=512, help="tokens per chunk, [CLS]/[SEP] included")
    add_flag(group, "pooling", choices=POOLINGS, default="cls", help="how token states become one vector")
    add_flag(group, "dropout", type=float, default=0.1, help="dropout before the classification layer")
    add_flag(group, "head-layernorm", action="store_true", help="LayerNorm before the classification layer")
    add_flag(group, "freeze-backbone", action="store_true", help="train only the head (frozen feature extractor)")
    add_problem_type_args(parser)

    group = parser.add_argument_group("long documents")
    add_flag(group, "stride", type=int, default=128, help="tokens shared by consecutive windows (guide: 128-192)")
    add_flag(group, "max-chunks", type=int, default=0,
             help="keep at most this many windows per document (0: all); 1 is plain head truncation")
    add_flag(group, "chunk-selection", choices=CHUNK_SELECTIONS, default="spread",
             help="which windows --max-chunks keeps: evenly spread over the document, head and tail, or head")
    add_flag(group, "aggregation", choices=AGGREGATIONS, default="mean",
             help="how chunk logits become document logits (training loss and prediction)")
    add_flag(group, "chunk-batch-size", type=int, default=16,
             help="chunks per forward pass: bounds memory however long a document is")
    add_flag(group, "strip-patterns", default=None, metavar="FILE",
             help="file of regular expressions (one per line) deleted from every text before chunking; "
                  "stored with the model and applied again at inference")

    add_optimization_args(parser, epochs=3, batch_size=4, eval_batch_size=32)

    group = add_checkpoint_args(parser, output_dir="./output/longdoc")
    add_flag(group, "metric-for-best-model", default=None, choices=ALL_SELECTABLE_METRICS,
             help="document-level validation metric that picks the best model (default: macro_f1; multi_label: "
                  "micro_f1; regression: rmse)")
    add_flag(group, "save-strategy", choices=["steps", "no"], default="steps", help="'no' skips step checkpoints")
    add_flag(group, "eval-only", action="store_true", help="evaluate --model-path on --test-path, no training")
    add_flag(group, "model-path", help="model directory for --eval-only")
    add_baseline_fusion_arg(group)
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
        raise UserError("--data-path is required (training documents file)")
    checkpoints.check_resume_argument(args.resume)
    if not args.eval_only:
        problem_types.resolve_problem_type(args)
        check_baseline_fusion(args)
    args.strip_pattern_list, args.strip_pattern_names = (longdoc.load_strip_patterns(args.strip_patterns)
                                                         if args.strip_patterns else ([], []))
    longdoc.check_settings(build_settings(args), args.max_length)
    return args


def build_settings(args):
    return longdoc.LongdocSettings(args.stride, args.max_chunks, args.chunk_selection, args.aggregation,
                                   list(args.strip_pattern_list))


# --help answers before the imports below: they load torch, which takes seconds (common/cli.py)
if __name__ == "__main__":
    exit_on_help(build_parser)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from common import (adaptation, checkpoints, data, distributed, fusion, longdoc, model_card,  # noqa: E402
                    modeldir, optimization, problem_types, rundir, training)
from common.heads import SequenceClassifier  # noqa: E402


# ---------------------------------------------------------------- data

def load_documents(path, args, problem, split=None, default_splits=("train",)):
    """Documents of one file with the classifier's parsing and errors, keeping an optional "id"."""
    records = data.read_records(path, split=split, skip_invalid=args.skip_invalid, default_splits=default_splits)
    record_format = data.detect_format(records[0], args.text_field)

    def parse(record):
        example = data.parse_labelled_example(record, record_format, args.text_field, args.label_field,
                                              parse_label=problem.parse_label)
        example.doc_id = record.fields.get("id")
        return example
    documents = data.parse_each(records, parse, args.skip_invalid)
    if not documents:
        raise UserError(f"{path}: no valid records")
    return documents


def load_splits(args, problem, label_names=None):
    """Read and validate every split before anything expensive; returns (splits, label_set)."""
    label_field = args.label_field or "label"
    train_documents = load_documents(args.data_path, args, problem, args.data_split) if args.data_path else []
    label_set = data.LabelSet(label_names) if label_names else problem.build_label_set(
        train_documents, args.labels, label_field)
    if args.num_labels and args.num_labels != len(label_set.names):
        raise UserError(f"--num-labels {args.num_labels} but the labels are {label_set.names}")
    splits = {"train": problem.resolve(label_set, train_documents, args.skip_invalid, label_field)}
    if args.val_path:
        splits["val"] = problem.resolve(label_set, load_documents(args.val_path, args, problem,
                                                                  default_splits=VALIDATION_SPLITS),
                                        args.skip_invalid, label_field)
    if args.test_path:
        splits["test"] = problem.resolve(label_set, load_documents(args.test_path, args, problem,
                                                                   default_splits=("test",)),
                                         args.skip_invalid, label_field)
    data.report_skipped(*splits.values())
    if not args.val_path and splits["train"]:
        splits["train"], splits["val"] = problem.split_validation(splits["train"], args.val_ratio, args.seed, label_set)
    if splits["train"]:
        problem.check_coverage(splits["train"], splits["val"], label_set)
    return splits, label_set


def clean_documents(splits, clean):
    """{split: cleaned texts}. A document that the strip patterns or the normalization empty would be read
    as a bare [CLS] [SEP] chunk and trained (or scored) under its label, with nothing said: refused, as is
    one a strip pattern cannot process in its time, in one line naming it (common.data.clean_texts)."""
    cleaned = data.clean_texts(splits, clean, "the strip patterns and normalization",
                               "loosen --strip-patterns or --normalize, or drop these documents", unit="documents")
    return {name: [texts[0] for texts in split] for name, split in cleaned.items()}


def chunk_splits(splits, cleaned, tokenizer, args, settings, label_set, problem):
    """Chunk every split's cleaned texts once; returns ({split: DocumentDataset}, summaries)."""
    datasets, summaries = {}, []
    for name, documents in splits.items():
        stats = longdoc.ChunkingStats()
        texts = cleaned[name]
        targets = [problem.target(d.label, len(label_set.names)) for d in documents]
        chunked = longdoc.chunk_documents(tokenizer, texts, targets, args.max_length, settings, stats)
        datasets[name] = longdoc.DocumentDataset(chunked)
        summaries.append(summarize_split(name, documents, label_set, stats, args, settings, problem))
    return datasets, summaries


def summarize_split(name, documents, label_set, stats, args, settings, problem):
    labels = problem.summarize_labels(documents, label_set)  # classes, plus a problem type's own
    labels["classes"] = {label: entry["count"] for label, entry in labels.get("classes", {}).items()}
    total_tokens = sum(stats.content_tokens) or 1
    return {"split": name, "documents": len(documents), **labels,
            "content_tokens": data.length_percentiles(stats.content_tokens),
            "chunks_per_document": data.length_percentiles(stats.chunks_per_document),
            "chunks": int(sum(stats.chunks_per_document)), "capped_documents": stats.capped,
            "max_length": args.max_length, "stride": settings.stride, "max_chunks": settings.max_chunks,
            "unk_rate": round(stats.unknown_tokens / total_tokens, 4)}


def format_summary(summaries):
    lines = ["dataset summary (tokens exclude [CLS]/[SEP]):"]
    for s in summaries:
        tokens, chunks = s["content_tokens"], s["chunks_per_document"]
        cap = (f"; {s['capped_documents']} document(s) capped at --max-chunks {s['max_chunks']}"
               if s["max_chunks"] else "")
        lines.append(f"  {s['split']}: {s['documents']} documents, {s['chunks']} chunks "
                     f"(max_length {s['max_length']}, stride {s['stride']}); tokens read per document "
                     f"p50={tokens['p50']} p90={tokens['p90']} max={tokens['max']}; chunks/document p50={chunks['p50']} "
                     f"p90={chunks['p90']} max={chunks['max']}{cap}; [UNK] rate {s['unk_rate']:.2%}")
        if s["classes"]:
            lines.append("      " + ", ".join(f"{label}: {count}" for label, count in s["classes"].items()))
        if "labels_per_example" in s:
            lines.append("      labels per document: " + ", ".join(f"{key}: {value}" for key, value in
                                                                  s["labels_per_example"].items()))
        if s.get("scores"):
            lines.append("      scores: " + ", ".join(f"{key} {value:g}" for key, value in s["scores"].items()))
    return "\n".join(lines)


def build_train_loader(dataset, args, context):
    sampler = data.LengthGroupedBatchSampler(dataset.lengths, args.batch_size, shuffle=True, seed=args.seed,
                                             group_by_length=args.group_by_length, rank=context.rank,
                                             world_size=context.world_size)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=longdoc.DocumentCollator(),
                                       num_workers=args.num_workers, generator=data.private_generator(args.seed))


# ---------------------------------------------------------------- model and saving

def build_model(args, num_labels, tokenizer, domain_texts=()):
    return SequenceClassifier.from_pretrained_encoder(args, num_labels, tokenizer, domain_texts)


def build_toolkit_block(args, model, normalize_spec, settings, problem):
    """Everything inference needs: chunking, stripping, normalization, aggregation and the problem type."""
    return {"task": "longdoc", "head": model.head_settings, "temperature": 1.0, **problem.toolkit_settings(),
            "preprocessing": {"max_length": args.max_length, "truncation_side": args.truncation_side,
                              "normalize": normalize_spec, "record_format": "text"},
            "longdoc": settings.to_dict()}


# ---------------------------------------------------------------- document loss, bounded memory

def rng_state(device):
    """The generators dropout draws from on ``device`` (CPU, plus the CUDA one on GPU)."""
    return (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def set_rng_state(state, device):
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def document_loss_backward(model, chunks, doc_index, labels, args, scaler, precision, device, sync=True,
                           loss_fn=None):
    """The loss (``loss_fn``, cross-entropy by default) of the aggregated document logits, backpropagated;
    returns the loss (detached).

    One micro-batch: an ordinary forward and backward. More: (1) a no-grad pass collects every
    chunk's logits, saving the RNG state before each micro-batch; (2) the document loss on
    those logits gives d(loss)/d(chunk logits), a small (n_chunks, K) tensor; (3) each
    micro-batch is re-run with gradients under its saved RNG state (identical dropout masks)
    and ``logits.backward(gradient slice)`` accumulates its share. This is exact for every
    aggregation, and activations never exceed one micro-batch. With DDP, gradients are
    synchronised only on the last backward, and only when ``sync``.
    """
    scale = 1.0 / args.gradient_accumulation_steps
    batches = list(longdoc.chunk_micro_batches(chunks, args.chunk_batch_size, args.pad_token_id))
    doc_index, labels = doc_index.to(device), labels.to(device)
    if len(batches) == 1:
        with distributed.sync_gradients(model, sync):
            with precision.autocast(device):
                chunk_logits = model(**modeldir.to_device(batches[0][1], device))
            loss = document_loss(chunk_logits.float(), doc_index, labels, args.aggregation, loss_fn)
            scaler.scale(loss * scale).backward()
        return loss.detach()
    # ---- pass 1: chunk logits without activations kept
    states, collected = [], []
    with torch.no_grad():
        for _, batch in batches:
            states.append(rng_state(device))
            with precision.autocast(device):
                collected.append(model(**modeldir.to_device(batch, device)).float())
    end_state = rng_state(device)
    chunk_logits = torch.cat(collected).requires_grad_()  # (n_chunks, K)
    loss = document_loss(chunk_logits, doc_index, labels, args.aggregation, loss_fn)
    (gradient,) = torch.autograd.grad(scaler.scale(loss * scale), chunk_logits)
    # ---- pass 2: each micro-batch again with gradients, under the same dropout masks
    recomputed_finite = torch.ones((), dtype=torch.bool, device=device)
    for position, ((start, batch), state) in enumerate(zip(batches, states)):
        last = position == len(batches) - 1
        set_rng_state(state, device)
        with distributed.sync_gradients(model, sync and last):
            with precision.autocast(device):
                logits = model(**modeldir.to_device(batch, device))
            recomputed_finite &= torch.isfinite(logits).all()
            logits.backward(gradient[start:start + len(logits)].to(logits.dtype))
    set_rng_state(end_state, device)  # the RNG continues as after one pass over the chunks
    # The caller skips a step by its loss; a recompute that went non-finite (its gradients are then
    # non-finite) must show in the loss too. No host sync: torch.where stays on the device.
    return torch.where(recomputed_finite, loss.detach(), torch.full_like(loss, float("nan")))


def document_loss(chunk_logits, doc_index, labels, aggregation, loss_fn=None):
    doc_logits = longdoc.aggregate_logits(chunk_logits, doc_index, len(labels), aggregation)
    return (loss_fn or torch.nn.functional.cross_entropy)(doc_logits, labels)


# ---------------------------------------------------------------- evaluation

@torch.no_grad()
def predict_chunk_logits(model, documents, batch_size, device, precision, pad_token_id):
    """(chunk logits (n_chunks, K), doc index of each chunk) for a list of chunked documents.

    Chunks run longest first (less padding) and come back in document order.
    """
    was_training = model.training
    model.eval()
    chunks = [chunk for chunks in documents for chunk in chunks]
    doc_index = torch.tensor([row for row, chunks in enumerate(documents) for _ in chunks], dtype=torch.long)
    order = sorted(range(len(chunks)), key=lambda i: -len(chunks[i]["input_ids"]))
    logits = [torch.zeros((0, distributed.unwrap(model).head_settings["num_labels"]))]  # a rank may get no documents
    batches = longdoc.chunk_micro_batches([chunks[i] for i in order], batch_size, pad_token_id)
    for _, batch in tqdm(batches, desc="evaluate", total=-(-len(chunks) // batch_size), leave=False, disable=None):
        with precision.autocast(device):
            logits.append(model(**modeldir.to_device(batch, device)).float().cpu())
    model.train(was_training)
    restored = torch.empty((len(chunks), logits[0].shape[-1]))
    restored[torch.tensor(order)] = torch.cat(logits)
    return restored, doc_index


def evaluate(model, dataset, args, context, label_names, problem):
    """Document-level metrics (headline: --aggregation) with all aggregations side by side.

    Returns (metrics, {aggregation: doc logits}, labels) with documents in dataset order.
    """
    shard = data.shard_indices(len(dataset), context.rank, context.world_size)
    chunk_logits, doc_index = predict_chunk_logits(model, [dataset[i] for i in shard], args.eval_batch_size,
                                                   args.device_obj, args.precision_obj, args.pad_token_id)
    local = {"doc_ids": torch.tensor(shard, dtype=torch.long), "chunk_logits": chunk_logits,
             "doc_index": doc_index, "labels": torch.tensor([dataset[i][0]["labels"] for i in shard])}
    shards = distributed.gather_objects(context, local)
    doc_ids = torch.cat([s["doc_ids"] for s in shards])
    labels = torch.cat([s["labels"] for s in shards])
    offsets = np.cumsum([0] + [len(s["doc_ids"]) for s in shards[:-1]])
    chunk_logits = torch.cat([s["chunk_logits"] for s in shards])
    doc_index = torch.cat([s["doc_index"] + int(offset) for s, offset in zip(shards, offsets)])
    order = torch.argsort(doc_ids)
    labels = labels[order]
    by_aggregation, doc_logits = {}, {}
    for method in longdoc.AGGREGATIONS:
        doc_logits[method] = longdoc.aggregate_logits(chunk_logits, doc_index, len(doc_ids), method)[order]
        by_aggregation[method] = problem.evaluation_metrics(doc_logits[method], labels, label_names)
    metrics = dict(by_aggregation[args.aggregation])
    metrics["aggregation"] = args.aggregation
    metrics["by_aggregation"] = {method: {key: m[key] for key in problem.headline_metrics}
                                 for method, m in by_aggregation.items()}
    chunk_labels = torch.cat([s["labels"][s["doc_index"]] for s in shards])
    chunk_metrics = problem.evaluation_metrics(chunk_logits, chunk_labels, label_names)
    metrics["chunk_level_diagnostic"] = {
        "note": "every chunk scored against its document's label; a diagnostic, not the headline",
        "num_chunks": len(chunk_labels), **{key: chunk_metrics[key] for key in problem.logged_metrics[1:]}}
    return metrics, doc_logits, labels


# ---------------------------------------------------------------- the training loop

def train(args, model, tokenizer, datasets, label_set, toolkit, context, output_dir, logger, problem,
          resume_from=None):
    device, precision = args.device_obj, args.precision_obj
    train_targets = np.array([dataset_item[0]["labels"] for dataset_item in datasets["train"]])
    loss_fn = problem.build_training_loss(args, train_targets, len(label_set.names))
    train_loader = build_train_loader(datasets["train"], args, context)
    write_model = modeldir.classifier_writer(distributed.unwrap(model), tokenizer, toolkit, args, label_set.id2label)
    optimizer, scheduler, scaler, total_steps = optimization.build_optimization(model, args, len(train_loader),
                                                                               device, precision)
    early_stopping = training.EarlyStopping(args.patience, args.min_delta, selection_mode(args.metric_for_best_model))
    nonfinite_guard = optimization.NonFiniteLossGuard(args.max_nonfinite_steps, device, not scaler.is_enabled())
    # ---- resume: model weights, optimizer, scheduler, scaler, RNG, position, early stopping
    global_step, start_epoch, skip_batches, evaluated_step, _ = checkpoints.resume_training(
        resume_from, distributed.unwrap(model), optimizer, scheduler, scaler, early_stopping, logger)
    chunks = (f"chunks: {sum(datasets['train'].lengths)} (max_length {args.max_length}, stride {args.stride})  "
              f"chunk batch size: {args.chunk_batch_size}")
    training.log_training_start(logger, args, context, output_dir, total_steps,
                                {"documents": len(datasets["train"]), "validation": len(datasets["val"])},
                                [chunks], batch_unit=" documents", settings={"aggregation": args.aggregation})

    def run_evaluation(epoch):
        """Evaluate on validation documents; save checkpoint-best on improvement."""
        nonlocal evaluated_step
        evaluated_step = global_step  # the same weights are never scored twice
        metrics, _, _ = evaluate(distributed.unwrap(model), datasets["val"], args, context, label_set.names, problem)
        # the untuned model (step 0) is a reference only: its head is random
        improved = checkpoints.save_if_best(early_stopping, metrics[args.metric_for_best_model], global_step,
                                            output_dir, write_model, context.is_main, untuned_competes=False)
        logger.log(training.evaluation_row(global_step, epoch, metrics, early_stopping, improved,
                                           (*problem.logged_metrics, args.metric_for_best_model, "by_aggregation")))

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
            window_ends = batches_done % args.gradient_accumulation_steps == 0 or batches_done == batches_in_epoch
            # ---- chunk forward passes under autocast, document loss, scaled backward
            loss = document_loss_backward(model, batch["chunks"], batch["doc_index"], batch["labels"], args, scaler,
                                          precision, device, sync=window_ends, loss_fn=loss_fn)
            meter.add(loss, len(batch["labels"]) * context.world_size)
            nonfinite_guard.add(loss)
            if not window_ends:
                continue
            # ---- optimizer step: skip non-finite losses (fp16 overflow is the scaler's job)
            if nonfinite_guard.skip_step(optimizer, global_step):
                meter.forget_loss()
                continue
            grad_norm, _ = optimization.optimizer_step(model, optimizer, scheduler, scaler, args.max_grad_norm)
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
                    global_step=global_step, evaluated_step=evaluated_step), args.save_total_limit)
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


# ---------------------------------------------------------------- after training: test and reports

def finish(args, model_dir, datasets, splits, label_set, context, output_dir, logger, train_labels, results=None,
           tune=True):
    """Reload the best model, evaluate validation and test at document level, write reports.

    Multi-label models first get thresholds tuned on validation (``tune``; not for --eval-only)."""
    model, _, toolkit, _ = SequenceClassifier.from_directory(model_dir, args.device_obj)
    problem = problem_types.from_toolkit(toolkit)
    results = dict(results or {})
    results["validation"], val_logits, val_labels = evaluate(model, datasets["val"], args, context, label_set.names,
                                                             problem)
    split_name, logits, labels = "validation", val_logits, val_labels
    if "test" in datasets:
        results["test"], logits, labels = evaluate(model, datasets["test"], args, context, label_set.names, problem)
        split_name = "test"
    if problem.name != "single_label":
        evaluated = {"validation": (val_logits[args.aggregation], val_labels)}
        if "test" in datasets:
            evaluated["test"] = (logits[args.aggregation], labels)
        problem_types.final_results(problem, results, evaluated, label_set.names, train_labels, args, tune,
                                    logger.info)
        if tune and context.is_main:
            toolkit.update(problem.toolkit_settings())
            checkpoints.rewrite_toolkit(model_dir, toolkit)
        if context.is_main:
            if train_labels is not None and args.baseline != "none":  # whole documents, as for single-label
                from common.baselines import add_problem_baseline
                add_problem_baseline(results, split_name, problem, splits["train"], train_labels,
                                     splits["test" if "test" in datasets else "val"], labels.numpy(), label_set.names,
                                     logger.info)
            problem_types.write_error_rows(output_dir / "errors.jsonl", problem.error_rows(
                splits["test" if "test" in datasets else "val"], logits[args.aggregation], labels, label_set.names))
            (output_dir / "metrics.json").write_text(json.dumps(results, indent=2, ensure_ascii=False),
                                                     encoding="utf-8")
        return results
    if context.is_main:
        if train_labels is not None:
            results["majority_baseline"] = majority_baseline(train_labels, labels.numpy(), len(label_set.names))
        # the baseline reads whole documents; the model reads windows
        fusion.report_baseline(args, model_dir, toolkit, results, split_name,
                               splits["train"] if train_labels is not None else None,  # None: --eval-only
                               (splits["val"], val_logits[args.aggregation].numpy(), val_labels.numpy()),
                               (splits["test" if "test" in datasets else "val"], logits[args.aggregation].numpy(),
                                labels.numpy()), label_set.names, logger.info)
        write_reports(output_dir, results, split_name, splits["test" if "test" in datasets else "val"],
                      logits[args.aggregation], labels, label_set, args, logger)
    return results


def write_reports(output_dir, results, split_name, documents, doc_logits, labels, label_set, args, logger):
    """metrics.json, errors.jsonl and the printed report for the final evaluation split."""
    metrics = results[split_name]
    probs = torch.softmax(doc_logits, -1).numpy()
    predictions = probs.argmax(-1)
    logger.info(f"\n{split_name} document-level report ({args.aggregation} aggregation):\n" +
                format_report(labels.numpy(), predictions, label_set.names, metrics["confusion_matrix"]))
    logger.info("aggregations side by side (document level): " + "; ".join(
        f"{method}: accuracy {m['accuracy']:.4f}, macro-F1 {m['macro_f1']:.4f}"
        for method, m in metrics["by_aggregation"].items()))
    chunk = metrics["chunk_level_diagnostic"]
    logger.info(f"chunk-level diagnostic (not the headline): {chunk['num_chunks']} chunks, accuracy "
                f"{chunk['accuracy']:.4f}, macro-F1 {chunk['macro_f1']:.4f}")
    with open(output_dir / "errors.jsonl", "w", encoding="utf-8") as handle:
        for document, true_id, predicted, row in zip(documents, labels.tolist(), predictions, probs):
            if true_id != predicted:
                handle.write(json.dumps({
                    "where": document.locator, "id": getattr(document, "doc_id", None),
                    "text_start": document.text[:200], "true_label": label_set.names[true_id],
                    "predicted_label": label_set.names[predicted],
                    "probabilities": {name: round(float(p), 4) for name, p in zip(label_set.names, row)}},
                    ensure_ascii=False) + "\n")
    (output_dir / "metrics.json").write_text(json.dumps(results, indent=2, ensure_ascii=False), encoding="utf-8")


# ---------------------------------------------------------------- logging

def describe_evaluation(row):
    if "eval_accuracy" in row:
        return (f"step {row['step']}: eval loss {row['eval_loss']:.4f}, document accuracy "
                f"{row['eval_accuracy']:.4f}, macro-F1 {row['eval_macro_f1']:.4f}")
    shown = [f"{key[len('eval_'):]} {value:.4f}" for key, value in row.items()
             if key.startswith("eval_") and isinstance(value, float)]
    return f"step {row['step']}: document-level eval " + ", ".join(shown)


# ---------------------------------------------------------------- main

def normalizer_spec_of(args):
    if not args.normalize:
        return None
    from common.text import normalizer_spec
    return normalizer_spec(args.normalize)


def run_eval_only(args, context):
    """--eval-only: evaluate a saved model on --test-path with its stored chunking and aggregation."""
    output_dir = rundir.prepare_results_dir(args.output_dir, "--output-dir", args.overwrite_output_dir)
    model, tokenizer, toolkit, config = SequenceClassifier.from_directory(args.model_path, args.device_obj)
    label_names = [config.id2label[index] for index in range(len(config.id2label))]
    args.data_path, args.val_path = None, None
    problem_types.resolve_problem_type(args, toolkit.get("problem_type") or "single_label")
    problem = problem_types.from_toolkit(toolkit)  # with its stored thresholds or target scaling
    splits, label_set = load_splits(args, problem, label_names)
    settings = longdoc.LongdocSettings.from_toolkit(toolkit)
    args.max_length = toolkit["preprocessing"]["max_length"]
    args.aggregation, args.stride = settings.aggregation, settings.stride
    args.pad_token_id = tokenizer.pad_token_id
    clean = longdoc.build_text_cleaner(settings.strip_patterns, toolkit["preprocessing"].get("normalize"),
                                       model_source=args.model_path)
    test_split = {"test": splits["test"]}
    datasets, summaries = chunk_splits(test_split, clean_documents(test_split, clean), tokenizer, args, settings,
                                       label_set, problem)
    print(format_summary(summaries))
    datasets["val"], splits["val"] = datasets["test"], splits["test"]
    results = finish(args, args.model_path, datasets, splits, label_set, context, output_dir,
                     training.RunLogger(output_dir, context.is_main, describe_evaluation), None, tune=False)
    print(json.dumps({key: results["test"][key] for key in (*problem.headline_metrics, "by_aggregation")} |
                     fusion.fused_headline(results)))
    return 0


@report_user_errors
def main(argv=None):
    args = parse_args(argv)
    return training.run_in_context(args, run_eval_only if args.eval_only else run_training)


def run_training(args, context):
    # ---- validate everything cheap before loading the model or tokenizing
    run_dir, resume_from = training.claim_run_dir(args, context, "train_longdoc.py")
    output_dir = run_dir.path
    checkpoints.check_resume(resume_from, args)
    problem = problem_types.from_args(args)
    splits, label_set = load_splits(args, problem)
    normalize_spec = normalizer_spec_of(args)
    settings = build_settings(args)
    clean = longdoc.build_text_cleaner(settings.strip_patterns, normalize_spec, args.strip_pattern_names)
    cleaned = clean_documents(splits, clean)  # before the model: a bad pattern or an emptied document costs nothing
    modeldir.check_max_lengths(args.model_name, args, args.trust_remote_code)
    tokenizer = modeldir.load_tokenizer(args.model_name, args.trust_remote_code)
    longdoc.check_settings(settings, args.max_length, tokenizer.num_special_tokens_to_add(pair=False))
    domain_texts = adaptation.prepare_domain(args, tokenizer, cleaned["train"], clean)
    args.pad_token_id = tokenizer.pad_token_id
    datasets, summaries = chunk_splits(splits, cleaned, tokenizer, args, settings, label_set, problem)
    problem.fit_training_data(splits["train"], args)  # regression: --standardize-targets' mean and std
    if context.is_main:
        print(format_summary(summaries))

    # ---- model
    model = build_model(args, problem.num_outputs(label_set), tokenizer, domain_texts).to(args.device_obj)
    if context.is_main:  # data and model are checked: only now may an earlier run's outputs go
        run_dir.begin()
        write_effective_config(args, output_dir)
        (output_dir / "dataset_summary.json").write_text(json.dumps(summaries, indent=2, ensure_ascii=False),
                                                          encoding="utf-8")
    toolkit = build_toolkit_block(args, model, normalize_spec, settings, problem)
    adaptation.adapt_before_training(model.backbone, tokenizer, domain_texts, args, resume_from, context.is_main)
    if context.enabled:
        # ranks run different numbers of chunk micro-batches: no per-forward buffer broadcast
        model = DistributedDataParallel(model, device_ids=[args.device_obj.index] if args.device_obj.type == "cuda"
                                        else None, broadcast_buffers=False)
    logger = training.RunLogger(output_dir, context.is_main, describe_evaluation)
    logger.info(f"model: {args.model_name}, {modeldir.describe_parameters(model)}")

    early_stopping = train(args, model, tokenizer, datasets, label_set, toolkit, context, output_dir, logger,
                           problem, resume_from)
    distributed.barrier(context)
    best_dir = output_dir / "checkpoint-best"
    if not best_dir.is_dir():
        raise UserError("training ended before any evaluation: no checkpoint-best was written")
    train_labels = np.array([problem.target(d.label, len(label_set.names)) for d in splits["train"]])
    untuned_row = logger.untuned_row()
    untuned = {"validation": untuned_row, "beaten": training.compare_with_untuned(
        early_stopping, untuned_row, args.metric_for_best_model, logger)}
    results = finish(args, best_dir, datasets, splits, label_set, context, output_dir, logger, train_labels,
                     {"untuned": untuned})
    if context.is_main:
        headline = results.get("test", results["validation"])
        logger.info(f"best model: {best_dir} ({args.metric_for_best_model} on validation "
                    f"{results['validation'][args.metric_for_best_model]:.4f}); final document-level " +
                    ", ".join(f"{name} {headline[name]:.4f}" for name in problem.headline_metrics) +
                    f" ({args.aggregation})")
        card = model_card.write_model_card(best_dir, "train_longdoc.py", args, results, problem.headline_metrics)
        logger.info(f"model card: {card}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
