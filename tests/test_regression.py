"""--problem-type regression on a tiny BERT: every record format, standardized targets stored with the
model and undone at inference (infer.py, the server, ONNX, --eval-only), metrics, bad scores."""
import asyncio
import csv
import json

import httpx
import numpy as np
import pytest
import torch

import export_onnx
import train_classifier
from common import inference, problem_types, server
from conftest import assert_one_error_line, run_trainer, write_json, write_jsonl

WORDS = {"terrible": 1.0, "bad": 2.0, "good": 4.0, "great": 5.0}


def score_records(count):
    """A 1-5 rating spelled by one word (a separable score; 40 + 10 x the score keeps the scale far from 0)."""
    names = list(WORDS)
    return [{"text": f"a {names[i % 4]} movie", "label": 40 + 10 * WORDS[names[i % 4]]} for i in range(count)]


def write_format(tmp_path, kind, records, name):
    if kind == "csv":
        path = tmp_path / f"{name}.csv"
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=["text", "label"])
            writer.writeheader()
            writer.writerows(records)
        return path
    if kind == "message":
        return write_json(tmp_path / f"{name}.json", [{"message": r["text"], "label": r["label"]} for r in records])
    if kind == "chat":
        return write_json(tmp_path / f"{name}.json", [
            {"messages": [{"role": "user", "content": "rate"}, {"role": "assistant", "content": r["text"]},
                          {"role": "tool", "content": str(r["label"])}]} for r in records])
    return write_jsonl(tmp_path / f"{name}.jsonl", records)


def train(tiny_model_dir, output_dir, train_path, val_path, *extra):
    return run_trainer("train_classifier", tiny_model_dir, output_dir, "--data-path", train_path, "--val-path",
                       val_path, "--problem-type", "regression", *extra)


@pytest.fixture(scope="module")
def regression_run(tiny_model_dir, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("regression")
    train_path = write_jsonl(tmp_path / "train.jsonl", score_records(48))
    val_path = write_jsonl(tmp_path / "val.jsonl", score_records(12))
    assert train(tiny_model_dir, tmp_path / "out", train_path, val_path, "--test-path", val_path, "--epochs", "6",
                 "--standardize-targets", "--metric-for-best-model", "mae") == 0
    return tmp_path / "out", val_path


@pytest.mark.parametrize("kind", ["jsonl", "csv", "message", "chat"])
def test_reads_scores_in_every_record_format(tmp_path, tiny_model_dir, kind):
    records = score_records(12)
    assert train(tiny_model_dir, tmp_path / "out", write_format(tmp_path, kind, records, "train"),
                 write_format(tmp_path, kind, records[:4], "val"), "--max-steps", "1", "--standardize-targets") == 0
    toolkit = json.loads((tmp_path / "out" / "checkpoint-best" / "config.json").read_text())["toolkit"]
    assert toolkit["problem_type"] == "regression" and toolkit["head"]["num_labels"] == 1
    scores = [40 + 10 * WORDS[name] for name in WORDS]
    assert toolkit["target_scaling"] == pytest.approx({"mean": np.mean(scores), "std": np.std(scores)})
    summary = json.loads((tmp_path / "out" / "dataset_summary.json").read_text())[0]
    assert summary["scores"]["min"] == 50 and summary["scores"]["max"] == 90


def test_learns_scores_and_reports_metrics_in_the_original_scale(regression_run):
    output_dir, _ = regression_run
    metrics = json.loads((output_dir / "metrics.json").read_text())
    test = metrics["test"]
    for key in ("mae", "rmse", "pearson", "spearman", "r2"):
        assert key in test
    assert test["mae"] < metrics["constant_baseline"]["mae"]  # better than always the training mean (13.75)
    assert metrics["baseline"]["name"] == "tfidf-word-1-2+ridge" and "spearman" in metrics["baseline"]
    assert test["spearman"] > 0.8
    errors = [json.loads(line) for line in (output_dir / "errors.jsonl").read_text().splitlines()]
    assert [row["absolute_error"] for row in errors] == sorted((row["absolute_error"] for row in errors), reverse=True)
    assert errors[0]["true_score"] in (50.0, 60.0, 80.0, 90.0)


def test_inference_server_onnx_and_eval_only_give_scores_in_the_original_scale(regression_run, tmp_path):
    output_dir, test_path = regression_run
    model_dir = output_dir / "checkpoint-best"
    loaded = inference.load_model(model_dir)
    texts = [record["text"] for record in score_records(4)]
    results = inference.classify(loaded, texts)
    raw = inference.run_batched(loaded, inference.encode_inputs(loaded, texts))[:, 0]
    scaling = loaded.toolkit["target_scaling"]
    assert [r["score"] for r in results] == pytest.approx(raw * scaling["std"] + scaling["mean"], abs=1e-5)
    assert results[0]["score"] < results[3]["score"]  # terrible < great
    app = server.create_app(inference.build_service(loaded))

    async def post():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.post("/predict", json={"texts": texts})
    response = asyncio.run(post())
    assert [p["score"] for p in response.json()["predictions"]] == pytest.approx([r["score"] for r in results])
    onnx_path = tmp_path / "model.onnx"
    assert export_onnx.main(["--model-path", str(model_dir), "--output-path", str(onnx_path)]) == 0
    onnx_scores = [r["score"] for r in inference.classify(inference.load_model(onnx_path), texts)]
    assert onnx_scores == pytest.approx([r["score"] for r in results], abs=1e-4 * scaling["std"])
    assert train_classifier.main(["--eval-only", "--model-path", str(model_dir), "--test-path", str(test_path),
                                  "--output-dir", str(tmp_path / "eval"), "--device", "cpu", "--precision", "fp32"]) == 0
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())["test"]
    assert evaluated["mae"] == pytest.approx(json.loads((output_dir / "metrics.json").read_text())["test"]["mae"])


@pytest.mark.parametrize("score, fragment", [("high", "expected a number, got 'high'"), (True, "got a boolean"),
                                             (None, "missing"), ([3], "expected a number")])
def test_a_score_that_is_not_a_number_is_one_error_line(tmp_path, tiny_model_dir, capsys, score, fragment):
    path = write_jsonl(tmp_path / "train.jsonl", score_records(4) + [{"text": "good", "label": score}])
    assert train(tiny_model_dir, tmp_path / "out", path, path) == 2
    assert_one_error_line(capsys.readouterr().err, f"{path} line 5: field 'label'", fragment)


@pytest.mark.parametrize("flags, fragment", [
    (["--label-smoothing", "0.1"], "--label-smoothing does not apply to regression"),
    (["--class-weights", "balanced"], "--class-weights balanced does not apply"),
    (["--metric-for-best-model", "macro_f1"], "not a regression metric"),
    (["--threshold-strategy", "global"], "--threshold-strategy is for --problem-type multi_label"),
])
def test_combinations_that_make_no_sense_are_refused(tmp_path, tiny_model_dir, capsys, flags, fragment):
    path = write_jsonl(tmp_path / "d.jsonl", score_records(8))
    assert train(tiny_model_dir, tmp_path / "out", path, path, *flags) == 2
    assert_one_error_line(capsys.readouterr().err, fragment)


@pytest.mark.parametrize("metric", ["rmse", "pearson", "spearman"])
def test_huber_loss_rdrop_and_early_stopping_on_any_metric(tmp_path, tiny_model_dir, metric):
    path = write_jsonl(tmp_path / "d.jsonl", score_records(8))
    assert train(tiny_model_dir, tmp_path / "out", path, path, "--regression-loss", "huber", "--rdrop-alpha", "1.0",
                 "--metric-for-best-model", metric, "--max-steps", "2") == 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert any(f"eval_{metric}" in row for row in rows)


def test_huber_and_mse_losses_on_standardized_targets():
    problem = problem_types.Regression()
    problem.fit_scaling([10.0, 20.0, 30.0], standardize=True)
    outputs, scores = torch.tensor([[0.0], [3.0]]), torch.tensor([20.0, 20.0])  # standardized target 0
    assert problem.build_loss("mse")(outputs, scores).item() == pytest.approx(4.5)
    assert problem.build_loss("huber", 1.0)(outputs, scores).item() == pytest.approx((0 + 2.5) / 2)
    assert problem.unscale(np.array([1.0])) == pytest.approx(20.0 + np.std([10, 20, 30]))


def test_long_documents_regression_end_to_end(tmp_path, tiny_model_dir):
    records = [{"text": " ".join([r["text"]] * 8), "label": r["label"]} for r in score_records(16)]
    path = write_jsonl(tmp_path / "docs.jsonl", records)
    assert run_trainer("train_longdoc", tiny_model_dir, tmp_path / "out", "--data-path", path, "--val-path", path,
                       "--test-path", path, "--problem-type", "regression", "--standardize-targets",
                       "--epochs", "1") == 0
    model_dir = tmp_path / "out" / "checkpoint-best"
    toolkit = json.loads((model_dir / "config.json").read_text())["toolkit"]
    assert toolkit["problem_type"] == "regression" and toolkit["target_scaling"]["mean"] == pytest.approx(70.0)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert {"mae", "rmse", "pearson", "spearman"} <= set(metrics["test"]) and "constant_baseline" in metrics
    results = inference.predict_long_documents(inference.load_model(model_dir), [records[0]["text"]])
    assert 0 < results[0]["score"] < 200 and results[0]["num_chunks"] >= 2
