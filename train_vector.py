"""Fine-tune a BERT bi-encoder on query/document pairs or query groups; mine hard negatives; evaluate; serve.

Examples:
    python train_vector.py --mode train --train_path data/vec_train.json --val_path data/vec_valid.json \
        --model_name bert-base-uncased --max_length 512 --batch_size 16 --learning_rate 2e-5 \
        --num_epochs 3 --save_steps 200 --output-dir ./output/vector_model
    python train_vector.py --mode evaluate --test_path data/vec_test.json --output-dir ./output/vector_model \
        --select_best
    python train_vector.py --mode evaluate --test_path data/vec_test.json --model-path ./output/vector_model \
        --compare-with models/bert-base-uncased --general-path data/general_test.jsonl --max-general-drop 0.01
    python train_vector.py --mode deploy --output-dir ./output/vector_model --host 0.0.0.0 --port 8000
    python train_vector.py --mode mine --train_path data/vec_train.json --model_name bert-base-uncased \
        --range-for-sampling 10-100 --negative-number 15 --output-path data/vec_train_mined.jsonl
    python train_vector.py --mode rotate --train_path data/vec_train.json --model_name bert-base-uncased \
        --matryoshka-dims 768,256,128 --output-dir ./output/vector_model_short

Data: graded {query, document, rel, weight} pairs, or FlagEmbedding's {query, pos: [...], neg: [...]}
query groups (common/pairs.py). Training ranks each query's document above the batch's other
documents and its hard negatives (InfoNCE, gathered across ranks under torchrun; or CoSENT, or a
weighted MSE pulling cos(query, document) towards rel), writes checkpoint-step-N/
every --save_steps (each a model directory with its validation loss), checkpoint-best/,
best_checkpoint.json and train_log.jsonl. Runs under torchrun.
"""
import argparse
import functools
import json
import math
import os
import random
import shutil
import sys
from pathlib import Path

from common import ranking
from common.choices import MATRYOSHKA_ROTATIONS, PAIR_LOSSES, VECTOR_POOLINGS
from common.cli import (ArgumentParser, add_checkpoint_args, add_data_path_args, add_data_text_args, add_flag,
                        add_optimization_args, add_runtime_args, add_vocabulary_args, apply_option_ranges, bounded,
                        exit_on_help, parse_with_config, resolve_default_warmup, write_effective_config)
from common.errors import UserError, report_user_errors

__all__ = ["BertVectorModel", "main"]

# config-file keys whose flag has another name (see configs/vector.yaml)
SECTION_ALIASES = {
    ("model", "name"): "model_name", ("output", "dir"): "output_dir",
    ("scheduler", "type"): "scheduler", ("scheduler", "num_warmup_steps"): "warmup_steps",
    ("logging", "steps"): "logging_steps", ("early_stopping", "metric"): "metric_for_best_model",
}
BEST_FILE = "best_checkpoint.json"
DEFAULT_NEGATIVES_PER_QUERY = 7  # FlagEmbedding's train_group_size 8: one positive, seven negatives
VALIDATION_SPLITS = ("validation", "val", "dev")
NOT_APPLICABLE = ("labels", "text_field", "label_field")  # shared data flags that mean nothing for pairs
SELECTION_RANKING_METRICS = ("ndcg", "mrr")  # --metric-for-best-model ndcg@K, mrr@K (common/ranking.py)


# ---------------------------------------------------------------- arguments

def build_parser():
    parser = ArgumentParser(description=__doc__.split("\n\n")[0],
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_flag(parser, "mode", choices=["train", "evaluate", "deploy", "mine", "rotate"], default="train",
             help="what to do (mine: write --data-path's queries with hard negatives to --output-path; rotate: "
                  "write the untrained encoder to --output-dir turned for --matryoshka-dims, fitted on "
                  "--data-path's texts)")
    add_data_path_args(parser, what="pairs {query, document, rel, weight} or query groups {query, pos, neg}",
                       test_help="test pairs for --mode evaluate (ranking metrics beside a TF-IDF baseline)")
    add_data_text_args(parser)
    add_vocabulary_args(parser)

    group = parser.add_argument_group("model")
    add_flag(group, "model-name", default="bert-base-uncased", help="hub name or local path of the encoder")
    add_flag(group, "max-length", type=int, default=512, help="default token budget per text (special tokens included)")
    add_flag(group, "query-max-length", type=int, default=None, help="token budget of queries (default --max-length)")
    add_flag(group, "doc-max-length", type=int, default=None, help="token budget of documents (default --max-length)")
    add_flag(group, "pooling", choices=VECTOR_POOLINGS, default="mean",
             help="mean of token vectors (how sentence-embedding models are trained) or the CLS vector")
    add_flag(group, "projection-dim", type=int, default=0, help="linear projection to this size (0: none)")
    add_flag(group, "query-instruction", default=None,
             help="text put before every query (BGE style; stored in the model, applied by encode, infer.py, "
                  "the server and ONNX); a record's own 'prompt' replaces it")
    add_flag(group, "passage-instruction", default=None, help="text put before every document (stored likewise)")
    add_flag(group, "matryoshka-dims", type=parse_dims, default=None,
             help="comma-separated embedding sizes (e.g. 384,256,128,64): the loss is summed over the "
                  "embeddings cut to each; the sizes are stored and encode/infer/the server accept them")
    add_flag(group, "matryoshka-weights", type=parse_weights, default=None,
             help="one weight per --matryoshka-dims size, in the same order (e.g. 1,1,2,2; default 1 each): "
                  "the loss is the weighted sum over the sizes, as sentence-transformers' MatryoshkaLoss; "
                  "stored with the sizes")
    add_flag(group, "matryoshka-rotation", choices=MATRYOSHKA_ROTATIONS, default="pca",
             help="with --matryoshka-dims: before training, turn the embeddings by an orthogonal matrix fitted "
                  "on up to 2,048 training texts' embeddings from the starting model, so the first values carry "
                  "the most; full-size similarities are unchanged, cut sizes keep more; stored in every saved "
                  "model (none: cut the values as the encoder gives them)")

    group = add_optimization_args(parser, epochs=3, batch_size=16, eval_batch_size=64)
    add_flag(group, "loss", choices=PAIR_LOSSES, default=None,
             help="infonce (default): in-batch and hard negatives, trained on the pairs with rel > "
                  "--relevance-threshold (or on query groups); "
                  "cosent: rank pairs by rel; mse: weighted MSE of cosine vs rel (the seed's default)")
    add_flag(group, "temperature", type=float, default=0.05, help="InfoNCE softmax temperature")
    add_flag(group, "negatives-per-query", type=bounded(int, minimum=0), default=None,
             help="InfoNCE hard negatives per query per step, drawn from the record's 'neg' (default 7 for "
                  "query groups; 0 for graded pairs, whose rel <= --relevance-threshold pairs are the negatives)")
    add_flag(group, "false-negative-margin", type=bounded(float, minimum=0.0), default=None,
             help="InfoNCE: leave out of each query's softmax every negative (in-batch or hard) whose cosine "
                  "exceeds the query's cosine to its positive minus this margin, a likely unlabelled positive "
                  "(sentence-transformers' GISTEmbedLoss margin, with the model being trained as its own guide: "
                  "a frozen guide would double the forward cost; e.g. 0.1; default: off)")
    add_flag(group, "grad-cache-chunk", type=bounded(int, minimum=0), default=0,
             help="GradCache: embed the batch in chunks of this many texts and backpropagate chunk by chunk "
                  "(a large contrastive batch in about one chunk's memory, the same gradients; 0: off)")

    group = parser.add_argument_group("mine (hard negatives)")
    add_flag(group, "miner", choices=["model", "bm25"], default="model",
             help="retrieve candidates with --model-name (or --model-path) embeddings, or with BM25 (cold start)")
    add_flag(group, "range-for-sampling", type=parse_rank_range, default=(10, 100),
             help="negatives are drawn from these ranks of each query's candidates (1-based, inclusive)")
    add_flag(group, "negative-number", type=bounded(int, minimum=1), default=15, help="negatives written per query")
    add_flag(group, "negative-margin", type=bounded(float), default=0.05,
             help="a candidate scoring above (the query's lowest positive score - this) is a likely false "
                  "negative and left out (BM25 scores are divided by the query's top score first)")
    add_flag(group, "output-path", help="where --mode mine writes the query groups (JSONL; never overwritten)")

    group = add_checkpoint_args(parser, output_dir="./output/vector_model", eval_steps=200, save_steps=200,
                                save_total_limit=0, min_delta=0.0)
    add_flag(group, "k", type=ranking.parse_ks, default=ranking.DEFAULT_KS, help="cut-offs for ranking metrics")
    add_flag(group, "relevance-threshold", type=float, default=0.0,
             help="rel above this counts as relevant for binary NDCG, MRR, MAP and Recall")
    add_flag(group, "metric-for-best-model", type=parse_selection_metric, default=None,
             help="validation figure that picks checkpoint-best, early-stops and --select_best: loss (lowest "
                  "validation loss), or ndcg@K or mrr@K (highest, ranking each validation query's candidate "
                  "documents; the loss is still logged). Default: loss; on --resume, the run's own")
    add_flag(group, "select-best", action="store_true",
             help="evaluate every checkpoint under --output-dir and record the best one by the run's "
                  "--metric-for-best-model (validation figures recorded during training)")
    add_flag(group, "model-path", aliases=("checkpoint-dir", "model-dir"),
             help="model directory to evaluate or serve (default: the best checkpoint under --output-dir)")
    add_flag(group, "metrics-path", help="where --mode evaluate writes its JSON (default: in --output-dir)")
    add_flag(group, "dim", type=bounded(int, minimum=1), default=None,
             help="evaluate embeddings cut to this size (one of the model's --matryoshka-dims)")
    add_flag(group, "compare-with", aliases=("base-model",),
             help="--mode evaluate: the model before fine-tuning (a pretrained encoder, read with --pooling, or a "
                  "vector model directory), scored beside the tuned one on --test-path and --general-path, with "
                  "the mean score of relevant and other pairs (fine-tuning moves the cosines; the ranking is NDCG)")
    add_flag(group, "general-path",
             help="with --compare-with: held-out pairs from outside the training domain (any format --test-path "
                  "takes), to see whether fine-tuning cost general retrieval")
    add_flag(group, "max-general-drop", type=bounded(float, minimum=0.0), default=None,
             help="with --general-path: exit 1 when the tuned model's NDCG@K (the largest --k) there is more than "
                  "this below the base model's (0.01: one point); the figures are written first")

    group = parser.add_argument_group("deploy (HTTP server)")
    add_flag(group, "host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    add_flag(group, "port", type=int, default=8000, help="port to listen on")
    add_flag(group, "corpus", help="JSONL of {id, text} encoded at start-up for POST /search; for --mode mine "
                                   "the texts negatives come from (default: the data's documents)")
    add_flag(group, "api-key", default=None, help="require 'Authorization: Bearer KEY' (or env TOOLKIT_API_KEY)")
    add_flag(group, "max-texts", type=int, default=64, help="texts per request")
    add_flag(group, "max-chars", type=int, default=10000, help="characters per text")
    add_flag(group, "max-batch-size", type=int, default=64, help="texts merged into one forward pass (1: no merging)")
    add_flag(group, "batch-wait-ms", type=float, default=5.0, help="how long a request waits for others to batch with")
    add_flag(group, "max-queue", type=int, default=None,
             help="requests that may wait for the model (default 256); past it a new one gets 429 at once")
    add_flag(group, "max-batch-tokens", type=int, default=None,
             help="tokens per batch of merged requests (default 16384, as TEI); a longer request runs alone")
    add_flag(group, "workers", type=int, default=1,
             help="server processes on the one port, each with its own copy of the model and its share of the "
                  "CPU cores (docs/infer.md: replicas behind a load balancer)")
    # one epoch at 2e-5 barely moves the encoder (bench/README.md, retrieval quality)
    parser.set_defaults(learning_rate=5e-5)
    add_runtime_args(parser)
    for action in parser._actions:  # shared classification flags stay parseable (for a clear error), unlisted
        if action.dest in NOT_APPLICABLE:
            action.help = argparse.SUPPRESS
    return apply_option_ranges(parser)


def parse_dims(text):
    """--matryoshka-dims "384,256,128" -> [384, 256, 128] (distinct positive sizes, in the order given:
    --matryoshka-weights pairs with it; parse_args sorts both, largest first)."""
    try:
        dims = [int(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None
    if not dims or min(dims) < 1 or len(set(dims)) != len(dims):
        raise argparse.ArgumentTypeError(f"expected distinct positive integers, got {text!r}")
    return dims


def parse_weights(text):
    """--matryoshka-weights "1,1,2" -> [1.0, 1.0, 2.0] (positive finite numbers)."""
    try:
        weights = [float(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive numbers, got {text!r}") from None
    if not weights or not all(math.isfinite(weight) and weight > 0 for weight in weights):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return weights


def resolve_matryoshka(args):
    """Pair --matryoshka-weights with --matryoshka-dims in the order given, then sort both by size,
    largest first (the order the model stores)."""
    dims, weights = args.matryoshka_dims, args.matryoshka_weights
    if weights is not None and not dims:
        raise UserError("--matryoshka-weights needs --matryoshka-dims (one weight per size)")
    if weights is not None and len(weights) != len(dims):
        raise UserError(f"--matryoshka-weights: {len(weights)} weights for the {len(dims)} --matryoshka-dims sizes "
                        f"{','.join(map(str, dims))}; give one per size")
    if dims:
        pairs = sorted(zip(dims, weights or [None] * len(dims)), reverse=True)
        args.matryoshka_dims = [dim for dim, _ in pairs]
        args.matryoshka_weights = None if weights is None else [weight for _, weight in pairs]


def parse_selection_metric(text):
    """--metric-for-best-model "ndcg@10" -> "ndcg@10": loss, or ndcg@K / mrr@K with K a positive integer."""
    text = str(text).strip().lower()
    name, _, k = text.partition("@")
    if text == "loss" or (name in SELECTION_RANKING_METRICS and k.isdigit() and int(k) >= 1):
        return text if text == "loss" else f"{name}@{int(k)}"
    raise argparse.ArgumentTypeError(f"expected loss, ndcg@K or mrr@K (K a positive integer), got {text!r}")


def parse_rank_range(text):
    """--range-for-sampling "10-100" -> (10, 100): 1-based ranks, first <= last."""
    first, _, last = str(text).partition("-")
    try:
        first, last = int(first), int(last)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected FIRST-LAST ranks such as 10-100, got {text!r}") from None
    if not 1 <= first <= last:
        raise argparse.ArgumentTypeError(f"expected 1 <= FIRST <= LAST, got {text!r}")
    return first, last


def parse_args(argv=None):
    args = parse_with_config(build_parser(), argv, SECTION_ALIASES)
    for name in NOT_APPLICABLE:
        if getattr(args, name, None):
            raise UserError(f"--{name.replace('_', '-')} does not apply to train_vector.py "
                            "(records are {query, document, rel, weight})")
    resolve_default_warmup(args, warmup_steps=100)
    resolve_matryoshka(args)
    if args.mode == "train":
        args.loss = args.loss or "infonce"  # when evaluating, no --loss means the loss the model was trained with
        if args.false_negative_margin is not None and args.loss != "infonce":
            raise UserError(f"--false-negative-margin applies to --loss infonce only (not {args.loss})")
        checkpoints.check_resume_argument(args.resume)
        adaptation.resolve_vocabulary_options(args)
    check_comparison_flags(args)
    check_rotation_flags(args)
    required = {"train": ("data_path", "val_path"), "evaluate": ("test_path",), "deploy": (),
                "mine": ("data_path", "output_path"), "rotate": ("data_path",)}[args.mode]
    for name in required:
        if not getattr(args, name):
            raise UserError(f"--mode {args.mode} needs --{name.replace('_', '-')}")
    return args


def check_comparison_flags(args):
    """--compare-with, --general-path and --max-general-drop: one evaluation of one model against its base."""
    given = [f"--{name.replace('_', '-')}" for name in ("compare_with", "general_path", "max_general_drop")
             if getattr(args, name) is not None]
    if not given:
        return
    if args.mode != "evaluate" or args.select_best:
        where = "--select-best" if args.mode == "evaluate" else f"--mode {args.mode}"
        raise UserError(f"{given[0]} applies to --mode evaluate of one model, not {where}")
    if args.compare_with is None:
        raise UserError(f"{given[0]} needs --compare-with BASE_MODEL (the model before fine-tuning)")
    if args.max_general_drop is not None and args.general_path is None:
        raise UserError("--max-general-drop needs --general-path (held-out pairs from outside the training domain)")


def check_rotation_flags(args):
    """--mode rotate trains nothing, so it refuses what would need training, and needs the sizes to turn for."""
    if args.mode != "rotate":
        return
    if not args.matryoshka_dims:
        raise UserError("--mode rotate needs --matryoshka-dims (the sizes the turned vectors may be cut to, "
                        "e.g. 384,256,128)")
    if args.matryoshka_rotation == "none":
        raise UserError("--mode rotate turns by --matryoshka-rotation pca; with none there is nothing to do")
    if args.model_path:
        raise UserError("--model-path: --mode rotate turns the encoder --model-name names (a model directory this "
                        "toolkit wrote works there too, read with --pooling)")
    untrainable = [flag for flag, value in (("--projection-dim", args.projection_dim),
                                            ("--extend-vocab", args.extend_vocab),
                                            ("--mlm-adapt-steps", args.mlm_adapt_steps)) if value]
    if untrainable:
        raise UserError(f"{untrainable[0]}: --mode rotate trains nothing, so what it adds would stay untrained "
                        "(use --mode train)")


# --help answers before the imports below: they load torch, which takes seconds (common/cli.py)
if __name__ == "__main__":
    exit_on_help(build_parser)

import torch  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from common import (adaptation, checkpoints, data, distributed, files, model_card, modeldir,  # noqa: E402
                    optimization, rundir, training)
from common.metrics import selection_mode  # noqa: E402
from common.pair_losses import compute_pair_loss  # noqa: E402
from common.gradcache import grad_cache_backward  # noqa: E402
from common.pairs import (GroupCollator, PairCollator, QueryGroup, QueryGroupDataset, build_group_dataset,  # noqa: E402
                          build_pair_dataset, load_pairs, pairs_to_groups)
from common.text import build_normalizer  # noqa: E402
from common.modeldir import read_json_if_exists  # noqa: E402
from common.vector import (ROTATION_SAMPLE, BertVectorModel, PairEncoder, evaluate_pairs, fit_rotation,  # noqa: E402
                           load_rotation, score_pairs)
from common.vocab import fit_embeddings_to_tokenizer  # noqa: E402


# ---------------------------------------------------------------- data

def load_splits(args, names):
    """Read and validate the named splits ('train', 'val', 'test') before anything expensive.

    Each split is a list of graded pairs (query groups flattened: positive rel 1, negative 0), or for
    InfoNCE with hard negatives, a list of QueryGroups (see uses_query_groups).
    """
    paths = {"train": (args.data_path, args.data_split, ("train",)),
             "val": (args.val_path, None, VALIDATION_SPLITS), "test": (args.test_path, None, ("test",)),
             "general": (args.general_path, None, ("test",))}
    rel_default = 1.0 if args.loss == "infonce" else None  # InfoNCE users may have positives only
    splits = {}
    for name in names:
        path, split, default_splits = paths[name]
        splits[name] = load_pairs(path, args.skip_invalid, rel_default, split, default_splits)
    data.report_skipped(*splits.values())
    if "val" in splits and uses_ranking_selection(args):
        splits["val_candidates"] = validation_candidates(splits["val"], args)
    if args.loss == "infonce":
        for name in set(splits) & {"train", "val"}:
            splits[name] = training_examples(splits[name], name, args)
    return splits


def uses_ranking_selection(args):
    return (args.metric_for_best_model or "loss") != "loss"


def validation_candidates(pairs, args):
    """The validation pairs as ranked for --metric-for-best-model ndcg@K / mrr@K: each query's labelled
    documents (graded pairs, or a query group's positives and negatives)."""
    candidates = {}
    for pair in pairs:
        candidates.setdefault(pair.query, []).append(pair.rel)
    if not any(len(rels) > 1 and max(rels) > args.relevance_threshold for rels in candidates.values()):
        raise UserError(f"--metric-for-best-model {args.metric_for_best_model}: no validation query has a relevant "
                        f"document (rel > {args.relevance_threshold}) among two or more candidates to rank; give "
                        "graded pairs or query groups with negatives, or select by loss")
    return list(pairs)


def training_examples(pairs, name, args):
    """What InfoNCE trains on: query groups (each query's positives and hard negatives) when the file
    is in that format or --negatives-per-query asks for hard negatives, else the positive pairs."""
    if not negatives_per_query(args, pairs.record_format):
        return keep_positive_pairs(pairs, name, args.relevance_threshold)
    groups = pairs.groups if pairs.record_format == "groups" else pairs_to_groups(pairs, args.relevance_threshold)
    if not groups:
        raise UserError(f"the {name} data has no positive pairs (rel > {args.relevance_threshold}) for --loss infonce")
    without = sum(not group.negatives for group in groups)
    print(f"--loss infonce: {name}: {len(groups)} queries, {negatives_per_query(args, 'groups')} hard negatives "
          "each per step"
          + (f" ({without} have none: in-batch negatives only)" if without else ""))
    return groups


def negatives_per_query(args, record_format):
    """--negatives-per-query, else 7 for query-group files and 0 (in-batch negatives only) for graded pairs."""
    if args.negatives_per_query is not None:
        return args.negatives_per_query
    return DEFAULT_NEGATIVES_PER_QUERY if record_format == "groups" else 0


def example_texts(example):
    """Every text of a pair or a query group (the domain text for vocabulary and adaptation)."""
    if isinstance(example, QueryGroup):
        return [example.query, *example.positives, *example.negatives]
    return [example.query, example.document]


def turn_before_training(encoder, examples, args, resume_from):
    """--matryoshka-rotation pca (with --matryoshka-dims): turn the starting model (after --mlm-adapt-steps)
    by common.vector.fit_rotation, so the Matryoshka loss trains prefixes that already hold the strongest
    directions; the rotation stays fixed, and every saved model applies it. A resumed run takes the one
    its checkpoint stored."""
    if not args.matryoshka_dims or args.matryoshka_rotation == "none":
        return
    _, stored = modeldir.read_model_config(resume_from, "--resume") if resume_from else (None, {})
    if stored.get("vector", {}).get("rotation"):
        rotation = load_rotation(resume_from, encoder.dim)
    else:
        rotation = fit_rotation(encoder, *rotation_texts(examples, args.seed))
    encoder.rotation = rotation.to(next(encoder.parameters()).device)


def rotation_texts(examples, seed):
    """(queries, documents, the queries' prompts): up to ROTATION_SAMPLE distinct training texts, half of them
    queries where there are enough, drawn with ``seed``, that the rotation is fitted on."""
    queries = list(dict.fromkeys((example.prompt, example.query) for example in examples))
    documents = list(dict.fromkeys(text for example in examples for text in example_texts(example)[1:]))
    draw = random.Random(seed)  # its own generator: the training's random state is untouched
    queries = draw.sample(queries, min(len(queries), max(ROTATION_SAMPLE // 2, ROTATION_SAMPLE - len(documents))))
    documents = draw.sample(documents, min(len(documents), ROTATION_SAMPLE - len(queries)))
    return [query for _, query in queries], documents, [prompt for prompt, _ in queries]


def keep_positive_pairs(pairs, name, threshold):
    """InfoNCE learns from positive pairs only (the batch supplies the negatives)."""
    positives = [pair for pair in pairs if pair.rel > threshold]
    if not positives:
        raise UserError(f"the {name} data has no positive pairs (rel > {threshold}) for --loss infonce")
    if len(positives) < len(pairs):
        print(f"--loss infonce: {name}: using the {len(positives)} positive pairs "
              f"(left out {len(pairs) - len(positives)} with rel <= {threshold})")
    return positives


def encode_splits(splits, tokenizer, model, args):
    """Tokenize every split once (queries and documents at their own lengths); print a summary and
    return (datasets, summaries) like the other trainers (for dataset_summary.json)."""
    datasets, summaries = {}, []
    lengths = (model.max_length_for("query"), model.max_length_for("document"), model.preprocessing)
    for name, examples in splits.items():
        if isinstance(examples[0], QueryGroup):
            stats = {"split": name, "queries": len(examples), "positives": sum(len(g.positives) for g in examples),
                     "negatives": sum(len(g.negatives) for g in examples)}
            datasets[name] = build_group_dataset(tokenizer, examples, *lengths, negatives_per_query(args, "groups"),
                                                 args.seed, stats)
            counts = f"{stats['queries']} queries, {stats['positives']} positives, {stats['negatives']} negatives"
        else:
            stats = {"split": name, "pairs": len(examples), "queries": len({p.query for p in examples})}
            datasets[name] = build_pair_dataset(tokenizer, examples, *lengths, stats)
            counts = f"{len(examples)} pairs, {stats['queries']} queries"
        print(f"  {name}: {counts}; query tokens "
              f"p50={stats['query_tokens']['p50']} max={stats['query_tokens']['max']} "
              f"({stats['queries_truncated']} at the limit); document tokens p50={stats['document_tokens']['p50']} "
              f"max={stats['document_tokens']['max']} ({stats['documents_truncated']} at the limit)")
        summaries.append(stats)
    return datasets, summaries


def collator_for(dataset, pad_token_id):
    return GroupCollator(pad_token_id) if isinstance(dataset, QueryGroupDataset) else PairCollator(pad_token_id)


def build_train_loader(dataset, args, context):
    sampler = data.LengthGroupedBatchSampler(dataset.lengths, args.batch_size, shuffle=True, seed=args.seed,
                                             group_by_length=args.group_by_length, rank=context.rank,
                                             world_size=context.world_size)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler,
                                       collate_fn=collator_for(dataset, args.pad_token_id),
                                       num_workers=args.num_workers, pin_memory=torch.cuda.is_available(),
                                       generator=data.private_generator(args.seed))


def build_eval_loader(dataset, args, context):
    """This rank's shard in fixed batches (in-batch negatives of InfoNCE stay the same run to run)."""
    shard = torch.utils.data.Subset(dataset, data.shard_indices(len(dataset), context.rank, context.world_size))
    sampler = data.LengthGroupedBatchSampler([dataset.lengths[i] for i in shard.indices], args.eval_batch_size,
                                             shuffle=False, group_by_length=False)
    return torch.utils.data.DataLoader(shard, batch_sampler=sampler,
                                       collate_fn=collator_for(dataset, args.pad_token_id))


# ---------------------------------------------------------------- model

def checked_normalize_spec(args, examples):
    """--normalize's stored spec (None without it), once no text of ``examples`` is emptied by it (one line
    otherwise); the model applies it to every text it encodes."""
    if not args.normalize:
        return None
    from common.text import normalizer_spec
    spec = normalizer_spec(args.normalize)
    data.normalize_texts(examples, build_normalizer(spec))
    return spec


def build_model(args, tokenizer, normalize_spec, domain_texts=()):
    backbone = modeldir.load_pretrained_backbone(args.model_name, args.trust_remote_code)
    fit_embeddings_to_tokenizer(backbone, tokenizer, args.new_token_init, domain_texts)  # after --extend-vocab
    model = BertVectorModel(backbone, args.pooling, args.projection_dim or None, True, args.query_max_length,
                            args.doc_max_length, args.max_length, args.truncation_side, normalize_spec,
                            args.query_instruction, args.passage_instruction, args.matryoshka_dims,
                            args.matryoshka_weights)
    if args.matryoshka_dims and max(args.matryoshka_dims) > model.dim:
        raise UserError(f"--matryoshka-dims {max(args.matryoshka_dims)}: larger than the {model.dim}-dimensional "
                        "embeddings of this model")
    model.tokenizer = tokenizer
    return model


def load_vector_model(directory, args):
    """A toolkit vector model directory, or (for a baseline) a plain pretrained encoder with --pooling."""
    config = read_json_if_exists(Path(directory) / modeldir.CONFIG_FILE)
    if config is not None and "toolkit" not in config and (Path(directory) / modeldir.WEIGHTS_FILE).is_file():
        print(f"{directory}: a pretrained encoder, not a trained vector model: evaluating it with "
              f"--pooling {args.pooling} (untuned baseline)")
        return BertVectorModel.from_backbone(
            str(directory), args.trust_remote_code, flag="--model-path", pooling=args.pooling, projection_dim=None,
            query_max_length=args.query_max_length, doc_max_length=args.doc_max_length,
            max_length=args.max_length, truncation_side=args.truncation_side).to(args.device_obj).eval()
    return BertVectorModel.from_pretrained(directory, args.device_obj)


def vector_writer(model, args, summary=None):
    """A function writing the model directory (weights, config with the toolkit block, tokenizer,
    training_args.json) into a folder. ``summary`` (step and validation loss) goes to
    trainer_state.json, so checkpoint-best competes with the step checkpoints for best model."""
    def write(folder):
        vector_model(model).save_pretrained(folder)
        write_effective_config(args, folder)
        if summary is not None:
            (Path(folder) / checkpoints.TRAINER_SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    return write


def publish_model(source_dir, save_path):
    """Put the best model's files at the top of --output-dir, where the seed's usage snippet loads them.

    Hard links where the file system allows (no second copy of the weights), each file replaced
    atomically, so a reader never sees a half-written model.
    """
    for source in Path(source_dir).iterdir():
        if not source.is_file() or source.name in (checkpoints.TRAINER_STATE_FILE, checkpoints.TRAINER_SUMMARY_FILE,
                                                   checkpoints.CHECKSUM_FILE):
            continue  # resume state stays with its checkpoint: the top level is a model directory only
        staged = Path(save_path) / f".{source.name}.publishing"
        staged.unlink(missing_ok=True)
        try:
            os.link(source, staged)
        except OSError:
            shutil.copyfile(source, staged)
        os.replace(staged, Path(save_path) / source.name)


def vector_model(model):
    """The BertVectorModel inside DDP and the PairEncoder."""
    return distributed.unwrap(model).encoder


# ---------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate_loss(pair_encoder, loader, args, context):
    """Mean loss over the whole split (gathered across ranks), weighted by batch size."""
    was_training = pair_encoder.training
    pair_encoder.eval()
    loss_sum, count = 0.0, 0
    for batch in tqdm(loader, desc="evaluate", leave=False, disable=None):  # None: only on a terminal
        with args.precision_obj.autocast(args.device_obj):
            query_embeddings, doc_embeddings = pair_encoder(modeldir.to_device(batch["query"], args.device_obj),
                                                            modeldir.to_device(batch["document"], args.device_obj))
        loss = compute_pair_loss(args.loss, query_embeddings, doc_embeddings, batch, args.temperature,
                                 args.matryoshka_dims, args.matryoshka_weights,
                                 false_negative_margin=args.false_negative_margin)
        loss_sum += float(loss) * len(batch["rel"])
        count += len(batch["rel"])
    pair_encoder.train(was_training)
    totals = distributed.gather_objects(context, (loss_sum, count))
    return sum(total for total, _ in totals) / max(1, sum(n for _, n in totals))


@torch.no_grad()
def evaluate_ranking(pair_encoder, pairs, args, context):
    """--metric-for-best-model's ranking figure over the validation queries' candidate documents; each rank
    scores its share of the queries, every rank gets the whole set's figure."""
    queries = list(dict.fromkeys(pair.query for pair in pairs))
    mine = {queries[index] for index in data.shard_indices(len(queries), context.rank, context.world_size)}
    shard = [pair for pair in pairs if pair.query in mine]
    scored = score_pairs(pair_encoder.encoder, shard, args.eval_batch_size) if shard else []
    scored = [query for part in distributed.gather_objects(context, scored) for query in part]
    k = int(args.metric_for_best_model.partition("@")[2])
    return ranking.ranking_metrics(scored, (k,), args.relevance_threshold)[args.metric_for_best_model]


def evaluate_validation(pair_encoder, val_loader, candidates, args, context):
    """{"loss": validation loss, and the --metric-for-best-model figure when it is a ranking metric}."""
    figures = {"loss": evaluate_loss(pair_encoder, val_loader, args, context)}
    if candidates is not None:
        figures[args.metric_for_best_model] = evaluate_ranking(pair_encoder, candidates, args, context)
    return figures


# ---------------------------------------------------------------- the training loop

def forward_backward(model, batch, args, context, scaler, sync, statistics=None):
    """One batch's loss, backpropagated (scaled for fp16 and accumulation); DDP all-reduces when ``sync``.

    Plain: one forward of the whole batch. --grad-cache-chunk: GradCache, chunk by chunk. Either way the
    loss sees the whole batch's embeddings at once (the --false-negative-margin mask included), and
    ``statistics`` counts the negatives that mask removed.
    """
    device, precision = args.device_obj, args.precision_obj
    query, document = modeldir.to_device(batch["query"], device), modeldir.to_device(batch["document"], device)
    # a gathered InfoNCE loss is the whole batch's on every rank, and DDP averages the ranks' gradients
    rank_scale = context.world_size if context.enabled and args.loss == "infonce" else 1

    def batch_loss(query_embeddings, doc_embeddings):
        return compute_pair_loss(args.loss, query_embeddings, doc_embeddings, batch, args.temperature,
                                 args.matryoshka_dims, args.matryoshka_weights, gather=context.enabled,
                                 false_negative_margin=args.false_negative_margin, statistics=statistics)

    def backward(loss):
        scaler.scale(loss * rank_scale / args.gradient_accumulation_steps).backward()
    if args.grad_cache_chunk:
        return grad_cache_backward(model, query, document, args.grad_cache_chunk, batch_loss, backward,
                                   lambda: precision.autocast(device),
                                   lambda last: distributed.sync_gradients(model, sync and last), device)
    with distributed.sync_gradients(model, sync):
        with precision.autocast(device):
            query_embeddings, doc_embeddings = model(query, document)
        loss = batch_loss(query_embeddings, doc_embeddings)
        backward(loss)
    return loss


def train(args, model, datasets, context, output_dir, logger, resume_from=None, val_candidates=None):
    """The loop; ``val_candidates``: the validation pairs ranked for --metric-for-best-model ndcg@K / mrr@K."""
    device, precision = args.device_obj, args.precision_obj
    metric = args.metric_for_best_model
    train_loader = build_train_loader(datasets["train"], args, context)
    val_loader = build_eval_loader(datasets["val"], args, context)
    optimizer, scheduler, scaler, total_steps = optimization.build_optimization(model, args, len(train_loader),
                                                                               device, precision)
    early_stopping = training.EarlyStopping(args.patience, args.min_delta, selection_mode(metric))
    nonfinite_guard = optimization.NonFiniteLossGuard(args.max_nonfinite_steps, device, not scaler.is_enabled())
    # ---- resume: model weights, optimizer, scheduler, scaler, RNG, position, early stopping
    global_step, start_epoch, skip_batches, evaluated_step, resumed_state = checkpoints.resume_training(
        resume_from, vector_model(model), optimizer, scheduler, scaler, early_stopping, logger)
    evaluated = validation_summary(resumed_state.get("summary", {}))  # at evaluated_step
    training.log_training_start(logger, args, context, output_dir, total_steps,
                                {"queries" if isinstance(datasets["train"], QueryGroupDataset) else "pairs":
                                 len(datasets["train"]), "validation": len(datasets["val"])},
                                settings={"loss": args.loss, "metric_for_best_model": metric,
                                          "false_negative_margin": args.false_negative_margin})

    def validate():
        return evaluate_validation(distributed.unwrap(model), val_loader, val_candidates, args, context)

    def run_evaluation(epoch):
        """Validation loss (and ranking metric) -> early stopping; save checkpoint-best on improvement."""
        nonlocal evaluated_step, evaluated
        evaluated_step = global_step  # the same weights are never scored twice
        evaluated = validate()
        summary = {"global_step": global_step, **summarize_validation(evaluated), "run_id": args.run_id}
        improved = checkpoints.save_if_best(early_stopping, evaluated[metric], global_step, output_dir,
                                            vector_writer(model, args, summary), context.is_main)
        logger.log(training.evaluation_row(global_step, epoch, evaluated, early_stopping, improved))

    def run_save(epoch, batches_done):
        """checkpoint-step-N with the validation figures at step N (measured now if not yet)."""
        figures = evaluated if evaluated_step == global_step and evaluated else validate()
        if context.is_main:
            state = checkpoints.training_state(
                optimizer, scheduler, scaler, early_stopping, args, epoch=epoch, step_in_epoch=batches_done,
                global_step=global_step, evaluated_step=evaluated_step, summary=summarize_validation(figures))
            checkpoints.save_checkpoint(output_dir, vector_writer(model, args), state, args.save_total_limit)

    if training.evaluation_due_at_start(resume_from, global_step, evaluated_step, total_steps, early_stopping):
        run_evaluation(start_epoch)  # the untuned encoder (it competes), or final weights a kill left unscored
    model.train()
    meter = training.TrainingMeter(device)  # loss and throughput for the log rows
    progress = tqdm(total=total_steps, initial=global_step, disable=not context.is_main, desc="train")
    epoch, batches_done, saved_step = start_epoch, skip_batches, None
    masking = {} if args.false_negative_margin is not None else None  # negatives the margin removed, this epoch
    for epoch in range(start_epoch, args.epochs):
        if global_step >= total_steps or early_stopping.should_stop:
            break
        train_loader.batch_sampler.set_epoch(epoch, skip_batches)
        if isinstance(datasets["train"], QueryGroupDataset):
            datasets["train"].set_epoch(epoch)  # this epoch's positive and negatives of each query
        batches_done, batches_in_epoch = skip_batches, len(train_loader.batch_sampler.all_batches())
        for batch in train_loader:
            batches_done += 1
            window_ends = batches_done % args.gradient_accumulation_steps == 0 or batches_done == batches_in_epoch
            # ---- forward under autocast, scaled backward (gradient sync only on the window's last pass)
            loss = forward_backward(model, batch, args, context, scaler, window_ends, masking)
            meter.add(loss, len(batch["rel"]) * context.world_size)
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
                logger.log(meter.row(global_step, epoch, scheduler.get_last_lr()[0], grad_norm)
                           | masked_negative_shares(masking), progress)
            epoch_ends = batches_done == batches_in_epoch
            if training.evaluation_due(global_step, args.eval_steps, epoch_ends, total_steps):
                run_evaluation(epoch)
            if training.is_due(global_step, args.save_steps):
                run_save(epoch, batches_done)
                saved_step = global_step
            distributed.barrier(context)
            if global_step >= total_steps or early_stopping.should_stop:
                break
        skip_batches = 0
        if masking:
            logger.info(describe_masking(epoch, masking, args.false_negative_margin))
            masking.clear()
        if evaluated_step != global_step:
            run_evaluation(epoch)  # its last step was skipped (non-finite loss)
        if early_stopping.should_stop:
            logger.info(f"early stopping: validation {metric} did not improve in {args.patience} evaluations")
            break
    if saved_step != global_step and global_step > 0 and not (output_dir / checkpoint_name(global_step)).is_dir():
        run_save(epoch, batches_done)  # the final weights are always a checkpoint
    progress.close()
    nonfinite_guard.report(logger)
    return early_stopping


def checkpoint_name(step):
    return f"{checkpoints.CHECKPOINT_PREFIX}{step}"


def masking_counts(masking):
    """(kind, masked, negatives) as ints for each kind of negative (in_batch, hard) the epoch had so far."""
    for kind in ("in_batch", "hard"):
        negatives = int((masking or {}).get(f"{kind}_negatives", 0))
        if negatives:
            yield kind, int(masking[f"{kind}_masked"]), negatives


def masked_negative_shares(masking):
    """Log-row fields: the shares of in-batch and hard negatives --false-negative-margin removed this epoch."""
    return {f"masked_{kind}_share": masked / negatives for kind, masked, negatives in masking_counts(masking)}


def describe_masking(epoch, masking, margin):
    parts = [f"{masked} of {negatives} {kind.replace('_', '-')} negatives ({masked / negatives:.1%})"
             for kind, masked, negatives in masking_counts(masking)]
    return f"epoch {epoch}: --false-negative-margin {margin} left out {' and '.join(parts)}"


# ---------------------------------------------------------------- checkpoints: which is best

def resolve_selection_metric(metric, resume_from):
    """--metric-for-best-model when given, else the resumed run's (its early-stopping state is in that
    metric's units), else loss."""
    if metric:
        return metric
    options = (checkpoints.checkpoint_summary(resume_from) or {}).get("options", {}) if resume_from else {}
    return options.get("metric_for_best_model") or "loss"


def run_selection_metric(metric, save_path):
    """--metric-for-best-model when given, else the one the run under ``save_path`` trained with, else loss."""
    trained = read_json_if_exists(Path(save_path) / "training_args.json") or {}
    return metric or trained.get("metric_for_best_model") or "loss"


def summarize_validation(figures):
    """What a checkpoint records of its validation ({"loss": ..., "ndcg@10": ...}): val_loss, val_ndcg@10."""
    return {f"val_{name}": value for name, value in figures.items()}


def validation_summary(summary):
    """summarize_validation's inverse, from a checkpoint's trainer_state.json summary ({} when none)."""
    return {name.removeprefix("val_"): value for name, value in summary.items() if name.startswith("val_")}


def checkpoint_validation(directory, metric):
    """The validation ``metric`` (loss, ndcg@10, ...) recorded in a checkpoint's trainer_state.json (None if absent)."""
    summary = read_json_if_exists(Path(directory) / checkpoints.TRAINER_SUMMARY_FILE) or {}
    value = summary.get(f"val_{metric}")
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def checkpoint_val_loss(directory):
    """The validation loss recorded in a checkpoint's trainer_state.json (None if absent)."""
    return checkpoint_validation(directory, "loss")


def best_checkpoint(save_path, metric):
    """(directory, value) of the checkpoint with the best recorded validation ``metric`` (the lowest loss,
    the highest ranking figure), or (None, None)."""
    # checkpoint-best survives --save_total_limit; listed last, so a tie goes to the step checkpoint
    directories = [*checkpoints.list_checkpoints(save_path, run_id_of(save_path)), Path(save_path) / "checkpoint-best"]
    sign = 1 if selection_mode(metric) == "min" else -1
    candidates = [(checkpoint_validation(d, metric), index, d) for index, d in enumerate(directories)]
    candidates = [(sign * value, index, d) for value, index, d in candidates if value is not None]
    if not candidates:
        return None, None
    key, _, directory = min(candidates)
    return directory, sign * key


def run_id_of(save_path):
    """The run whose checkpoints compete for best (another run's never do); None for older directories."""
    return (rundir.read_run_record(save_path) or {}).get("run_id")


def write_best_record(save_path, directory, metric, value, selected_by, extra=None):
    """best_checkpoint.json; the training run's comparison with the untuned model is kept on a rewrite."""
    earlier = read_json_if_exists(Path(save_path) / BEST_FILE) or {}
    record = {key: earlier[key] for key in ("untuned", "untuned_beaten") if key in earlier}
    record.update({"checkpoint": Path(directory).name, "val_loss": checkpoint_val_loss(directory),
                   "metric_for_best_model": metric, "value": value,
                   "selected_by": f"{'lowest' if selection_mode(metric) == 'min' else 'highest'} validation "
                                  f"{metric} ({selected_by})"})
    record.update(extra or {})
    path = Path(save_path) / BEST_FILE
    path.write_text(json.dumps(record, indent=2, ensure_ascii=False), encoding="utf-8")
    return path


def resolve_best_model_dir(save_path):
    """best_checkpoint.json, else the best checkpoint by the run's validation metric, else checkpoint-best,
    else save_path."""
    save_path = Path(save_path)
    record = read_json_if_exists(save_path / BEST_FILE)
    if record and (save_path / str(record.get("checkpoint"))).is_dir():
        return save_path / record["checkpoint"]
    directory, _ = best_checkpoint(save_path, run_selection_metric(None, save_path))
    if directory is not None:
        return directory
    if (save_path / "checkpoint-best").is_dir():
        return save_path / "checkpoint-best"
    if (save_path / modeldir.CONFIG_FILE).is_file():
        return save_path
    raise UserError(f"--output-dir {save_path}: no checkpoint found (train first, or pass --model-path)")


# ---------------------------------------------------------------- logging

def describe_evaluation(row):
    figures = [f"{name.removeprefix('eval_')} {value:.5f}" for name, value in row.items()
               if name.startswith("eval_") and name != "eval_loss"]
    return f"step {row['step']}: validation loss {row['eval_loss']:.5f}" + "".join(f", {figure}" for figure in figures)


# ---------------------------------------------------------------- modes

def run_training(args, context):
    # ---- validate everything cheap before loading the model or tokenizing
    run_dir, resume_from = training.claim_run_dir(args, context, "train_vector.py")
    output_dir = run_dir.path
    args.metric_for_best_model = resolve_selection_metric(args.metric_for_best_model, resume_from)
    checkpoints.check_resume(resume_from, args)
    splits = load_splits(args, ("train", "val"))
    val_candidates = splits.pop("val_candidates", None)
    normalize_spec = checked_normalize_spec(args, splits)
    modeldir.check_max_lengths(args.model_name, args, args.trust_remote_code)
    tokenizer = modeldir.load_tokenizer(args.model_name, args.trust_remote_code)
    train_texts = dict.fromkeys(text for example in splits["train"] for text in example_texts(example))
    normalize = build_normalizer(normalize_spec)
    domain_texts = adaptation.prepare_domain(args, tokenizer, map(normalize, train_texts), normalize)
    args.pad_token_id = tokenizer.pad_token_id

    # ---- model, then tokenize every split once at the model's query/document lengths
    model = build_model(args, tokenizer, normalize_spec, domain_texts)
    if context.is_main:
        print("dataset summary:")
    datasets, summaries = encode_splits(splits, tokenizer, model, args)
    if context.is_main:  # data and model are checked: only now may an earlier run's outputs go
        run_dir.begin()
        write_effective_config(args, output_dir)
        (output_dir / "dataset_summary.json").write_text(json.dumps(summaries, indent=2, ensure_ascii=False),
                                                          encoding="utf-8")
    model = PairEncoder(model).to(args.device_obj)
    adaptation.adapt_before_training(vector_model(model).backbone, tokenizer, domain_texts, args, resume_from,
                                     context.is_main)
    turn_before_training(vector_model(model), splits["train"], args, resume_from)  # DDP then shares rank 0's
    if context.enabled:
        model = DistributedDataParallel(model, device_ids=[args.device_obj.index]
                                        if args.device_obj.type == "cuda" else None)
    logger = training.RunLogger(output_dir, context.is_main, describe_evaluation)
    logger.info(f"model: {args.model_name}, {modeldir.describe_parameters(model)}, "
                f"pooling {args.pooling}, embedding size {vector_model(model).dim}"
                + (", turned (--matryoshka-rotation pca)" if vector_model(model).rotation is not None else ""))

    early_stopping = train(args, model, datasets, context, output_dir, logger, resume_from, val_candidates)
    # the untuned encoder is a usable model: it competes, and stays the best unless training beats it
    metric = args.metric_for_best_model
    untuned_row = logger.untuned_row()
    beaten = training.compare_with_untuned(early_stopping, untuned_row, metric, logger)
    distributed.barrier(context)
    if context.is_main:
        directory, value = best_checkpoint(output_dir, metric)
        if directory is not None:
            write_best_record(output_dir, directory, metric, value, "training",
                              {"untuned": untuned_row, "untuned_beaten": beaten})
            publish_model(directory, output_dir)
            logger.info(f"best checkpoint: {directory} (validation {metric} {value:.5f}); "
                        f"evaluate with --mode evaluate --select_best")
            results = {"validation": validation_row(logger.path, directory), "untuned": {"validation": untuned_row}}
            card = model_card.write_model_card(output_dir, "train_vector.py", args, results,
                                               [name.removeprefix("eval_") for name in untuned_row or {}
                                                if name.startswith("eval_")])
            logger.info(f"model card: {card}")
    return 0


def validation_row(log_path, directory):
    """The train_log.jsonl evaluation row of a checkpoint, by the step its trainer_state.json records
    (checkpoint-best holds whichever step was best: step 0 is the untuned encoder)."""
    step = (read_json_if_exists(Path(directory) / checkpoints.TRAINER_SUMMARY_FILE) or {}).get("global_step")
    rows = [row for row in training.read_run_log(log_path) if "eval_loss" in row and row.get("step") == step]
    return rows[-1] if rows else None  # a resumed run may have scored the step twice: the later one stands


def resolve_loss_for(directory, args):
    """--loss when given, else the loss the checkpoint was trained with, else mse."""
    if args.loss:
        return args.loss
    trained = read_json_if_exists(Path(directory) / "training_args.json") or {}
    return trained.get("loss") if trained.get("loss") in PAIR_LOSSES else "mse"


def evaluate_checkpoint(directory, test_pairs, args):
    """Ranking metrics and test loss of one model directory."""
    return evaluate_on_sets(directory, {"test": test_pairs}, args)["test"]


def evaluate_on_sets(directory, pair_sets, args):
    """``{name: metrics}`` of one model directory, loaded once, on each of ``pair_sets`` ({name: pairs})."""
    model = load_vector_model(directory, args)
    loss_name = resolve_loss_for(directory, args)
    figures = {}
    for name, pairs in pair_sets.items():
        scored, loss = evaluate_pairs(model, pairs, loss_name, args.temperature, args.eval_batch_size, args.dim)
        figures[name] = ranking.ranking_metrics(scored, args.k, args.relevance_threshold)
        figures[name].update(ranking.mean_scores(scored, args.relevance_threshold), test_loss=loss, loss=loss_name)
    return figures


def format_table(rows, ks):
    """Checkpoint table: validation loss, test loss, graded NDCG@k, MRR and Recall at the largest k."""
    k_max = max(ks)
    columns = ["val_loss", "test_loss"] + [f"ndcg@{k}" for k in ks] + [f"mrr@{k_max}", f"recall@{k_max}"]
    name_width = max(len("checkpoint"), *(len(name) for name, _, _ in rows))
    lines = [f"{'checkpoint':<{name_width}}" + "".join(f"{column:>11}" for column in columns)]
    for name, val_loss, metrics in rows:
        values = ["-" if val_loss is None else f"{val_loss:.5f}", f"{metrics['test_loss']:.5f}"]
        values += [f"{metrics[f'ndcg@{k}']:.4f}" for k in ks]
        values += [f"{metrics[f'mrr@{k_max}']:.4f}", f"{metrics[f'recall@{k_max}']:.4f}"]
        lines.append(f"{name:<{name_width}}" + "".join(f"{value:>11}" for value in values))
    return "\n".join(lines)


def run_evaluation_mode(args):
    pair_sets = load_splits(args, ("test", "general") if args.general_path else ("test",))
    test_pairs = pair_sets["test"]
    if args.select_best:
        return select_best(args, test_pairs)
    destination = metrics_destination(args, "eval_metrics.json")
    directory = args.model_path or resolve_best_model_dir(args.output_dir)
    for flag, path in (("--model-path", directory), ("--compare-with", args.compare_with)):
        if path is not None and not Path(path).is_dir():
            raise UserError(f"{flag} {path}: not a directory")
    tuned = evaluate_on_sets(directory, pair_sets, args)
    comparison = compare_with_base(args, tuned, pair_sets) if args.compare_with else None
    metrics = dict(tuned["test"], checkpoint=str(directory))
    print(format_table([(Path(directory).name, checkpoint_val_loss(directory), metrics)], args.k))
    add_retrieval_baseline(metrics, test_pairs, args)
    print(json.dumps({key: round(value, 4) if isinstance(value, float) else value for key, value in metrics.items()}))
    if comparison:
        print(format_base_comparison(comparison, max(args.k), Path(args.compare_with).name))
        metrics["comparison"] = comparison
    write_metrics(destination, metrics)
    if args.max_general_drop is not None and general_drop_exceeded(metrics["comparison"], args):
        return 1  # a quality gate that failed, as export_onnx.py's parity gate: not a usage error (2)
    return 0


def compare_with_base(args, tuned, pair_sets):
    """--compare-with: ``{set: {"base": metrics, "tuned": metrics}}`` on the test pairs and on --general-path."""
    base = evaluate_on_sets(args.compare_with, pair_sets, args)
    return {name: {"base": base[name], "tuned": tuned[name]} for name in pair_sets}


def format_base_comparison(comparison, k, base_name):
    """Base and tuned model per set: NDCG@k and MRR@k, and the mean cosine of relevant and other pairs."""
    columns = [f"ndcg@{k}", f"mrr@{k}", "mean_score_relevant", "mean_score_other"]
    lines = [f"{'set':<8}{'model':<10}" + "".join(f"{column:>21}" for column in columns)]
    for set_name, models in comparison.items():
        for model_name in ("base", "tuned"):
            values = ["-" if models[model_name][column] is None else f"{models[model_name][column]:.4f}"
                      for column in columns]
            lines.append(f"{set_name:<8}{model_name:<10}" + "".join(f"{value:>21}" for value in values))
    lines.append(f"base: {base_name}. The mean scores show where the cosines sit: fine-tuning often moves them "
                 "all, which changes thresholds but not the ranking NDCG measures")
    return "\n".join(lines)


def general_drop_exceeded(comparison, args):
    """True (and one line on stderr) when NDCG@K on --general-path fell by more than --max-general-drop."""
    key = f"ndcg@{max(args.k)}"
    base, tuned = comparison["general"]["base"][key], comparison["general"]["tuned"][key]
    if base - tuned <= args.max_general_drop:
        print(f"general set: {key} {base:.4f} -> {tuned:.4f}, within --max-general-drop {args.max_general_drop:g}")
        return False
    print(f"error: --general-path {args.general_path}: {key} fell from {base:.4f} (base) to {tuned:.4f} (tuned), "
          f"more than --max-general-drop {args.max_general_drop:g}: fine-tuning cost general retrieval",
          file=sys.stderr)
    return True


def add_retrieval_baseline(metrics, test_pairs, args):
    """TF-IDF cosine ranking of the same test pairs beside the model's figures (--baseline none skips)."""
    if args.baseline == "none":
        return
    from common.baselines import format_comparison, retrieval_baseline
    metrics["baseline"] = retrieval_baseline([p.query for p in test_pairs], [p.document for p in test_pairs],
                                             [p.rel for p in test_pairs], args.k, args.relevance_threshold)
    print(format_comparison(metrics, metrics["baseline"], [f"ndcg@{k}" for k in args.k] + [f"mrr@{max(args.k)}"]))


def select_best(args, test_pairs):
    """Evaluate every checkpoint; record the best by validation --metric-for-best-model in best_checkpoint.json."""
    save_path = Path(args.output_dir)
    if not save_path.is_dir():
        raise UserError(f"--output-dir {save_path}: not a directory")
    metrics_destination(args, "eval_results.json")  # refuse a foreign directory before evaluating
    checkpoints.recover_interrupted_writes(save_path)
    candidates = checkpoints.list_checkpoints(save_path, run_id_of(save_path))
    if not candidates:
        raise UserError(f"--output-dir {save_path}: no checkpoint-step-N directories to select from")
    metric = run_selection_metric(args.metric_for_best_model, save_path)
    if checkpoint_val_loss(save_path / "checkpoint-best") is not None:
        candidates.append(save_path / "checkpoint-best")  # it outlives --save_total_limit rotation
    rows = []
    for directory in candidates:
        rows.append((directory.name, checkpoint_val_loss(directory), evaluate_checkpoint(directory, test_pairs, args)))
    print(format_table(rows, args.k))
    best_dir, best_value = best_checkpoint(save_path, metric)
    if best_dir is None:
        raise UserError(f"--output-dir {save_path}: no checkpoint records a validation {metric}")
    best_metrics = next(metrics for name, _, metrics in rows if name == best_dir.name)
    add_retrieval_baseline(best_metrics, test_pairs, args)
    path = write_best_record(save_path, best_dir, metric, best_value, "--select_best", {"test": best_metrics})
    print(f"best: {best_dir.name} (validation {metric} {best_value:.5f}, test NDCG@{max(args.k)} "
          f"{best_metrics[f'ndcg@{max(args.k)}']:.4f}); recorded in {path}")
    write_metrics(metrics_destination(args, "eval_results.json"),
                  {"checkpoints": {name: dict(metrics, val_loss=val_loss) for name, val_loss, metrics in rows},
                   "best": best_dir.name})
    return 0


def metrics_destination(args, default_name):
    """--metrics-path (checked before any work: never an input, a model file, a device node replaced),
    else a file in --output-dir, which must be this toolkit's training run."""
    if args.metrics_path:
        files.refuse_overwriting_inputs(args.metrics_path, [
            ("--test-path", args.test_path), ("--model-path", args.model_path), ("--output-dir", args.output_dir),
            ("--config", args.config), ("--general-path", args.general_path), ("--compare-with", args.compare_with)],
            "--metrics-path")
        return Path(files.check_output_path(args.metrics_path, "--metrics-path"))
    if rundir.read_run_record(args.output_dir) is None:
        raise UserError(f"--output-dir {args.output_dir}: not a training run of this toolkit (no {rundir.RUN_FILE}); "
                        "pass --metrics-path to choose where the metrics go")
    return Path(args.output_dir) / default_name


def write_metrics(path, metrics):
    files.write_output_file(path, json.dumps(metrics, indent=2, ensure_ascii=False), "--metrics-path")
    print(f"metrics written to {path}")


def run_deploy(args):
    from common import inference, server
    server.resolve_api_key(args.api_key)  # a bad key fails before the model loads
    server.check_work_limits(args.max_queue, args.max_batch_tokens, args.workers)
    directory = args.model_path or resolve_best_model_dir(args.output_dir)
    corpus_entries = server.load_corpus_records(args.corpus, args.skip_invalid) if args.corpus else None
    loaded = inference.load_model(directory, device=str(args.device_obj))
    if loaded.task != "vector":
        raise UserError(f"--model-path {directory}: a {loaded.task} model, not a vector model (serve it with infer.py)")
    service = inference.VectorService(loaded, args.eval_batch_size)
    print(f"serving {directory} (embedding size {service.dim})", file=sys.stderr)
    corpus = server.build_corpus(service, *corpus_entries) if corpus_entries else None
    options = deploy_app_options(args)
    if args.workers > 1:  # each worker loads its own copy; this one only checked the model and encoded the corpus
        del loaded, service
        build_app = functools.partial(build_deploy_app, str(directory), str(args.device_obj), args.eval_batch_size,
                                      options, corpus)
        return server.serve(build_app, args.host, args.port, workers=args.workers,
                            has_key=server.resolve_api_key(args.api_key) is not None)
    return server.serve(server.create_app(service, corpus=corpus, **options), args.host, args.port)


def deploy_app_options(args):
    """``server.create_app``'s options from the deploy flags (plain values: they travel to --workers processes)."""
    from common import server
    return dict(api_key=args.api_key, max_texts=args.max_texts, max_chars=args.max_chars,
                max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms, **server.work_limit_options(args))


def build_deploy_app(directory, device, batch_size, options, corpus):
    """The deploy app with a model of its own (what each --workers process runs)."""
    from common import inference, server
    service = inference.VectorService(inference.load_model(directory, device=device), batch_size)
    return server.create_app(service, corpus=corpus, **options)


def run_mining(args):
    """--mode mine: the data's queries with hard negatives from --corpus (or the data's documents),
    written to --output-path in the query-group format; never over an existing file."""
    from common import mining
    from common.pairs import read_query_groups
    output = Path(args.output_path)
    if output.exists():
        raise UserError(f"--output-path {output}: already exists; mining never writes over a file (choose a new path)")
    files.check_output_path(output, "--output-path")
    groups = read_query_groups(args.data_path, args.skip_invalid, args.data_split,
                               relevance_threshold=args.relevance_threshold, rel_default=1.0)
    data.report_skipped(groups)
    extra = server_corpus_texts(args) if args.corpus else []
    corpus = mining.build_corpus(groups, extra)
    first, last = args.range_for_sampling
    print(f"mining {len(groups)} queries against {len(corpus)} texts with "
          f"{'BM25' if args.miner == 'bm25' else args.model_path or args.model_name}; ranks {first}-{last}")
    if args.miner == "bm25":
        score = mining.bm25_scorer(corpus, args.data_path + (f" and {args.corpus}" if args.corpus else ""))
    else:
        model = load_mining_model(args)
        score = mining.embedding_scorer(model, corpus, args.eval_batch_size)
    mined, report = mining.mine_hard_negatives(groups, corpus, score, args.range_for_sampling, args.negative_number,
                                               args.negative_margin, args.seed)
    print("\n".join(report.lines(first, last, args.negative_margin, args.negative_number, len(groups))))
    files.write_output_file(output, mining.format_query_groups(mined), "--output-path")
    print(f"query groups written to {output}")
    return 0


def run_rotation(args, context):
    """--mode rotate: the pretrained encoder turned as a --matryoshka-dims run starts (turn_before_training,
    fitted on --data-path's texts) and written to --output-dir as a model directory, with no training. Full-size
    similarities stay the encoder's own; a cut to one of the sizes keeps the strongest directions (bench/README.md,
    "The rotation before the cut": all of NDCG@10 at 128 of 384 values, against 89% cut unturned)."""
    run_dir, _ = training.claim_run_dir(args, context, "train_vector.py")
    pairs = load_pairs(args.data_path, args.skip_invalid, 1.0, args.data_split, ("train",))
    data.report_skipped(pairs)
    examples = pairs.groups if pairs.record_format == "groups" else pairs
    normalize_spec = checked_normalize_spec(args, pairs)
    modeldir.check_max_lengths(args.model_name, args, args.trust_remote_code)
    tokenizer = modeldir.load_tokenizer(args.model_name, args.trust_remote_code)
    model = build_model(args, tokenizer, normalize_spec).to(args.device_obj).eval()
    turn_before_training(model, examples, args, resume_from=None)
    run_dir.begin()  # data and model are checked: only now may an earlier run's outputs go
    vector_writer(PairEncoder(model), args)(run_dir.path)  # as every training checkpoint is written
    print(f"{args.model_name}, turned on {args.data_path}'s texts for --matryoshka-dims "
          f"{','.join(map(str, args.matryoshka_dims))}, written to {run_dir.path}")
    return 0


def server_corpus_texts(args):
    from common import server
    return server.load_corpus_records(args.corpus, args.skip_invalid)[1]


def load_mining_model(args):
    """--model-path (a trained vector model), else --model-name as an untuned encoder with --pooling."""
    source = args.model_path or args.model_name
    if modeldir.is_toolkit_model_directory(source):
        return BertVectorModel.from_pretrained(source, args.device_obj)
    return BertVectorModel.from_backbone(
        source, args.trust_remote_code, flag="--model-path" if args.model_path else "--model-name",
        pooling=args.pooling, projection_dim=None,
        query_max_length=args.query_max_length, doc_max_length=args.doc_max_length, max_length=args.max_length,
        truncation_side=args.truncation_side, query_instruction=args.query_instruction,
        passage_instruction=args.passage_instruction).to(args.device_obj).eval()


@report_user_errors
def main(argv=None):
    args = parse_args(argv)
    modes = {"train": run_training, "evaluate": lambda args, _: run_evaluation_mode(args),
             "deploy": lambda args, _: run_deploy(args), "mine": lambda args, _: run_mining(args),
             "rotate": run_rotation}
    # only training runs under torchrun; evaluate, deploy, mine and rotate are single-process
    return training.run_in_context(args, modes[args.mode], use_distributed=args.mode == "train")


if __name__ == "__main__":
    raise SystemExit(main())
