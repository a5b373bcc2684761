"""Cross-encoder rerankers (train_classifier.py --problem-type rerank) on a tiny BERT: both losses train,
evaluate per query and store a reranker directory; retrieve-then-rerank reorders the retriever's top N and
warns when it hurts; a crash resumes bit-exactly; export_onnx.py and infer.py score pairs; bad input is
one error line with exit 2."""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import export_onnx
import infer
import train_classifier
from common import checkpoints, inference, ranking, reranking
from common.heads import SequenceClassifier
from common.pairs import PairExample
from common.vector import BertVectorModel
from conftest import assert_one_error_line, trainer_argv, write_jsonl

REPO = Path(__file__).resolve().parents[1]
TOPICS = ["movie", "music", "sports", "market", "stock", "song", "team", "news"]


def graded_records(topics):
    """Per query: a relevant document (rel 1), a related one (0.2) and three irrelevant ones (0). The
    relevant documents say "good", the others "bad": a signal a 2-layer model learns in one epoch."""
    records = []
    for index, topic in enumerate(topics):
        other = topics[(index + 1) % len(topics)]
        records.append({"query": f"{topic} news", "document": f"good {topic} this is good", "rel": 1.0})
        records.append({"query": f"{topic} news", "document": f"a {topic} and a {other}", "rel": 0.2})
        for position, word in enumerate(("bad", "terrible", "sad")):
            records.append({"query": f"{topic} news", "document": f"{word} {other} was {word}", "rel": 0.0,
                            "weight": 1.0 + position})
    return records


def triplet_records(topics):
    return [{"query": f"{topic} news", "pos": [f"good {topic} this is good"],
             "neg": [f"bad {topic} was bad", f"terrible {topic}", "sad song was sad"]} for topic in topics]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    directory = tmp_path_factory.mktemp("rerank-data")
    return {"train": write_jsonl(directory / "train.jsonl", graded_records(TOPICS * 2)),
            "val": write_jsonl(directory / "val.jsonl", graded_records(TOPICS[:4])),
            "test": write_jsonl(directory / "test.jsonl", graded_records(TOPICS[4:])),
            "triplets": write_jsonl(directory / "triplets.jsonl", triplet_records(TOPICS * 2))}


@pytest.fixture(scope="module")
def retriever_dir(tmp_path_factory, tiny_model_dir):
    """The tiny encoder as a bi-encoder directory (untuned, mean pooling)."""
    directory = tmp_path_factory.mktemp("retriever") / "model"
    BertVectorModel.from_backbone(str(tiny_model_dir), pooling="mean", max_length=32).save_pretrained(directory)
    return directory


def rerank_argv(model_dir, data, output_dir, *extra):
    return trainer_argv("train_classifier", model_dir, output_dir, "--problem-type", "rerank", "--data-path",
                        data["train"], "--val-path", data["val"], "--max-length", "32", "--epochs", "3",
                        "--batch-size", "4", *extra)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, data, retriever_dir):
    """loss -> output dir of a run with --test-path and --retriever (top 3 of 5 candidates), trained on first use."""
    runs = {}

    def get(loss):
        if loss not in runs:
            output_dir = tmp_path_factory.mktemp(loss) / "run"
            group = ["--rerank-group-size", "4", "--batch-size", "2"] if loss == "listwise" else []
            assert train_classifier.main(rerank_argv(
                tiny_model_dir, data, output_dir, "--rerank-loss", loss, *group, "--test-path", data["test"],
                "--retriever", retriever_dir, "--rerank-top", "3", "--save-steps", "4")) == 0
            runs[loss] = output_dir
        return runs[loss]
    return get


def read_metrics(output_dir):
    return json.loads((Path(output_dir) / "metrics.json").read_text(encoding="utf-8"))


# ---------------------------------------------------------------- training and the model directory

@pytest.mark.parametrize("loss", ["pointwise", "listwise"])
def test_both_losses_learn_and_store_a_reranker_directory(loss, trained):
    output_dir = trained(loss)
    config = json.loads((output_dir / "checkpoint-best" / "config.json").read_text())
    assert config["toolkit"]["problem_type"] == "rerank"
    assert config["toolkit"]["head"]["num_labels"] == 1
    assert config["toolkit"]["preprocessing"]["context"] == "query_document"
    metrics = read_metrics(output_dir)
    untuned = metrics["untuned"]["validation"]["eval_ndcg@10"]
    assert metrics["validation"]["ndcg@10"] > untuned  # learned: "good" documents rank first
    assert metrics["validation"]["ndcg@10"] > 0.95 and metrics["test"]["ndcg@10"] > 0.95
    assert metrics["test"]["queries"] == 4 and {"mrr@10", "map@10", "recall@10"} <= set(metrics["test"])
    rows = [json.loads(line) for line in (output_dir / "train_log.jsonl").read_text().splitlines()]
    assert all("eval_ndcg@10" in row and "eval_mrr@10" in row for row in rows if "eval_loss" in row)


def test_validation_metrics_are_the_ranking_of_each_querys_documents(trained, data):
    """The figure the run reports equals ranking.py's metrics over scores recomputed from the saved model."""
    output_dir = trained("pointwise")
    model, tokenizer, toolkit, _ = SequenceClassifier.from_directory(output_dir / "checkpoint-best")
    pairs = reranking.load_rerank_pairs(str(data["val"]))
    encoded = reranking.encode_pairs(tokenizer, [p.query for p in pairs], [p.document for p in pairs], 32)
    with torch.no_grad():
        logits = torch.cat([model(**{key: torch.tensor([feature[key]]) for key in ("input_ids", "token_type_ids")},
                                  attention_mask=torch.ones(1, len(feature["input_ids"]), dtype=torch.long))
                            for feature in encoded])
    groups = reranking.group_scores([p.rel for p in pairs], logits[:, 0].tolist(), [p.query for p in pairs])
    expected = ranking.ranking_metrics(groups, reranking.EVALUATION_KS)["ndcg@10"]
    assert read_metrics(output_dir)["validation"]["ndcg@10"] == pytest.approx(expected, abs=1e-6)


def test_pairs_are_encoded_query_first_and_the_document_is_cut(tiny_model_dir):
    from conftest import build_tiny_tokenizer
    tokenizer = build_tiny_tokenizer(Path(tiny_model_dir) / "vocab.txt")
    [short, long] = reranking.encode_pairs(tokenizer, ["good movie", "good movie"],
                                           ["bad film", " ".join(["bad film"] * 40)], 16)
    assert tokenizer.decode(short["input_ids"]) == "[CLS] good movie [SEP] bad film [SEP]"
    assert short["token_type_ids"] == [0, 0, 0, 0, 1, 1, 1]
    assert len(long["input_ids"]) == 16 and tokenizer.decode(long["input_ids"]).startswith("[CLS] good movie [SEP]")


def test_query_pos_neg_records_train_a_listwise_reranker(tmp_path, tiny_model_dir, data):
    output_dir = tmp_path / "run"
    assert train_classifier.main(rerank_argv(tiny_model_dir, dict(data, train=data["triplets"]), output_dir,
                                             "--rerank-loss", "listwise", "--rerank-group-size", "4")) == 0
    assert read_metrics(output_dir)["validation"]["ndcg@10"] > 0.95


def test_listwise_groups_put_the_positive_first_and_fill_from_other_queries():
    pairs = [PairExample("q1", "d1", 1.0, 1.0, "1"), PairExample("q1", "d2", 0.0, 1.0, "2"),
             PairExample("q2", "d3", 1.0, 1.0, "3"), PairExample("q2", "d4", 0.2, 1.0, "4"),
             PairExample("q2", "d5", 0.0, 1.0, "5")]
    groups = reranking.listwise_groups(pairs, group_size=3, seed=0)
    assert [positive for positive, _ in groups] == [0, 2]
    assert all(len(negatives) == 2 for _, negatives in groups)
    assert sorted(groups[1][1]) == [3, 4]  # q2's own lower-rel documents
    assert 1 in groups[0][1] and all(pairs[i].document not in ("d1", "d2") for i in groups[0][1] if i != 1)


def test_losses_prefer_the_right_order():
    labels = torch.tensor([[[1.0, 1.0], [0.0, 1.0], [0.0, 1.0]]])  # (batch 1, group 3, target/weight)
    right, wrong = torch.tensor([[3.0], [-3.0], [-3.0]]), torch.tensor([[-3.0], [3.0], [-3.0]])
    assert reranking.listwise_loss(right, labels) < reranking.listwise_loss(wrong, labels)
    pointwise_labels = labels.reshape(3, 1, 2)
    assert reranking.pointwise_loss(right, pointwise_labels) < reranking.pointwise_loss(wrong, pointwise_labels)
    weighted = pointwise_labels.clone()
    weighted[1, 0, 1] = 0.0  # a zero-weight pair does not count
    assert reranking.pointwise_loss(wrong, weighted) < reranking.pointwise_loss(wrong, pointwise_labels)


# ---------------------------------------------------------------- retrieve-then-rerank

def test_retrieve_then_rerank_is_written_with_before_after_and_per_query(trained, data, retriever_dir):
    report = read_metrics(trained("pointwise"))["retrieve_then_rerank"]
    assert report["rerank_top"] == 3 and report["candidates_per_query"] == 5
    assert len(report["per_query"]) == 4 and report["split"] == "test"
    # "before" is the retriever's own ranking of each query's candidates
    retriever = inference.load_model(str(retriever_dir))
    pairs = reranking.load_rerank_pairs(str(data["test"]))
    queries = inference.normalize_rows(inference.embed(retriever, [p.query for p in pairs], side="query"))
    documents = inference.normalize_rows(inference.embed(retriever, [p.document for p in pairs], side="doc"))
    cosines = np.sum(queries * documents, axis=1)
    groups = reranking.group_scores([p.rel for p in pairs], cosines, [p.query for p in pairs])
    assert report["before"]["ndcg@10"] == pytest.approx(ranking.ranking_metrics(groups)["ndcg@10"], abs=1e-6)
    assert report["after"]["ndcg@10"] > report["before"]["ndcg@10"]
    assert report["lowered_ndcg"] is False
    card = (trained("pointwise") / "checkpoint-best" / "MODEL_CARD.md").read_text()
    assert "# Reranker (cross-encoder) fine-tuned from" in card and "- text-ranking" in card
    for what, view in (("the retriever alone (its top 3)", "before"), ("the retriever's top 3 reranked", "after")):
        line = next(line for line in card.splitlines() if line.startswith(f"| {what}"))
        assert f"| test | {report[view]['ndcg@10']:.4f} |" in line


def test_only_the_top_n_are_reordered(monkeypatch):
    """Candidates below the retriever's top N keep its order beneath the reranked ones."""
    pairs = [PairExample("q", f"d{i}", rel, 1.0, str(i)) for i, rel in enumerate([0.0, 0.0, 0.0, 1.0])]
    # the retriever ranks d0 > d1 > d2 > d3; the reranker prefers d1 and would put d3 first
    vectors = {"q": [1.0, 0.0], "d0": [1.0, 0.0], "d1": [0.9, 0.1], "d2": [0.5, 0.5], "d3": [0.0, 1.0]}
    monkeypatch.setattr(inference, "embed", lambda loaded, texts, *args, **kwargs: np.array([vectors[t] for t in texts]))
    scores = [0.1, 0.9, 0.5, 0.99]  # the reranker's, per pair
    report = reranking.retrieve_then_rerank(None, pairs, scores, top_n=2)
    assert report["per_query"][0]["mrr@10_before"] == pytest.approx(1 / 4)
    assert report["per_query"][0]["mrr@10_after"] == pytest.approx(1 / 4)  # d3 was cut: only d0, d1 swap
    report = reranking.retrieve_then_rerank(None, pairs, scores, top_n=4)
    assert report["per_query"][0]["mrr@10_after"] == 1.0 and report["after"]["recall@1"] == 1.0


def test_a_reranker_that_lowers_ndcg_is_reported_loudly(capsys):
    report = {"rerank_top": 50, "candidates_per_query": 80.0,
              "before": {"ndcg@10": 0.6, "mrr@10": 0.5}, "after": {"ndcg@10": 0.5, "mrr@10": 0.4},
              "per_query": [{"ndcg@10_before": 0.6, "ndcg@10_after": 0.5}]}
    assert reranking.report_rerank_change(report) is True
    captured = capsys.readouterr()
    assert "WARNING: RERANKING LOWERED NDCG@10 from 0.6000 to 0.5000" in captured.err
    assert "-10.0 points" in captured.out and "worse on 1 of 1 queries" in captured.out
    report["after"]["ndcg@10"] = 0.7
    assert reranking.report_rerank_change(report) is False and "WARNING" not in capsys.readouterr().err


def fusion_candidate():
    """One query: d0 is relevant; the retriever ranks d1 first, the reranker d2. Scaled to [0, 1], the fused
    scores are d0 0.75, d1 w, d2 1 - w: d0 comes first exactly when 0.25 < w < 0.75."""
    return {"query": "q", "relevances": np.array([1.0, 0.0, 0.0]), "similarities": np.array([0.55, 0.7, 0.1]),
            "reranker": np.array([1.75, -2.0, 3.0])}


def test_fusion_tuning_picks_the_smallest_best_retriever_share():
    weight, table = reranking.tune_fusion_weight([fusion_candidate()], top_n=3)
    assert weight == pytest.approx(0.3)  # 0.3 .. 0.7 all put d0 first; the most reranker wins the tie
    assert [share for share, value in table.items() if value == 1.0] == pytest.approx([0.3, 0.4, 0.5, 0.6, 0.7])


def test_fused_order_at_the_ends_is_the_reranker_or_the_retriever():
    candidate = fusion_candidate()
    report = reranking.rerank_report([candidate], top_n=3, retriever_weight=1.0)
    assert report["fused"] == report["before"] and report["after"]["mrr@10"] == pytest.approx(1 / 2)
    assert reranking.rerank_report([candidate], top_n=3, retriever_weight=0.0)["fused"] == report["after"]
    fused = reranking.rerank_report([candidate], top_n=3, retriever_weight=0.5)
    assert fused["fused"]["mrr@10"] == 1.0 and fused["per_query"][0]["ndcg@10_fused"] == 1.0
    assert fused["fusion_retriever_weight"] == 0.5


def test_the_tuned_fusion_weight_is_stored_and_reused_by_eval_only(trained, data, retriever_dir, tmp_path):
    output_dir = trained("pointwise")
    toolkit = json.loads((output_dir / "checkpoint-best" / "config.json").read_text())["toolkit"]
    metrics = read_metrics(output_dir)
    stored = toolkit["fusion"]["retriever_weight"]
    assert stored in reranking.FUSION_WEIGHTS and toolkit["fusion"]["rerank_top"] == 3
    assert metrics["fusion_tuning"]["retriever_weight"] == stored
    assert metrics["fusion_tuning"]["validation_ndcg@10"][f"{stored:g}"] == max(
        metrics["fusion_tuning"]["validation_ndcg@10"].values())
    report = metrics["retrieve_then_rerank"]
    assert report["fusion_retriever_weight"] == stored and {"before", "after", "fused"} <= set(report)
    # eval-only fuses with the stored share (set here to 1: the retriever's own order), never re-tuned
    copy = tmp_path / "model"
    shutil.copytree(output_dir / "checkpoint-best", copy)
    checkpoints.rewrite_toolkit(copy, dict(toolkit, fusion={"retriever_weight": 1.0, "rerank_top": 3}))
    assert train_classifier.main(["--eval-only", "--model-path", str(copy), "--test-path", str(data["test"]),
                                  "--retriever", str(retriever_dir), "--rerank-top", "3",
                                  "--output-dir", str(tmp_path / "eval")]) == 0
    report = read_metrics(tmp_path / "eval")["retrieve_then_rerank"]
    assert report["fusion_retriever_weight"] == 1.0 and report["fused"] == report["before"]
    assert json.loads((copy / "config.json").read_text())["toolkit"]["fusion"]["retriever_weight"] == 1.0


def test_without_a_test_split_the_fused_figure_says_it_is_on_its_tuning_queries(tiny_model_dir, data, retriever_dir,
                                                                                 tmp_path):
    output_dir = tmp_path / "run"
    assert train_classifier.main(rerank_argv(tiny_model_dir, data, output_dir, "--epochs", "1", "--retriever",
                                             retriever_dir, "--rerank-top", "3")) == 0
    report = read_metrics(output_dir)["retrieve_then_rerank"]
    assert report["split"] == "validation" and report["fused_on_tuning_queries"] is True


def test_a_stored_fusion_weight_out_of_range_is_one_error_line(trained, tmp_path, capsys):
    copy = tmp_path / "model"
    shutil.copytree(trained("pointwise") / "checkpoint-best", copy)
    toolkit = json.loads((copy / "config.json").read_text())["toolkit"]
    checkpoints.rewrite_toolkit(copy, dict(toolkit, fusion={"retriever_weight": 1.5}))
    assert infer.main(["--model-path", str(copy), "--text", "movie news", "--text-pair", "good movie"]) == 2
    assert_one_error_line(capsys.readouterr().err,
                          "field 'toolkit.fusion.retriever_weight': expected a finite number >= 0 and <= 1")


# ---------------------------------------------------------------- resume, eval-only

def test_resume_after_a_crash_is_bit_exact(trained, tiny_model_dir, data, retriever_dir, tmp_path, monkeypatch):
    full = trained("listwise")
    resumed = tmp_path / "resumed"
    argv = rerank_argv(tiny_model_dir, data, resumed, "--rerank-loss", "listwise", "--rerank-group-size", "4",
                       "--batch-size", "2", "--test-path", data["test"], "--retriever", retriever_dir,
                       "--rerank-top", "3", "--save-steps", "4")
    original_save = checkpoints.save_checkpoint

    class Interrupted(Exception):
        pass

    def save_then_crash(output_dir, write_model, state, save_total_limit):
        original_save(output_dir, write_model, state, save_total_limit)
        if state["global_step"] == 8:
            raise Interrupted()
    monkeypatch.setattr(checkpoints, "save_checkpoint", save_then_crash)
    with pytest.raises(Interrupted):
        train_classifier.main(argv)
    monkeypatch.setattr(checkpoints, "save_checkpoint", original_save)
    assert train_classifier.main([*argv, "--resume"]) == 0
    expected = load_file(str(full / "checkpoint-best" / "model.safetensors"))
    actual = load_file(str(resumed / "checkpoint-best" / "model.safetensors"))
    assert all(torch.equal(expected[name], actual[name]) for name in expected)
    assert read_metrics(resumed)["test"] == read_metrics(full)["test"]


def test_torchrun_two_processes_gather_every_validation_pair(tiny_model_dir, data, tmp_path):
    output_dir = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO / "train_classifier.py"), *rerank_argv(tiny_model_dir, data, output_dir, "--epochs", "1")]
    environment = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "processes: 2" in result.stdout
    rows = [json.loads(line) for line in (output_dir / "train_log.jsonl").read_text().splitlines()]
    evaluations = [row for row in rows if "eval_loss" in row]
    # the loop's figure (each process scored half, then gathered) is the single-process figure of the best model
    metrics = read_metrics(output_dir)
    assert evaluations[-1]["best"] == pytest.approx(metrics["validation"]["ndcg@10"], abs=1e-6)
    assert metrics["validation"]["queries"] == 4


def test_eval_only_scores_a_saved_reranker(trained, data, retriever_dir, tmp_path, capsys):
    model_dir = trained("pointwise") / "checkpoint-best"
    assert train_classifier.main(["--eval-only", "--model-path", str(model_dir), "--test-path", str(data["test"]),
                                  "--retriever", str(retriever_dir), "--rerank-top", "3", "--output-dir",
                                  str(tmp_path / "eval")]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    metrics = read_metrics(tmp_path / "eval")
    assert printed["ndcg@10"] == metrics["test"]["ndcg@10"] == read_metrics(trained("pointwise"))["test"]["ndcg@10"]
    assert metrics["retrieve_then_rerank"]["rerank_top"] == 3


# ---------------------------------------------------------------- infer.py and export_onnx.py

def infer_score(model_path, query, document, capsys):
    assert infer.main(["--model-path", str(model_path), "--text", query, "--text-pair", document, "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip())["score"]


def test_infer_prints_the_sigmoid_of_the_logit(trained, capsys):
    model_dir = trained("pointwise") / "checkpoint-best"
    model, tokenizer, _, _ = SequenceClassifier.from_directory(model_dir)
    [feature] = reranking.encode_pairs(tokenizer, ["movie news"], ["good movie this is good"], 32)
    with torch.no_grad():
        logit = model(torch.tensor([feature["input_ids"]]), torch.ones(1, len(feature["input_ids"]), dtype=torch.long),
                      torch.tensor([feature["token_type_ids"]]))[0, 0].item()
    good = infer_score(model_dir, "movie news", "good movie this is good", capsys)
    assert good == pytest.approx(1 / (1 + math.exp(-logit)), abs=1e-6)
    assert good > infer_score(model_dir, "movie news", "bad team was bad", capsys)
    assert infer.main(["--model-path", str(model_dir), "--text", "movie news", "--text-pair", "good movie"]) == 0
    assert "score: " in capsys.readouterr().out


def test_export_passes_the_parity_gate_and_scores_like_torch(trained, data, tmp_path, capsys):
    model_dir = trained("pointwise") / "checkpoint-best"
    onnx_path = tmp_path / "reranker.onnx"
    assert export_onnx.main(["--model-path", str(model_dir), "--output-path", str(onnx_path),
                             "--validation-file", str(data["val"])]) == 0
    output = capsys.readouterr().out
    assert "(reranker)" in output and "PASSED" in output and "ndcg@10" in output
    pair = ("movie news", "good movie this is good")
    assert infer_score(onnx_path, *pair, capsys) == pytest.approx(infer_score(model_dir, *pair, capsys), abs=1e-4)


def test_int8_fp32_sensitive_ranks_a_rerankers_matmuls_on_its_pair_file(trained, data, tmp_path, capsys):
    onnx_path = tmp_path / "reranker-int8.onnx"
    assert export_onnx.main(["--model-path", str(trained("pointwise") / "checkpoint-best"), "--output-path",
                             str(onnx_path), "--optimize", "false", "--quantize", "int8", "--int8-variants",
                             "fp32-sensitive", "--validation-file", str(data["val"]), "--max-metric-drop", "1",
                             "--timing-runs", "1"]) == 0
    assert "fp32-sensitive (1 in fp32)" in capsys.readouterr().out  # the gate passes at once: one node kept
    [row] = json.loads(onnx_path.with_name("reranker-int8.report.json").read_text())["int8_variants"]
    assert row["passed"] and len(row["kept_fp32_nodes"]) == 1 and "/encoder/" in row["kept_fp32_nodes"][0]


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("records, extra, expected", [
    ([{"query": "q", "document": "d", "rel": 2}], [], "line 1: field 'rel': 2.0 is outside [0.0, 1.0]"),
    ([{"query": "q", "pos": [], "neg": ["d"]}], [], "line 1: field 'pos': empty list"),
    ([{"query": "q", "pos": ["d"], "neg": [3]}], [], "line 1: field 'neg[0]': expected a string"),
    ([{"query": "q", "document": "d", "rel": 0.0}] * 4, ["--val-path", "SELF"], "no relevant pair"),
    ([{"query": "q", "document": "d", "rel": 1.0}], ["--labels", "a,b"], "--labels does not apply to --problem-type rerank"),
    ([{"query": "q", "document": "d", "rel": 1.0}], ["--metric-for-best-model", "macro_f1"], "not a rerank metric"),
    ([{"query": "q", "document": "d", "rel": 1.0}], ["--rerank-group-size", "1"], "--rerank-group-size"),
])
def test_bad_reranker_input_is_one_error_line(tmp_path, capsys, records, extra, expected):
    path = write_jsonl(tmp_path / "d.jsonl", records)
    extra = [str(path) if value == "SELF" else value for value in extra]
    assert train_classifier.main(["--problem-type", "rerank", "--data-path", str(path), "--model-name",
                                  str(tmp_path / "no-model"), "--output-dir", str(tmp_path / "out"), *extra]) == 2
    assert_one_error_line(capsys.readouterr().err, expected)
    assert not (tmp_path / "out" / "checkpoint-best").exists()


def test_reranker_flags_are_refused_for_a_classifier(tmp_path, capsys):
    assert train_classifier.main(["--data-path", "x.jsonl", "--rerank-loss", "listwise"]) == 2
    assert_one_error_line(capsys.readouterr().err, "--rerank-loss is for --problem-type rerank, not single_label")


def test_a_retriever_that_is_not_a_bi_encoder_is_refused_before_training(tmp_path, tiny_model_dir, data, trained,
                                                                         capsys):
    classifier_dir = trained("pointwise") / "checkpoint-best"
    assert train_classifier.main(rerank_argv(tiny_model_dir, data, tmp_path / "out", "--retriever",
                                             classifier_dir)) == 2
    assert_one_error_line(capsys.readouterr().err, "--retriever", "not a bi-encoder")
    assert not (tmp_path / "out" / "train_log.jsonl").exists()


def test_infer_asks_for_the_document(trained, capsys):
    model_dir = trained("pointwise") / "checkpoint-best"
    assert infer.main(["--model-path", str(model_dir), "--text", "movie news"]) == 2
    assert_one_error_line(capsys.readouterr().err, "is a reranker", "--text-pair")
    assert infer.main(["--model-path", str(model_dir), "--text", "q", "--text-pair", "d", "--context", "c"]) == 2
    assert_one_error_line(capsys.readouterr().err, "--context")


def test_a_listwise_group_nothing_can_fill_is_one_error_line(tmp_path, tiny_model_dir, capsys):
    """Every document of the file is the one query's own: filling its group from other queries used to
    draw forever (a hang)."""
    import signal
    records = [{"query": "movie news", "pos": ["good movie"], "neg": ["bad movie"]}]
    path = write_jsonl(tmp_path / "one.jsonl", records)
    signal.signal(signal.SIGALRM, lambda *_: pytest.fail("listwise grouping hangs"))
    signal.alarm(120)
    try:
        code = train_classifier.main(trainer_argv("train_classifier", tiny_model_dir, tmp_path / "out", "--problem-type",
                                                  "rerank", "--rerank-loss", "listwise", "--data-path", path,
                                                  "--val-path", path, "--max-length", "32"))
    finally:
        signal.alarm(0)
    assert code == 2
    assert_one_error_line(capsys.readouterr().err, f"{path} line 1", "'movie news' has 1 negatives",
                          "--rerank-group-size 8")
    assert not (tmp_path / "out" / "train_log.jsonl").exists()


def test_each_text_pair_stays_with_its_query_when_an_input_is_bad(trained, capsys):
    """--text-pair values were lined up with the valid inputs only: a blank --text before them made two
    pairs for two queries 'not one per input'."""
    model_dir = str(trained("pointwise") / "checkpoint-best")
    capsys.readouterr()  # the fixture's training output
    assert infer.main(["--model-path", model_dir, "--text", " ", "--text", "movie news", "--text-pair", "bad",
                       "--text-pair", "good movie this is good", "--json"]) == 1
    captured = capsys.readouterr()
    blank, scored = [json.loads(line) for line in captured.out.splitlines()]
    assert blank["source"] == "--text 1" and "empty" in blank["error"]
    assert (scored["query"], scored["document"]) == ("movie news", "good movie this is good")


def test_a_blank_text_pair_is_named_not_scored(trained, capsys):
    model_dir = str(trained("pointwise") / "checkpoint-best")
    capsys.readouterr()  # the fixture's training output
    assert infer.main(["--model-path", model_dir, "--text", "movie news", "--text", "music news", "--text-pair",
                       "good movie", "--text-pair", "  ", "--json"]) == 1
    first, second = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert first["document"] == "good movie"
    assert second == {"source": "--text 2", "error": "--text-pair 2: empty or whitespace-only text"}
