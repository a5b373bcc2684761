"""Export a model directory to ONNX, then prove the export matches PyTorch before keeping it.

    python export_onnx.py --model-path output/checkpoint-best --output-path models/model.onnx
    python export_onnx.py --model-path output/checkpoint-best --output-path models/model-int8.onnx \
        --quantize int8 --validation-file data/val.jsonl
    python export_onnx.py --validate --model-path models/model.onnx --tokenizer-path models/tokenizer

Works for every task this toolkit trains (read from config.json): classifiers export their
logits, vector models the pooled, projected and normalised embedding, long-document models
the chunk logits. Inputs are int64 ``input_ids``, ``attention_mask``, ``token_type_ids`` with
dynamic batch and sequence axes. Beside the .onnx go ``tokenizer/`` and
``<name>.preprocessing.json`` (toolkit block + id2label), so the pair is self-contained.

Every export passes a parity gate: onnx.checker, then torch vs onnxruntime on several batch
sizes and sequence lengths including padded batches (max |difference| within --tolerance for
fp32), a padding-invariance check, and for int8 label agreement and the metric on
--validation-file (required unless --skip-int8-check). Two choices are made by measurement on
this machine: --optimize auto keeps whichever of the optimized and unoptimized graphs is faster
at batch 1 (both must pass), and --quantize int8 keeps the fastest of the --int8-variants
recipes that passes the int8 gate. The export is built and checked in a staging folder beside the
output and moved into place only when it passes; a failing one is kept as
``<name>.onnx.rejected`` (report ``<name>.rejected.report.json``), any earlier export at the
same path stays as it was, and the script exits 1. The output and the report never replace
an input (the model's files, --validation-file); a symlinked output is followed.
"""
import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

from common.cli import ArgumentParser, add_flag, bounded, exit_on_help, parse_bool, parse_device
from common.errors import UserError, report_user_errors

EXIT_REJECTED = 1
# opsets each exporter produces for these models: the TorchScript exporter stops at 20 and cannot
# express BERT's dynamic slices below 11; the dynamo exporter builds opset 18+ (below, it converts
# with a logged traceback and may keep 18)
OPSETS = {"torchscript": (11, 20), "dynamo": (18, 23)}
DEFAULT_OPSETS = {"torchscript": 17, "dynamo": 18}
# (batch size, sequence length); None means the export's max length
PARITY_CASES = ((1, 8), (2, 24), (4, None), (8, 40))
TIMING_TEXTS = 32  # validation records timed at batch 1 per candidate graph
SENSITIVITY_RECORDS = 128  # validation records on which each MatMul's int8 error is measured (fp32-sensitive)
CALIBRATION_RECORDS = 128  # validation records that calibrate static int8 activations
CALIBRATION_BATCH = 8


# int8 recipes (onnxruntime.quantization levers), tried in this order: name -> what it does
INT8_VARIANTS = {
    "dynamic": "dynamic, per-tensor weights (every MatMul, Attention and embedding Gather)",
    "per-channel": "dynamic, one scale per output channel",
    "per-channel-reduce-range": "dynamic, per-channel, 7-bit weights (no saturation on CPUs without VNNI)",
    "fp32-ends": "dynamic, per-channel, embeddings and the classification head kept in fp32",
    "ffn-only": "dynamic, per-channel, only the feed-forward MatMuls (attention, embeddings and head in fp32)",
    "fp32-sensitive": "fp32-ends, plus the fewest encoder MatMuls that pass the gate kept in fp32, most harmful first",
    "static": "static QDQ, per-channel, activations calibrated on --validation-file, ends kept in fp32",
}


def parse_optimize(value):
    """auto, or a boolean that forces the choice."""
    return "auto" if str(value).strip().lower() == "auto" else parse_bool(value)


def parse_int8_variants(value):
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in INT8_VARIANTS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"unknown int8 variant {', '.join(unknown) or '(none given)'}; "
                                         f"choose from {', '.join(INT8_VARIANTS)}")
    return names


def build_parser():
    parser = ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flag(parser, "model-path", required=True,
             help="model directory to export, or with --validate the .onnx file to check")
    add_flag(parser, "output-path", default="model.onnx",
             help="where to write the .onnx file; an earlier export of the same --model-path there is replaced")
    add_flag(parser, "overwrite-output", action="store_true",
             help="replace an --output-path that holds another model's export or a file this toolkit did not export")
    add_flag(parser, "max-length", type=bounded(int, minimum=2), default=None,
             help="max sequence length stored with the export and used by the parity checks "
                  "(default: the model directory's max_length; a different value changes truncation "
                  "at inference; refused for vector models)")
    add_flag(parser, "optimize", type=parse_optimize, default="auto", metavar="auto|true|false",
             help="onnxruntime's transformer optimizer (fused attention, LayerNorm, GELU); auto: build the "
                  "graph with and without it, gate both, keep the one faster on this machine")
    add_flag(parser, "quantize", choices=["none", "int8"], default="none",
             help="int8: try each --int8-variants recipe (onnxruntime.quantization), keep the fastest that "
                  "passes the gate on --validation-file")
    add_flag(parser, "int8-variants", type=parse_int8_variants, default=None, metavar="NAME,...",
             help="with --quantize int8: the recipes to try, in order (default: all): " + ", ".join(INT8_VARIANTS))
    add_flag(parser, "opset", type=bounded(int, minimum=min(low for low, _ in OPSETS.values()),
                                           maximum=max(high for _, high in OPSETS.values())), default=None,
             help="ONNX opset version (default 17, dynamo 18); supported: "
                  + ", ".join(f"{name} {low}-{high}" for name, (low, high) in OPSETS.items()))
    add_flag(parser, "device", type=parse_device, default="cpu",
             help="device for tracing and for the onnxruntime parity run: cpu, cuda, cuda:N or auto")
    add_flag(parser, "exporter", choices=["torchscript", "dynamo"], default="torchscript",
             help="torch.onnx exporter (see docs/export_onnx.md: torchscript graphs get fused attention)")
    add_flag(parser, "tolerance", type=bounded(float, minimum=0), default=1e-4,
             help="fp32 gate: largest allowed max |torch - onnx| on outputs")
    add_flag(parser, "validation-file", default=None,
             help="labelled (or unlabelled) records; int8 exports are gated on their accuracy "
                  "(or label agreement with torch when unlabelled)")
    add_flag(parser, "max-metric-drop", type=bounded(float, minimum=-1, maximum=1), default=0.005,
             help="int8 gate: largest allowed drop of the validation metric versus torch (0.005: half a point)")
    add_flag(parser, "min-label-agreement", type=bounded(float, minimum=0, maximum=1), default=0.99,
             help="int8 gate: smallest allowed share of validation records labelled as torch labels them")
    add_flag(parser, "timing-runs", type=bounded(int, minimum=1), default=5,
             help="rounds of batch-1 calls timed per candidate graph (--optimize auto, int8 variants)")
    add_flag(parser, "skip-int8-check", action="store_true",
             help="allow --quantize int8 without --validation-file: the int8 accuracy is then unchecked "
                  "(the report records it)")
    add_flag(parser, "validate", action="store_true",
             help="re-run the parity/validation report on an existing .onnx (--model-path)")
    add_flag(parser, "tokenizer-path", default=None,
             help="with --validate: the export's tokenizer directory (default: tokenizer/ beside it)")
    add_flag(parser, "reference-model", default=None,
             help="with --validate: the torch model directory to compare against "
                  "(default: the source recorded at export time, when it still exists)")
    add_flag(parser, "report-path", default=None,
             help="where to write the JSON report (default: <name>.report.json beside the .onnx)")
    add_flag(parser, "batch-size", type=bounded(int, minimum=1), default=32, help="batch size for the validation file")
    return parser


# --help answers before the imports below: they load torch, which takes seconds (common/cli.py)
if __name__ == "__main__":
    exit_on_help(build_parser)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from onnxruntime.quantization import CalibrationDataReader  # noqa: E402
from torch import nn  # noqa: E402

from common import data, files, fusion, inference, modeldir, problem_types, reranking  # noqa: E402

EXPORT_PRODUCT_SUFFIXES = (".onnx", ".rejected", inference.PREPROCESSING_SUFFIX, ".report.json",
                           fusion.ONNX_BASELINE_SUFFIX)
INPUT_NAMES = list(inference.MODEL_INPUTS)


# ---------------------------------------------------------------- the exported module

class ExportModule(nn.Module):
    """Fixes the traced signature to the three int64 inputs and one float output."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.model(input_ids, attention_mask, token_type_ids)


def use_eager_attention(model):
    """Switch every transformers submodule to eager attention before tracing.

    The SDPA path traces to a graph onnxruntime's optimizer cannot fuse into its
    Attention op; eager attention gives the classic pattern it recognises.
    """
    for module in model.modules():
        if hasattr(module, "set_attn_implementation") and hasattr(module, "config"):
            module.set_attn_implementation("eager")
    return model


def example_inputs(tokenizer, device):
    """A padded two-row batch with both token types, so the trace sees masking and segments."""
    features = data.encode_texts(tokenizer, ["a b c d e f", "a b"], ["x y", None], 16)
    batch = data.PaddingCollator(tokenizer.pad_token_id)(features)
    return tuple(batch[name].to(device) for name in INPUT_NAMES)


def export_graph(module, inputs, path, opset, exporter, output_name):
    """torch.onnx.export with dynamic batch and sequence axes on every input."""
    with warnings.catch_warnings():
        # the TorchScript exporter's deprecation and trace notices are expected; the parity gate checks the graph
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
            torch.onnx.export(module, inputs, str(path), input_names=INPUT_NAMES, output_names=[output_name],
                              dynamo=True, opset_version=opset, external_data=False,
                              dynamic_shapes={name: {0: batch, 1: sequence} for name in INPUT_NAMES})
        else:
            axes = {name: {0: "batch", 1: "sequence"} for name in INPUT_NAMES}
            torch.onnx.export(module, inputs, str(path), input_names=INPUT_NAMES, output_names=[output_name],
                              dynamo=False, opset_version=opset, dynamic_axes=dict(axes, **{output_name: {0: "batch"}}))
    return path


def optimize_graph(source, target, config, use_gpu=False):
    """onnxruntime's transformer optimizer, with heads and hidden size from the model config."""
    from onnxruntime.transformers import optimizer
    from onnxruntime.transformers.optimizer import MODEL_TYPES
    model_type = config.model_type if config.model_type in MODEL_TYPES else "bert"
    logging.disable(logging.WARNING)  # the fusion passes log notes on every run; the report says what fused
    try:
        optimized = optimizer.optimize_model(str(source), model_type=model_type, num_heads=config.num_attention_heads,
                                             hidden_size=config.hidden_size, use_gpu=use_gpu)
    finally:
        logging.disable(logging.NOTSET)
    optimized.save_model_to_file(str(target))
    return target, optimized.get_fused_operator_statistics()


def build_int8_variant(name, source, target, calibration=None, also_fp32=(), only=None):
    """One INT8_VARIANTS recipe applied to the fp32 graph ``source``; ``calibration`` makes the
    CalibrationDataReader for static quantization (None without --validation-file); ``also_fp32``: node
    names fp32-sensitive keeps in fp32 besides the ends; ``only``: quantize these nodes and no other."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    # fused contrib ops (Attention, SkipLayerNormalization) have no ONNX shape inference: say tensors are float
    options = {"DefaultTensorType": onnx.TensorProto.FLOAT}
    kept_fp32 = fp32_end_nodes(source) if name in ("fp32-ends", "fp32-sensitive", "static") else []
    kept_fp32 += list(also_fp32)
    if name == "static" and calibration is None:
        raise UserError("static int8 needs --validation-file to calibrate its activations")
    if name == "ffn-only":
        only = feed_forward_nodes(source)
    if only == []:
        raise UserError("ffn-only: no feed-forward MatMul (BERT's intermediate/output dense) in the graph")
    logging.disable(logging.WARNING)  # the quantizer warns per tensor it leaves in fp32; the gate judges the result
    try:
        if name == "static":
            # MatMul only: QDQ around the fused Attention op is not supported by onnxruntime's CPU kernels
            quantize_static(str(source), str(target), calibration(), quant_format=QuantFormat.QDQ, per_channel=True,
                            op_types_to_quantize=["MatMul"], nodes_to_exclude=kept_fp32, extra_options=options)
        else:
            quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=name != "dynamic",
                             reduce_range=name == "per-channel-reduce-range", nodes_to_quantize=only,
                             nodes_to_exclude=kept_fp32, extra_options=options)
    finally:
        logging.disable(logging.NOTSET)
    return target


def fp32_end_nodes(path):
    """Names of the nodes that int8 hurts most: the embedding lookups (a per-tensor scale over the whole
    vocabulary flattens rare rows) and the head after the encoder's last LayerNorm (few weights, decisive)."""
    import onnx
    nodes = onnx.load(str(path), load_external_data=False).graph.node
    normalizations = [index for index, node in enumerate(nodes) if "LayerNormalization" in node.op_type]
    head_start = normalizations[-1] + 1 if normalizations else len(nodes)
    embeddings = [node.name for node in nodes if node.op_type in ("Gather", "EmbedLayerNormalization")]
    head = [node.name for node in nodes[head_start:] if node.op_type in ("MatMul", "Gemm")]
    return embeddings + head


def feed_forward_nodes(path):
    """Names of the feed-forward MatMuls of each BERT layer (``intermediate/dense``, ``output/dense`` outside
    attention): two thirds of an encoder's weights, and further from the logits' fine margins than attention."""
    import onnx
    nodes = onnx.load(str(path), load_external_data=False).graph.node
    return [node.name for node in nodes if node.op_type == "MatMul" and (
        "/intermediate/" in node.name or ("/output/dense" in node.name and "/attention/" not in node.name))]


def encoder_weight_nodes(path):
    """Names of the nodes int8 can quantize between the fp32 ends: the encoder's MatMuls with a weight
    (not attention's activation-by-activation products) and fused Attention ops."""
    import onnx
    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {tensor.name for tensor in graph.initializer}
    ends = set(fp32_end_nodes(path))
    return [node.name for node in graph.node if node.name not in ends and (
        node.op_type == "Attention" or (node.op_type == "MatMul" and node.input[1] in weights))]


def sensitivity_ranking(fp32_graph, torch_loaded, max_length, validation_file, device, work_dir):
    """The encoder's weight nodes, most harmful first: each quantized alone (per-channel), how far it moves
    the fp32 graph's outputs (mean absolute difference) on the first validation records. One node at a
    time is the cheap, local measure; the gate then judges the combination."""
    batches = validation_batches(torch_loaded, max_length, validation_file, SENSITIVITY_RECORDS, 32)
    expected = [load_candidate(fp32_graph, torch_loaded, max_length, device).run(batch) for batch in batches]
    probe = work_dir / "int8-probe.onnx"
    error = {}
    for node in encoder_weight_nodes(fp32_graph):
        build_int8_variant("per-channel", fp32_graph, probe, only=[node])
        quantized = load_candidate(probe, torch_loaded, max_length, device)
        error[node] = float(np.mean([np.abs(quantized.run(batch) - reference).mean()
                                     for batch, reference in zip(batches, expected)]))
    return sorted(error, key=error.get, reverse=True)


def search_fp32_sensitive(fp32_graph, target, ranking, gate):
    """fp32-sensitive: keep the 1, 2, 4, ... most harmful nodes of ``ranking`` in fp32 (at most half of
    them: beyond that int8 buys little) until ``gate(graph)`` passes, then bisect down to the fewest that
    pass. Returns the row of that count (``target`` holds its graph), or of the last count tried when
    none passes."""
    limit = max(1, len(ranking) // 2)

    def attempt(count):
        build_int8_variant("fp32-sensitive", fp32_graph, target, also_fp32=ranking[:count])
        row = gate(target)
        row["kept_fp32_nodes"] = ranking[:count]
        return row

    failed, count = 0, 1
    row = attempt(count)
    while not row["passed"]:
        if count >= limit:
            return row
        failed, count = count, min(count * 2, limit)
        row = attempt(count)
    passed, passing_row = count, row
    while passed - failed > 1:
        middle = (failed + passed) // 2
        row = attempt(middle)
        if row["passed"]:
            passed, passing_row = middle, row
        else:
            failed = middle
    if row is not passing_row:  # ``target`` holds the last graph tried: rebuild the one kept (gated above)
        build_int8_variant("fp32-sensitive", fp32_graph, target, also_fp32=ranking[:passed])
    return passing_row


class ValidationCalibration(CalibrationDataReader):
    """Padded batches of validation records as onnxruntime feeds, for static quantization's calibration."""

    def __init__(self, batches):
        self.batches = iter(batches)

    def get_next(self):
        batch = next(self.batches, None)
        return None if batch is None else {name: batch[name].numpy().astype(np.int64) for name in INPUT_NAMES}


# ---------------------------------------------------------------- parity checks

def parity_batches(tokenizer, config, max_length, seed=0):
    """Random-token batches for each PARITY_CASE; rows after the first are shorter (padded)."""
    generator = np.random.default_rng(seed)
    special = set(tokenizer.all_special_ids)
    vocabulary = np.array([i for i in range(min(len(tokenizer), config.vocab_size)) if i not in special])
    two_segments = getattr(config, "type_vocab_size", 1) > 1
    collator = data.PaddingCollator(tokenizer.pad_token_id)
    batches = []
    for batch_size, length in PARITY_CASES:
        length = min(length or max_length, max_length)
        features = []
        for row in range(batch_size):
            row_length = max(4, length - row * (length // (batch_size + 1)))
            ids = generator.choice(vocabulary, size=row_length - 2).tolist()
            types = [0] * row_length
            if two_segments and row % 2 == 1:  # a sentence pair: second segment has type 1
                types = [0] * (row_length // 2) + [1] * (row_length - row_length // 2)
            features.append({"input_ids": [tokenizer.cls_token_id] + ids + [tokenizer.sep_token_id],
                             "token_type_ids": types})
        batches.append((batch_size, length, collator(features)))
    return batches


def compare_outputs(onnx_run, torch_run, batches, task, problem=None):
    """Per case: max |torch - onnx| and, for classifiers, label agreement (a bar on a terminal).

    Classifiers are compared on what users see (``problem``: common/problem_types.py): logits and the
    argmax label, sigmoid probabilities and the label sets above threshold, or scores in the original scale.
    """
    problem = problem or problem_types.SingleLabel()
    cases = []
    for batch_size, length, batch in inference.progress_bar(batches, "parity check", unit="case"):
        onnx_raw = onnx_run(batch)
        case = {"batch": batch_size, "seq": length, "padded": bool((batch["attention_mask"] == 0).any()),
                "finite": inference.is_finite(onnx_raw)}
        if torch_run is not None:
            torch_raw = torch_run(batch)
            if task == "vector":
                case["max_abs_diff"] = float(np.abs(torch_raw - onnx_raw).max())
                case["min_cosine"] = float(min(inference.cosine_similarity(a, b) for a, b in zip(torch_raw, onnx_raw)))
            else:
                difference = problem.comparable_outputs(torch_raw) - problem.comparable_outputs(onnx_raw)
                case["max_abs_diff"] = float(np.abs(difference).max())
                torch_decisions, onnx_decisions = problem.decisions(torch_raw), problem.decisions(onnx_raw)
                if torch_decisions is not None:
                    case["label_agreement"] = float((torch_decisions == onnx_decisions).all(-1).mean())
        cases.append(case)
    return cases


def padding_invariance(onnx_run, batches):
    """Max |difference| between each padded row and the same row run alone, unpadded."""
    worst = 0.0
    for _, _, batch in inference.progress_bar(batches, "padding check", unit="case"):
        together = onnx_run(batch)
        for row, length in enumerate(batch["attention_mask"].sum(1).tolist()):
            alone = onnx_run({name: batch[name][row:row + 1, :length] for name in INPUT_NAMES})
            worst = max(worst, float(np.abs(alone[0] - together[row]).max()))
    return worst


# ---------------------------------------------------------------- validation file

def load_validation_examples(path, label2id):
    """Texts, contexts and gold label ids (None when the file has no usable labels)."""
    examples = data.load_text_examples(path, require_label=False)
    gold = []
    for example in examples:
        raw = example.raw_label
        if isinstance(raw, str) and raw.strip().lstrip("-").isdigit():
            raw = int(raw)
        gold.append(raw if isinstance(raw, int) else label2id.get(raw))
    if any(label is None for label in gold):
        gold = None
    return [e.text for e in examples], [e.context for e in examples], gold


def predict_labels(loaded, texts, contexts, batch_size):
    """Per text, the model's decision: its label id, its tuple of label ids (multi-label) or its score."""
    if loaded.task == "longdoc":
        results = inference.predict_long_documents(loaded, texts, batch_size=batch_size, progress=True)
    else:
        results = inference.classify(loaded, texts, contexts, batch_size=batch_size, progress=True)
    decisions = [result["score"] if "score" in result else tuple(result["label_ids"]) if "label_ids" in result
                 else result["label_id"] for result in results]
    return np.array(decisions, dtype=object if decisions and isinstance(decisions[0], tuple) else None)


def reference_predictions(torch_loaded, path, batch_size):
    """torch's answers on the validation file (label ids, or vectors for a vector model; a reranker's
    NDCG@10 on a pair file), computed once and compared with every candidate graph; None without a torch model."""
    if torch_loaded is None:
        return None
    if reranking.is_reranker(torch_loaded.toolkit):
        return reranking.score_groups(torch_loaded, reranking.load_rerank_pairs(path), batch_size)[0]["ndcg@10"]
    if torch_loaded.task == "vector":
        texts = [example.text for example in data.load_text_examples(path, require_label=False)]
        return inference.embed(torch_loaded, texts, batch_size, progress=True)
    examples = data.load_text_examples(path, require_label=False)
    return predict_labels(torch_loaded, [e.text for e in examples], [e.context for e in examples], batch_size)


def rerank_validation_metrics(onnx_loaded, torch_ndcg, path, batch_size):
    """NDCG@10 of both backends on a reranker's pair file (each query's listed documents)."""
    pairs = reranking.load_rerank_pairs(path)
    report = {"file": path, "records": len(pairs), "metric": "ndcg@10",
              "onnx_metric": reranking.score_groups(onnx_loaded, pairs, batch_size)[0]["ndcg@10"]}
    if torch_ndcg is not None:
        report.update(torch_metric=torch_ndcg, drop=torch_ndcg - report["onnx_metric"])
    return report


def validation_metrics(onnx_loaded, reference, path, batch_size):
    """Accuracy (or agreement with torch when unlabelled) of both backends on a validation file;
    ``reference`` is reference_predictions' answer."""
    if reranking.is_reranker(onnx_loaded.toolkit):
        return rerank_validation_metrics(onnx_loaded, reference, path, batch_size)
    if onnx_loaded.task == "vector":
        texts = [example.text for example in data.load_text_examples(path, require_label=False)]
        onnx_vectors = inference.embed(onnx_loaded, texts, batch_size, progress=True)
        report = {"file": path, "records": len(texts), "metric": "mean_cosine_to_torch"}
        if reference is not None:
            cosine = float(np.mean([inference.cosine_similarity(a, b) for a, b in zip(reference, onnx_vectors)]))
            report.update(torch_metric=1.0, onnx_metric=cosine, drop=1.0 - cosine)
        return report
    problem_type = onnx_loaded.toolkit.get("problem_type") or "single_label"
    if problem_type != "single_label":
        return decision_agreement(onnx_loaded, reference, path, batch_size, problem_type)
    label2id = {name: index for index, name in onnx_loaded.id2label.items()}
    texts, contexts, gold = load_validation_examples(path, label2id)
    onnx_labels = predict_labels(onnx_loaded, texts, contexts, batch_size)
    report = {"file": path, "records": len(texts), "metric": "accuracy" if gold is not None else "agreement"}
    torch_labels = reference
    if torch_labels is not None:
        report["label_agreement"] = float((torch_labels == onnx_labels).mean())
    if gold is not None:
        report["onnx_metric"] = float((onnx_labels == np.array(gold)).mean())
        if torch_labels is not None:
            report["torch_metric"] = float((torch_labels == np.array(gold)).mean())
    elif torch_labels is not None:
        report.update(torch_metric=1.0, onnx_metric=report["label_agreement"])
    if "torch_metric" in report:
        report["drop"] = report["torch_metric"] - report["onnx_metric"]
    return report


def decision_agreement(onnx_loaded, reference, path, batch_size, problem_type):
    """Multi-label: the share of texts given the same label set by both backends; regression: the
    Spearman correlation of their scores (1.0 for torch itself; the int8 gate's drop is 1 - it).
    ``reference``: torch's decisions (reference_predictions)."""
    examples = data.load_text_examples(path, require_label=False)
    texts, contexts = [e.text for e in examples], [e.context for e in examples]
    metric = "spearman_to_torch" if problem_type == "regression" else "label_set_agreement"
    report = {"file": path, "records": len(texts), "metric": metric}
    if reference is None:
        return report
    onnx_decisions = predict_labels(onnx_loaded, texts, contexts, batch_size)
    torch_decisions = reference
    if problem_type == "regression":
        import scipy.stats
        agreement = float(scipy.stats.spearmanr(torch_decisions, onnx_decisions)[0]) if len(texts) > 1 else 1.0
        report["max_abs_score_diff"] = float(np.abs(torch_decisions - onnx_decisions).max())
    else:
        agreement = float(np.mean([a == b for a, b in zip(torch_decisions, onnx_decisions)]))
        report["label_agreement"] = agreement
    report.update(torch_metric=1.0, onnx_metric=agreement, drop=1.0 - agreement)
    return report


# ---------------------------------------------------------------- candidate graphs, timed on this machine

def load_candidate(graph, torch_loaded, max_length, device):
    """A graph still in the work folder as a LoadedModel (the torch model's tokenizer and preprocessing)."""
    toolkit = json.loads(json.dumps(torch_loaded.toolkit))
    toolkit.setdefault("preprocessing", {})["max_length"] = max_length
    session = inference.create_onnx_session(graph, device)
    return inference.LoadedModel(torch_loaded.task, toolkit, torch_loaded.tokenizer,
                                 inference.OnnxRunner(session, graph), "onnx", str(graph), torch_loaded.id2label)


def validation_features(torch_loaded, validation_file, max_length, limit):
    """The first ``limit`` validation records encoded as the model reads them (a reranker's file holds
    query/document pairs)."""
    if reranking.is_reranker(torch_loaded.toolkit):
        pairs = reranking.load_rerank_pairs(validation_file)[:limit]
        return reranking.encode_for_model(torch_loaded, [p.query for p in pairs], [p.document for p in pairs],
                                          max_length)
    examples = data.load_text_examples(validation_file, require_label=False)[:limit]
    contexts = None if torch_loaded.task == "vector" else [example.context for example in examples]
    return inference.encode_inputs(torch_loaded, [example.text for example in examples], contexts, max_length)


def timing_rows(torch_loaded, max_length, validation_file, limit=TIMING_TEXTS):
    """Batch-1 inputs to time: the first validation records, else the parity cases' rows unpadded."""
    collator = data.PaddingCollator(torch_loaded.tokenizer.pad_token_id)
    if validation_file:
        return [collator([feature]) for feature in validation_features(torch_loaded, validation_file, max_length,
                                                                       limit)]
    rows = []
    for _, _, batch in parity_batches(torch_loaded.tokenizer, torch_loaded.config, max_length):
        for row, length in enumerate(batch["attention_mask"].sum(1).tolist()):
            rows.append({name: batch[name][row:row + 1, :length] for name in INPUT_NAMES})
    return rows


def batch1_latencies_ms(candidates, rows, runs):
    """Median milliseconds of one batch-1 call for each candidate; the candidates take turns round by
    round, so a busy moment on the machine costs them all alike."""
    for candidate in candidates:  # warm-up: the first calls allocate and pick kernels
        for row in rows[:4]:
            candidate.run(row)
    rounds = [[] for _ in candidates]
    for _ in range(runs):
        for candidate, times in zip(candidates, rounds):
            start = time.perf_counter()
            for row in rows:
                candidate.run(row)
            times.append((time.perf_counter() - start) * 1000 / len(rows))
    return [statistics.median(times) for times in rounds]


def parity_reasons(candidate, torch_loaded, args):
    """The fp32 gate (torch parity, finite outputs, padding invariance) on a candidate graph."""
    batches = parity_batches(torch_loaded.tokenizer, torch_loaded.config, candidate.preprocessing["max_length"])
    check = {"quantization": "none", "tolerance": args.tolerance,
             "cases": compare_outputs(candidate.run, torch_loaded.run, batches, candidate.task,
                                      problem_types.from_toolkit(candidate.toolkit)),
             "padding_invariance_max_diff": padding_invariance(candidate.run, batches)}
    return gate_reasons(check, compared_to_torch=True)


def choose_optimized(graphs, torch_loaded, max_length, args):
    """--optimize auto: gate the unoptimized and optimized graphs and keep the faster passing one.

    ``graphs`` is {optimized (bool): path}. Returns (optimized, the timing table). When neither
    passes, the optimized graph goes on to the final gate, which rejects it with its reasons.
    """
    candidates = {flag: load_candidate(path, torch_loaded, max_length, args.device) for flag, path in graphs.items()}
    reasons = {flag: parity_reasons(candidate, torch_loaded, args) for flag, candidate in candidates.items()}
    rows = timing_rows(torch_loaded, max_length, args.validation_file)
    latencies = dict(zip(candidates, batch1_latencies_ms(list(candidates.values()), rows, args.timing_runs)))
    passing = [flag for flag in candidates if not reasons[flag]]
    chosen = min(passing, key=latencies.get) if passing else True
    table = [{"optimized": flag, "latency_ms": latencies[flag], "passed": not reasons[flag],
              "reasons": reasons[flag], "chosen": flag == chosen} for flag in candidates]
    shown = ", ".join(f"{'optimized' if row['optimized'] else 'unoptimized'} {row['latency_ms']:.2f} ms"
                      + ("" if row["passed"] else " (fails the parity gate)") for row in table)
    print(f"--optimize auto: batch-1 latency on this machine ({len(rows)} inputs, median of {args.timing_runs}): "
          f"{shown}; keeping the {'optimized' if chosen else 'unoptimized'} graph")
    return chosen, table


def choose_int8_variant(fp32_graph, torch_loaded, max_length, args, work_dir):
    """Build each --int8-variants recipe from ``fp32_graph``, gate it on the validation file and time it
    beside the fp32 graph; keep the fastest that passes. Returns (variant name, graph, its validation
    metrics, the table of every recipe).

    Without --validation-file (--skip-int8-check) nothing can be gated: the first listed recipe is kept,
    unchecked. When none passes, the one closest to passing goes on to the final gate, which rejects it.
    """
    candidates = {"fp32": load_candidate(fp32_graph, torch_loaded, max_length, args.device)}
    table = build_and_gate_int8_variants(fp32_graph, torch_loaded, max_length, args, work_dir, candidates)
    rows = timing_rows(torch_loaded, max_length, args.validation_file)
    latencies = dict(zip(candidates, batch1_latencies_ms(list(candidates.values()), rows, args.timing_runs)))
    for row in table:
        if row["variant"] in latencies:
            row.update(latency_ms=latencies[row["variant"]], speedup=latencies["fp32"] / latencies[row["variant"]])
    built = [row for row in table if row["graph"] is not None]
    if not built:
        raise UserError("--quantize int8: no variant could be built (" + "; ".join(
            f"{row['variant']}: {row['error']}" for row in table) + ")")
    passing = [row for row in built if row["passed"]]
    chosen = min(passing, key=lambda row: row["latency_ms"]) if passing else min(built, key=closeness_to_gate)
    for row in table:
        row["chosen"] = row is chosen
    print(format_int8_table(table, latencies["fp32"], args))
    if not passing:
        print(f"int8 refused: no variant passes the gate (label agreement >= {args.min_label_agreement:g}, "
              f"drop <= {args.max_metric_drop:g}); closest: {chosen['variant']} ({'; '.join(chosen['reasons'])})",
              file=sys.stderr)
    return chosen["variant"], chosen["graph"], chosen.get("validation"), table


def build_and_gate_int8_variants(fp32_graph, torch_loaded, max_length, args, work_dir, candidates):
    """One table row per recipe: built (its loaded graph added to ``candidates``) and gated, or the reason
    onnxruntime could not build it."""
    names = args.int8_variants if args.validation_file else args.int8_variants[:1]
    reference = None
    if args.validation_file:
        reference = reference_predictions(torch_loaded, args.validation_file, args.batch_size)
    calibration = calibration_reader(torch_loaded, max_length, args.validation_file)

    def gate(name, target):
        candidates[name] = load_candidate(target, torch_loaded, max_length, args.device)
        row = {"variant": name, "graph": target}
        if reference is not None:
            row["validation"] = validation_metrics(candidates[name], reference, args.validation_file, args.batch_size)
        row["reasons"] = validation_gate_reasons(row.get("validation", {}), args.max_metric_drop,
                                                 args.min_label_agreement)
        row["passed"] = not row["reasons"]
        return row

    table = []
    for name in names:
        target = work_dir / f"int8-{name}.onnx"
        try:
            if name == "fp32-sensitive":
                table.append(gate_fp32_sensitive(fp32_graph, target, torch_loaded, max_length, args, work_dir,
                                                 lambda graph: gate(name, graph)))
                continue
            build_int8_variant(name, fp32_graph, target, calibration)
            row = gate(name, target)
        except Exception as error:  # a recipe onnxruntime cannot apply to this graph is reported, not fatal
            table.append({"variant": name, "graph": None, "error": str(error).splitlines()[0], "passed": False})
            continue
        table.append(row)
    return table


def gate_fp32_sensitive(fp32_graph, target, torch_loaded, max_length, args, work_dir, gate):
    """fp32-sensitive's row: the encoder's nodes ranked on the validation file, then the fewest of them
    kept in fp32 that pass ``gate``."""
    if not args.validation_file:
        raise UserError("fp32-sensitive needs --validation-file to find the MatMuls int8 hurts most")
    ranking = sensitivity_ranking(fp32_graph, torch_loaded, max_length, args.validation_file, args.device, work_dir)
    if len(ranking) < 2:
        raise UserError("fp32-sensitive: fewer than two encoder MatMuls to choose from")
    return search_fp32_sensitive(fp32_graph, target, ranking, gate)


def closeness_to_gate(row):
    """Sort key: highest label agreement first, then smallest metric drop."""
    validation = row.get("validation", {})
    return -validation.get("label_agreement", 0.0), validation.get("drop", 0.0)


def calibration_reader(torch_loaded, max_length, validation_file):
    """A factory of CalibrationDataReaders over the first validation records (None without a file)."""
    if not validation_file:
        return None
    batches = validation_batches(torch_loaded, max_length, validation_file, CALIBRATION_RECORDS, CALIBRATION_BATCH)
    return lambda: ValidationCalibration(batches)


def validation_batches(torch_loaded, max_length, validation_file, records, batch_size):
    """The first ``records`` validation records, encoded and padded in batches of ``batch_size``."""
    features = validation_features(torch_loaded, validation_file, max_length, records)
    collator = data.PaddingCollator(torch_loaded.tokenizer.pad_token_id)
    return [collator(features[start:start + batch_size]) for start in range(0, len(features), batch_size)]


def format_int8_table(table, fp32_latency, args):
    """Each variant: batch-1 latency, speed-up over fp32, agreement, metric drop, verdict."""
    lines = [f"int8 variants (batch-1 latency on this machine; fp32 {fp32_latency:.2f} ms; gate: label agreement "
             f">= {args.min_label_agreement:g}, metric drop <= {args.max_metric_drop:g}):",
             f"  {'variant':<26} {'ms':>7} {'speed-up':>8} {'agreement':>9} {'drop':>8}  verdict"]
    for row in table:
        if row["graph"] is None:
            lines.append(f"  {row['variant']:<26} {'':>7} {'':>8} {'':>9} {'':>8}  not built: {row['error']}")
            continue
        name = row["variant"] + (f" ({len(row['kept_fp32_nodes'])} in fp32)" if "kept_fp32_nodes" in row else "")
        validation = row.get("validation", {})
        agreement = f"{validation['label_agreement']:.4f}" if "label_agreement" in validation else "n/a"
        drop = f"{validation['drop']:+.4f}" if "drop" in validation else "n/a"
        verdict = "passes" if row["passed"] else "fails: " + "; ".join(row["reasons"])
        if row["chosen"] and row["passed"]:
            verdict += " <- kept"
        lines.append(f"  {name:<26} {row['latency_ms']:>7.2f} {row['speedup']:>7.2f}x {agreement:>9} "
                     f"{drop:>8}  {verdict}")
    return "\n".join(lines)


# ---------------------------------------------------------------- the report

def build_report(onnx_path, onnx_loaded, torch_loaded, meta, args, shown_path=None, validation=None):
    """Run every check on an export and decide: passed, or the reasons it is rejected.

    ``shown_path`` is the name the report gives the graph (the final path of a staged export);
    ``validation``: its validation metrics when the int8 variant search already computed them.
    """
    import onnx
    quantization = meta.get("quantization", "none")
    report = {"onnx": str(shown_path or onnx_path), "task": onnx_loaded.task,
              "problem_type": onnx_loaded.toolkit.get("problem_type"), "quantization": quantization,
              "int8_variant": meta.get("int8_variant"), "optimized": meta.get("optimized"), "tolerance": args.tolerance,
              "max_metric_drop": args.max_metric_drop, "min_label_agreement": args.min_label_agreement,
              "int8_check_skipped": quantization != "none" and args.skip_int8_check, "reasons": []}
    try:
        onnx.checker.check_model(str(onnx_path), full_check=True)
        report["checker"] = "ok"
    except Exception as error:  # onnx raises several checker/shape-inference error types
        report["checker"] = str(error).splitlines()[0]
        report["reasons"].append(f"onnx.checker failed: {report['checker']}")
        report["passed"] = False
        return report
    max_length = onnx_loaded.preprocessing.get("max_length", 128)
    config = torch_loaded.config if torch_loaded is not None else _config_for_parity(onnx_loaded)
    batches = parity_batches(onnx_loaded.tokenizer, config, max_length)
    torch_run = torch_loaded.run if torch_loaded is not None else None
    report["cases"] = compare_outputs(onnx_loaded.run, torch_run, batches, onnx_loaded.task,
                                      problem_types.from_toolkit(onnx_loaded.toolkit))
    report["padding_invariance_max_diff"] = padding_invariance(onnx_loaded.run, batches)
    if args.validation_file:
        report["validation"] = validation or validation_metrics(
            onnx_loaded, reference_predictions(torch_loaded, args.validation_file, args.batch_size),
            args.validation_file, args.batch_size)
    report["reasons"] = gate_reasons(report, torch_loaded is not None)
    report["passed"] = not report["reasons"]
    return report


def _config_for_parity(loaded):
    """Without the torch model: vocabulary size and segment count from the tokenizer alone."""
    return argparse.Namespace(vocab_size=len(loaded.tokenizer), type_vocab_size=2)


def gate_reasons(report, compared_to_torch):
    """Why an export fails: non-finite outputs, fp32 drift, padding dependence, int8 metric drop."""
    reasons = []
    quantized = report["quantization"] != "none"
    if not all(case["finite"] for case in report["cases"]):
        reasons.append("onnxruntime produced NaN or inf")
    worst = max((case.get("max_abs_diff", 0.0) for case in report["cases"]), default=0.0)
    report["max_abs_diff"] = worst if compared_to_torch else None
    if compared_to_torch and not quantized and worst > report["tolerance"]:
        reasons.append(f"max |torch - onnx| = {worst:.3g} exceeds the tolerance {report['tolerance']:g}")
    if not quantized and report["padding_invariance_max_diff"] > report["tolerance"]:
        reasons.append(f"outputs change with padding (max |diff| {report['padding_invariance_max_diff']:.3g})")
    if quantized:
        reasons += validation_gate_reasons(report.get("validation", {}), report["max_metric_drop"],
                                           report["min_label_agreement"])
    return reasons


def validation_gate_reasons(validation, max_metric_drop, min_label_agreement):
    """The int8 gate on validation metrics: labels as torch gives them, and the metric kept."""
    reasons = []
    if validation.get("label_agreement", 1.0) < min_label_agreement:
        reasons.append(f"int8 labels agree with torch on {validation['label_agreement']:.4f} of the records "
                       f"(less than --min-label-agreement {min_label_agreement:g})")
    if validation.get("drop", 0.0) > max_metric_drop:
        reasons.append(f"int8 {validation['metric']} drops by {validation['drop']:.4f} "
                       f"(more than --max-metric-drop {max_metric_drop:g})")
    return reasons


def format_report(report):
    """The report as a readable table."""
    quantization = report["quantization"] + (f" {report['int8_variant']}" if report.get("int8_variant") else "")
    task = report["task"] + (" (reranker)" if report.get("problem_type") == "rerank" else "")
    lines = [f"ONNX export report: {report['onnx']} (task {task}, "
             f"quantization {quantization}, optimized {report['optimized']})",
             f"  onnx.checker: {report['checker']}"]
    if "cases" in report:
        lines.append(f"  {'batch':>5} {'seq':>5} {'padded':>6} {'max|diff|':>10} {'agreement':>9}")
        for case in report["cases"]:
            diff = f"{case['max_abs_diff']:.2e}" if "max_abs_diff" in case else "n/a"
            agreement = case.get("label_agreement", case.get("min_cosine"))
            agreement = f"{agreement:.3f}" if agreement is not None else "n/a"
            lines.append(f"  {case['batch']:>5} {case['seq']:>5} {str(case['padded']):>6} {diff:>10} {agreement:>9}")
        lines.append(f"  fp32 tolerance {report['tolerance']:g}; padding invariance max|diff| "
                     f"{report['padding_invariance_max_diff']:.2e}")
    validation = report.get("validation")
    if validation:
        parts = [f"{key} {validation[key]:.4f}" for key in ("torch_metric", "onnx_metric", "drop", "label_agreement")
                 if key in validation]
        lines.append(f"  validation {validation['file']} ({validation['records']} records, {validation['metric']}): "
                     + ", ".join(parts))
    if report["quantization"] != "none" and not validation:
        lines.append("  warning: --skip-int8-check: int8 accuracy was not checked")
    lines.append("  result: PASSED" if report["passed"] else "  result: REJECTED: " + "; ".join(report["reasons"]))
    return "\n".join(lines)


def write_report(report, path):
    """Write whole or not at all (files.write_output_file: a device or symlink is written through, not replaced)."""
    files.write_output_file(path, json.dumps(report, indent=2, ensure_ascii=False), flag="--report-path")


def default_report_path(onnx_path, rejected=False):
    return Path(onnx_path).with_name(Path(onnx_path).stem + (".rejected" if rejected else "") + ".report.json")


def reject(staged_path, output_path):
    """Keep a failing export for inspection under a name nothing will load by mistake."""
    rejected = Path(str(output_path) + ".rejected")
    os.replace(staged_path, rejected)
    return rejected


# ---------------------------------------------------------------- export options

def check_export_paths(args):
    """(model directory, output path with symlinks followed); refuses outputs that would replace an input."""
    model_dir = Path(args.model_path)
    if model_dir.suffix == ".onnx":
        raise UserError(f"--model-path {model_dir}: is already an .onnx file; add --validate to check it")
    output_path = Path(args.output_path)
    if output_path.suffix != ".onnx":
        raise UserError(f"--output-path {output_path}: must end in .onnx")
    resolved = files.resolve_output_path(output_path, "--output-path")
    if resolved.exists() and not resolved.is_file():
        raise UserError(f"--output-path {output_path}: exists and is not a regular file")
    inputs = [("--model-path", path) for path in model_files(model_dir)]
    inputs += [("--validation-file", args.validation_file)]
    written = [("--output-path", resolved), ("--output-path", inference.onnx_companions(resolved)[0])]
    for flag, path in written:
        files.refuse_overwriting_inputs(path, inputs, flag)
    check_report_path(args, default_report_path(resolved), inputs + [("--output-path", resolved)])
    return model_dir, resolved


def check_replaceable_export(existing, model_dir, shown_path):
    """Re-exporting a model replaces its own earlier export; another model's export, or an .onnx this
    toolkit did not write, is someone's result and needs --overwrite-output."""
    source = recorded_source(inference.onnx_companions(existing)[0])
    if source == str(model_dir.resolve()):
        return
    held = f"an export of {source}" if source else "an .onnx file this toolkit did not export (no preprocessing record)"
    raise UserError(f"--output-path {shown_path}: holds {held}; choose another path, "
                    "or add --overwrite-output to replace it")


def recorded_source(preprocessing_file):
    """The source model an export's preprocessing record names, or None."""
    try:
        meta = json.loads(Path(preprocessing_file).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta.get("source_model") if isinstance(meta, dict) else None


def model_files(model_dir):
    """The files of a model directory that loading reads (not exports written into it earlier)."""
    if not model_dir.is_dir():
        return []
    return [path for path in model_dir.iterdir()
            if path.is_file() and not path.name.endswith(EXPORT_PRODUCT_SUFFIXES)]


def check_report_path(args, default, inputs):
    """Before any work: --report-path must be writable and must not replace an input or the graph."""
    report_path = args.report_path or default
    files.refuse_overwriting_inputs(report_path, inputs, "--report-path")
    files.check_output_path(report_path, "--report-path")


def check_opset(args):
    """The flag's range covers both exporters; each one supports only part of it."""
    if args.opset is None:
        args.opset = DEFAULT_OPSETS[args.exporter]
    low, high = OPSETS[args.exporter]
    if not low <= args.opset <= high:
        raise UserError(f"--opset {args.opset}: the {args.exporter} exporter supports opsets {low} to {high}")


def resolve_int8_variants(args):
    """--int8-variants means something only to an int8 export: given with anything else it would be ignored."""
    if args.int8_variants is not None and (args.validate or args.quantize != "int8"):
        raise UserError("--int8-variants: applies only to an export with --quantize int8"
                        + (" (--validate re-checks the recipe already chosen)" if args.validate else ""))
    args.int8_variants = args.int8_variants or list(INT8_VARIANTS)


def check_int8_options(quantization, args, subject="--quantize int8"):
    """int8 legitimately moves outputs, so only the validation metric can vouch for it: ask for it up front."""
    if args.skip_int8_check and args.validation_file:
        raise UserError("--skip-int8-check: contradicts --validation-file (keep one)")
    if quantization == "int8" and not (args.validation_file or args.skip_int8_check):
        raise UserError(f"{subject}: needs --validation-file to check its accuracy "
                        "(or --skip-int8-check to accept it unchecked)")
    if args.validation_file and not Path(args.validation_file).exists():
        raise UserError(f"--validation-file {args.validation_file}: not found")


def resolve_max_length(requested, torch_loaded):
    """{"export": N, "training": M}: the export's max length and the model directory's."""
    stored = torch_loaded.preprocessing.get("max_length", 128)
    if torch_loaded.task == "vector":
        stored = max(inference.vector_max_length(torch_loaded, side) for side in ("query", "doc"))
        refuse_vector_max_length(requested, stored, torch_loaded)
    max_length = stored if requested is None else requested
    limit = getattr(torch_loaded.config, "max_position_embeddings", None)
    if limit and max_length > limit:
        raise UserError(f"--max-length {max_length}: the model has only {limit} positions")
    if max_length < 2:
        raise UserError(f"--max-length {max_length}: must be at least 2 ([CLS] and [SEP])")
    if max_length != stored:
        print(f"note: --max-length {max_length}: the export will truncate inputs at {max_length} tokens "
              f"instead of the training-time {stored}", file=sys.stderr)
    return {"export": max_length, "training": stored}


def refuse_vector_max_length(requested, stored, torch_loaded):
    """A vector model encodes queries and documents at their own lengths; one flag cannot say which to change."""
    if requested is not None and requested != stored:
        lengths = "/".join(str(inference.vector_max_length(torch_loaded, side)) for side in ("query", "doc"))
        raise UserError(f"--max-length {requested}: a vector model keeps its training-time query/doc lengths "
                        f"({lengths}, toolkit.vector in {Path(torch_loaded.source) / 'config.json'}); drop the flag")


def tokenizer_fingerprint(tokenizer):
    """What decides the token ids (vocabulary, normalizer, pre-tokenizer, post-processor, added and
    special tokens), not the files' formatting, which changes between transformers versions."""
    return (tokenizer.backend_tokenizer.to_str(), json.dumps(tokenizer.special_tokens_map, sort_keys=True),
            tokenizer.padding_side, tokenizer.truncation_side)


def recorded_sources(folder):
    """The source models that the exports already in ``folder`` record."""
    sources = {recorded_source(path) for path in Path(folder).glob("*" + inference.PREPROCESSING_SUFFIX)}
    return sorted(source for source in sources if source)


def check_shared_tokenizer(output_path, torch_loaded):
    """Exports in one folder share tokenizer/: refuse to swap it for a different model's."""
    tokenizer_dir = inference.onnx_companions(output_path)[1]
    if not tokenizer_dir.exists():
        return
    try:
        existing = modeldir.load_tokenizer(str(tokenizer_dir))
    except UserError as error:
        raise UserError(f"{error}; other exports may use it: export into another folder") from None
    if tokenizer_fingerprint(existing) != tokenizer_fingerprint(torch_loaded.tokenizer):
        sources = recorded_sources(output_path.parent)
        origin = f" (exported from {', '.join(sources)})" if sources else ""
        raise UserError(f"{tokenizer_dir}: holds a different model's tokenizer{origin}; "
                        f"export {torch_loaded.source} into another folder")


# ---------------------------------------------------------------- export and validate

def write_companions(output_path, torch_loaded, lengths, args, choice):
    """tokenizer/, <name>.preprocessing.json and, for a model fused with a baseline, <name>.baseline.safetensors
    beside the .onnx."""
    preprocessing_file, tokenizer_dir = inference.onnx_companions(output_path)
    torch_loaded.tokenizer.save_pretrained(str(tokenizer_dir))
    if torch_loaded.baseline is not None:
        shutil.copyfile(Path(torch_loaded.source) / fusion.BASELINE_FILE, fusion.baseline_path_of_onnx(output_path))
    toolkit = json.loads(json.dumps(torch_loaded.toolkit))
    toolkit.setdefault("preprocessing", {})["max_length"] = lengths["export"]
    meta = {"task": torch_loaded.task, "toolkit": toolkit,
            "id2label": {str(index): name for index, name in torch_loaded.id2label.items()},
            "source_model": str(Path(torch_loaded.source).resolve()), "max_length": lengths,
            # the graph's positions: loading checks the stored max lengths against them (inference.py)
            "max_position_embeddings": getattr(torch_loaded.config, "max_position_embeddings", None),
            "exporter": args.exporter, "opset": args.opset, "optimized": choice["optimized"],
            "fused_operators": choice["fused"], "quantization": args.quantize, "int8_variant": choice["int8_variant"],
            "inputs": INPUT_NAMES, "output": output_name(torch_loaded.task)}
    preprocessing_file.write_text(json.dumps(meta, indent=2, ensure_ascii=False), encoding="utf-8")
    return meta


def output_name(task):
    return "embedding" if task == "vector" else "logits"


def build_graph(torch_loaded, lengths, args, work_dir):
    """Export, optimize (or not, or whichever is faster: --optimize auto), then quantize as asked.

    Returns the choice: {"graph", "optimized", "fused", "int8_variant", "validation", "optimize_timings",
    "int8_variants"}.
    """
    module = ExportModule(use_eager_attention(torch_loaded.torch_model)).eval()
    inputs = example_inputs(torch_loaded.tokenizer, args.device)
    graphs = {False: export_graph(module, inputs, work_dir / "exported.onnx", args.opset, args.exporter,
                                  output_name(torch_loaded.task))}
    fused = None
    if args.optimize is not False:
        graphs[True], statistics = optimize_graph(graphs[False], work_dir / "optimized.onnx", torch_loaded.config,
                                                  use_gpu=args.device.startswith("cuda"))
        fused = {name: count for name, count in statistics.items() if count}
    choice = {"optimized": args.optimize, "int8_variant": None, "validation": None}
    if args.optimize == "auto":
        choice["optimized"], choice["optimize_timings"] = choose_optimized(graphs, torch_loaded, lengths["export"],
                                                                           args)
    choice.update(graph=graphs[choice["optimized"]], fused=fused if choice["optimized"] else None)
    if args.quantize == "int8":
        choice["int8_variant"], choice["graph"], choice["validation"], choice["int8_variants"] = choose_int8_variant(
            choice["graph"], torch_loaded, lengths["export"], args, work_dir)
    return choice


def describe_choices(choice):
    """The optimize and int8 choices for the JSON report (paths in the work folder left out)."""
    described = {"optimize_timings": choice.get("optimize_timings")}
    if "int8_variants" in choice:
        described["int8_variants"] = [{key: value for key, value in row.items() if key != "graph"}
                                      for row in choice["int8_variants"]]
    return {key: value for key, value in described.items() if value is not None}


def publish(staged_path, output_path):
    """Move a passing export from staging into place, each file by one os.replace.

    An existing tokenizer/ is left as it is: check_shared_tokenizer proved it has the same
    content, and other exports in the folder load it (so it is never missing, even briefly).
    """
    staged_preprocessing, staged_tokenizer = inference.onnx_companions(staged_path)
    preprocessing_file, tokenizer_dir = inference.onnx_companions(output_path)
    if not tokenizer_dir.exists():
        os.replace(staged_tokenizer, tokenizer_dir)
    staged_baseline = fusion.baseline_path_of_onnx(staged_path)
    baseline_file = fusion.baseline_path_of_onnx(output_path)
    if staged_baseline.exists():
        os.replace(staged_baseline, baseline_file)
    elif baseline_file.exists() and output_path.exists():  # the replaced export's baseline: this model has none
        baseline_file.unlink()
    os.replace(staged_preprocessing, preprocessing_file)
    os.replace(staged_path, output_path)


def run_export(args):
    model_dir, output_path = check_export_paths(args)
    check_int8_options(args.quantize, args)
    torch_loaded = inference.load_torch_model(model_dir, args.device)
    lengths = resolve_max_length(args.max_length, torch_loaded)
    if output_path.exists() and not args.overwrite_output:  # after the model's own checks, which name it first
        check_replaceable_export(output_path, model_dir, args.output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    check_shared_tokenizer(output_path, torch_loaded)
    # same folder, so same filesystem: moving the checked files into place is a rename
    staging = Path(tempfile.mkdtemp(prefix=f".{output_path.stem}.staging-", dir=output_path.parent))
    try:
        return export_staged(staging / output_path.name, output_path, torch_loaded, lengths, args)
    except OSError as error:
        if error.filename is not None:  # report_user_errors names that path itself
            raise
        # torch.onnx and onnx write without naming the file: a full disk would otherwise be a traceback
        raise UserError(f"--output-path {output_path}: cannot write the export ({error.strerror or error}); "
                        "nothing was replaced") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def export_staged(staged_path, output_path, torch_loaded, lengths, args):
    """Build the export in staging, gate it, then publish it or keep the graph as <output>.rejected."""
    work_dir = staged_path.parent / "work"
    work_dir.mkdir()
    choice = build_graph(torch_loaded, lengths, args, work_dir)
    os.replace(choice["graph"], staged_path)
    meta = write_companions(staged_path, torch_loaded, lengths, args, choice)
    print(f"exported {torch_loaded.task} model {torch_loaded.source} (exporter {args.exporter}, opset {args.opset}, "
          f"fused {choice['fused'] or 'none'}); checking it before it goes to {output_path}")
    onnx_loaded = inference.load_onnx_model(staged_path, args.device)
    report = build_report(staged_path, onnx_loaded, torch_loaded, meta, args, shown_path=output_path,
                          validation=choice["validation"])
    report.update(describe_choices(choice))
    print(format_report(report))
    if report["passed"]:
        publish(staged_path, output_path)
    else:
        report["rejected_path"] = str(reject(staged_path, output_path))
        print(f"rejected: kept as {report['rejected_path']}; nothing was written to {output_path}", file=sys.stderr)
    write_report(report, args.report_path or default_report_path(output_path, rejected=not report["passed"]))
    return 0 if report["passed"] else EXIT_REJECTED


def run_validate(args):
    onnx_path = Path(args.model_path)
    if onnx_path.suffix != ".onnx" or not onnx_path.is_file():
        raise UserError(f"--model-path {onnx_path}: --validate needs an existing .onnx file")
    inputs = [("--model-path", onnx_path), ("--model-path", inference.onnx_companions(onnx_path)[0]),
              ("--tokenizer-path", args.tokenizer_path or inference.onnx_companions(onnx_path)[1]),
              ("--reference-model", args.reference_model), ("--validation-file", args.validation_file)]
    check_report_path(args, default_report_path(onnx_path), inputs)
    onnx_loaded = inference.load_onnx_model(onnx_path, args.device, args.tokenizer_path)
    meta = inference.read_preprocessing_file(inference.onnx_companions(onnx_path)[0], onnx_path)
    check_int8_options(meta.get("quantization", "none"), args, f"--model-path {onnx_path} (an int8 export)")
    reference = args.reference_model or meta.get("source_model")
    torch_loaded = None
    if reference and Path(reference).is_dir():
        torch_loaded = inference.load_torch_model(reference, args.device)
    else:
        print("note: no torch reference model found (--reference-model); checking the export on its own",
              file=sys.stderr)
    report = build_report(onnx_path, onnx_loaded, torch_loaded, meta, args)
    print(format_report(report))
    write_report(report, args.report_path or default_report_path(onnx_path))  # --validate reports, never renames
    return 0 if report["passed"] else EXIT_REJECTED


@report_user_errors
def main(argv=None):
    args = build_parser().parse_args(argv)
    for flag in ("model_path", "output_path", "validation_file", "tokenizer_path", "reference_model", "report_path"):
        if "\0" in (getattr(args, flag) or ""):  # os calls raise ValueError on it, not OSError
            raise UserError(f"--{flag.replace('_', '-')}: a path cannot contain a NUL byte")
    args.device = inference.resolve_device(args.device)
    check_opset(args)
    resolve_int8_variants(args)
    if args.validate:
        return run_validate(args)
    return run_export(args)


if __name__ == "__main__":
    raise SystemExit(main())
