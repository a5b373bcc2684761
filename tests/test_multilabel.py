"""--problem-type multi_label on a tiny BERT: every record format, thresholds tuned on validation and
used by infer.py, the server, the ONNX export and --eval-only; bad labels; technique combinations."""
import asyncio
import csv
import json

import httpx
import numpy as np
import pytest
import torch

import export_onnx
import infer
import train_classifier
from common import inference, problem_types, server
from conftest import assert_one_error_line, run_trainer, write_json, write_jsonl

TOPICS = {"market": "stock price market", "music": "music song", "sports": "game team"}


def topic_records(count):
    """Every subset of the three topics in turn (the empty one included), its words as the text."""
    records = []
    for index in range(count):
        names = [name for bit, name in enumerate(TOPICS) if (index >> bit) & 1]
        records.append({"text": " ".join(TOPICS[name] for name in names) or "the film", "label": names})
    return records


def write_format(tmp_path, kind, records, name):
    """``records`` written in one record format; lists become "|"-joined strings where they must."""
    joined = ["|".join(r["label"]) for r in records]
    if kind == "csv":
        path = tmp_path / f"{name}.csv"
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text", "label"])
            writer.writerows([r["text"], labels] for r, labels in zip(records, joined))
        return path
    if kind == "message":
        return write_json(tmp_path / f"{name}.json", [{"message": r["text"], "context": "", "label": r["label"]}
                                                       for r in records])
    if kind == "chat":
        return write_json(tmp_path / f"{name}.json", [
            {"messages": [{"role": "user", "content": "topics?"}, {"role": "assistant", "content": r["text"]},
                          {"role": "tool", "content": labels}]} for r, labels in zip(records, joined)])
    return write_jsonl(tmp_path / f"{name}.jsonl", records)


def train(tiny_model_dir, output_dir, train_path, val_path, *extra):
    return run_trainer("train_classifier", tiny_model_dir, output_dir, "--data-path", train_path, "--val-path",
                       val_path, "--problem-type", "multi_label", *extra)


@pytest.fixture(scope="module")
def multilabel_run(tiny_model_dir, tmp_path_factory):
    """A multi-label model trained until it separates the three topics; returns (output dir, test file)."""
    tmp_path = tmp_path_factory.mktemp("multilabel")
    train_path = write_jsonl(tmp_path / "train.jsonl", topic_records(48))
    val_path = write_jsonl(tmp_path / "val.jsonl", topic_records(16))
    assert train(tiny_model_dir, tmp_path / "out", train_path, val_path, "--test-path", val_path,
                 "--epochs", "6", "--seed", "1") == 0
    return tmp_path / "out", val_path


@pytest.mark.parametrize("kind", ["jsonl", "csv", "message", "chat"])
def test_reads_label_lists_in_every_record_format(tmp_path, tiny_model_dir, kind):
    records = topic_records(16)
    assert train(tiny_model_dir, tmp_path / "out", write_format(tmp_path, kind, records, "train"),
                 write_format(tmp_path, kind, records[:8], "val"), "--label-separator", "|", "--max-steps", "2") == 0
    config = json.loads((tmp_path / "out" / "checkpoint-best" / "config.json").read_text())
    assert [config["id2label"][str(i)] for i in range(3)] == sorted(TOPICS)
    assert config["toolkit"]["problem_type"] == "multi_label"
    assert set(config["toolkit"]["thresholds"]) == set(TOPICS)
    summary = json.loads((tmp_path / "out" / "dataset_summary.json").read_text())[0]
    # 16 records cycle through the 8 subsets twice: each topic is in half of them, two in a quarter
    assert {name: entry["count"] for name, entry in summary["classes"].items()} == {name: 8 for name in TOPICS}
    assert summary["labels_per_example"] == {"mean": 1.5, "0": 2, "1": 6, "2": 6, "3+": 2}
    assert ["market", "sports", 4] in summary["co_occurring_pairs"]


def test_learns_and_stores_tuned_thresholds(multilabel_run):
    output_dir, _ = multilabel_run
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert metrics["test"]["micro_f1"] > 0.8
    for key in ("macro_f1", "weighted_f1", "samples_f1", "subset_accuracy", "hamming_loss"):
        assert key in metrics["test"]
    assert metrics["test"]["per_label"]["music"]["support"] == 8
    assert metrics["test"]["per_label"]["music"]["roc_auc"] is not None
    assert "test_at_threshold_0.5" in metrics and "constant_baseline" in metrics
    assert metrics["baseline"]["name"] == "tfidf-word-1-2+logreg-per-label"  # fitted on the same split
    assert set(metrics["baseline"]["per_label"]) == set(TOPICS)
    toolkit = json.loads((output_dir / "checkpoint-best" / "config.json").read_text())["toolkit"]
    assert toolkit["threshold_strategy"] == "per_label"
    # tuned on validation: no worse there than 0.5 for any label (per-label F1 is what was maximised)
    validation, fixed = metrics["validation"]["per_label"], metrics["validation_at_threshold_0.5"]["per_label"]
    assert all(validation[name]["f1"] >= fixed[name]["f1"] - 1e-9 for name in TOPICS)


def test_errors_list_missed_and_spurious_labels(tmp_path, tiny_model_dir):
    records = topic_records(16)
    path = write_jsonl(tmp_path / "d.jsonl", records)
    assert train(tiny_model_dir, tmp_path / "out", path, path, "--max-steps", "1") == 0  # an untrained model errs
    rows = [json.loads(line) for line in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
    assert rows
    for row in rows:
        true, predicted = set(row["true_labels"]), set(row["predicted_labels"])
        assert true != predicted
        assert set(row["missed"]) == true - predicted and set(row["spurious"]) == predicted - true


def test_infer_server_and_eval_only_use_the_stored_thresholds(multilabel_run, tmp_path, capsys):
    output_dir, test_path = multilabel_run
    model_dir = output_dir / "checkpoint-best"
    loaded = inference.load_model(model_dir)
    thresholds = loaded.toolkit["thresholds"]
    texts = [record["text"] for record in topic_records(8)]
    results = inference.classify(loaded, texts)
    for result in results:
        above = [name for name, p in result["probabilities"].items() if p >= thresholds[name]]
        assert result["labels"] == above and result["thresholds"] == pytest.approx(thresholds)
    assert results[3]["labels"] == ["market", "music"]  # "stock price market music song"
    # --threshold overrides every label's threshold
    assert infer.main(["--model-path", str(model_dir), "--text", texts[3], "--threshold", "0.0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["labels"] == sorted(TOPICS)
    # the server's /predict returns the same labels
    app = server.create_app(inference.build_service(loaded))

    async def post():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.post("/predict", json={"texts": texts})
    response = asyncio.run(post())
    assert response.status_code == 200
    assert [p["labels"] for p in response.json()["predictions"]] == [r["labels"] for r in results]
    # --eval-only reads the thresholds from the model (never re-tunes them on the test set)
    assert train_classifier.main(["--eval-only", "--model-path", str(model_dir), "--test-path", str(test_path),
                                  "--output-dir", str(tmp_path / "eval"), "--device", "cpu", "--precision", "fp32"]) == 0
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    trained = json.loads((output_dir / "metrics.json").read_text())
    assert evaluated["test"]["micro_f1"] == pytest.approx(trained["test"]["micro_f1"])
    assert json.loads((model_dir / "config.json").read_text())["toolkit"]["thresholds"] == thresholds


def test_onnx_export_gates_on_probabilities_and_returns_the_same_labels(multilabel_run, tmp_path):
    output_dir, test_path = multilabel_run
    onnx_path = tmp_path / "model.onnx"
    assert export_onnx.main(["--model-path", str(output_dir / "checkpoint-best"), "--output-path", str(onnx_path),
                             "--validation-file", str(test_path)]) == 0
    report = json.loads((tmp_path / "model.report.json").read_text())
    assert report["passed"] and all(case["label_agreement"] == 1.0 for case in report["cases"])
    assert report["validation"]["label_agreement"] == 1.0
    texts = [record["text"] for record in topic_records(8)]
    torch_results = inference.classify(inference.load_model(output_dir / "checkpoint-best"), texts)
    onnx_results = inference.classify(inference.load_model(onnx_path), texts)
    assert [r["labels"] for r in onnx_results] == [r["labels"] for r in torch_results]
    for torch_result, onnx_result in zip(torch_results, onnx_results):
        assert onnx_result["probabilities"] == pytest.approx(torch_result["probabilities"], abs=1e-4)


def test_per_label_thresholds_find_the_known_best():
    """Label 0: positives at 0.3 and 0.35, negatives at 0.1 and 0.2 (best cut between 0.2 and 0.3);
    label 1: positives at 0.9 and 0.8, negatives at 0.7 and 0.6 (between 0.7 and 0.8)."""
    probs = np.array([[0.3, 0.9], [0.35, 0.8], [0.1, 0.7], [0.2, 0.6]])
    targets = np.array([[1, 1], [1, 1], [0, 0], [0, 0]])
    logits = torch.logit(torch.tensor(probs, dtype=torch.float64))
    problem = problem_types.MultiLabel()
    thresholds = problem.tune_thresholds(logits, torch.tensor(targets), ["a", "b"])
    assert thresholds == pytest.approx({"a": 0.25, "b": 0.75}, abs=1e-4)
    assert problem.evaluation_metrics(logits, torch.tensor(targets), ["a", "b"])["micro_f1"] == 1.0
    assert problem.evaluation_metrics(logits, torch.tensor(targets), ["a", "b"], threshold=0.5)["micro_f1"] < 1.0
    # one global threshold: no single cut separates both labels; the best one keeps all four positives
    # and admits the two 0.6-0.7 negatives of label 1 (micro-F1 0.8), which 0.5 gives too
    best = problem.tune_thresholds(logits, torch.tensor(targets), ["a", "b"], "global")
    assert len(set(best.values())) == 1 and 0.2 < best["a"] <= 0.3


@pytest.mark.parametrize("labels, fragment", [
    (["music", "jazz"], "unknown label 'jazz'"),
    ({"music": 1}, "expected a list of labels"),
    ([["music"]], "expected label names"),
    (["music", "\ud800"], "lone UTF-16 surrogate"),  # was a UnicodeEncodeError traceback writing the summary
])
def test_a_bad_label_in_a_list_is_one_error_line(tmp_path, tiny_model_dir, capsys, labels, fragment):
    records = topic_records(8)
    path = write_jsonl(tmp_path / "train.jsonl", records)
    val_path = tmp_path / "val.jsonl"  # ASCII-escaped JSON: "\ud800" cannot be written as UTF-8
    val_path.write_text("".join(json.dumps(r) + "\n" for r in records[:3] + [{"text": "music", "label": labels}]))
    assert train(tiny_model_dir, tmp_path / "out", path, val_path) == 2
    assert_one_error_line(capsys.readouterr().err, f"{val_path} line 4: field 'label'", fragment)


def test_a_single_label_name_is_one_error_line(tmp_path, tiny_model_dir, capsys):
    """One label name gives one sigmoid column, which the multi-label metrics refused after the first
    epoch with a scikit-learn traceback."""
    records = [{"text": "music song", "label": ["music"]}, {"text": "the film", "label": []}] * 4
    path = write_jsonl(tmp_path / "d.jsonl", records)
    assert train(tiny_model_dir, tmp_path / "out", path, path) == 2
    assert_one_error_line(capsys.readouterr().err, "field 'label'", "'music' or none", "two or more label names")
    assert not (tmp_path / "out" / "train_log.jsonl").exists()


def test_a_label_named_twice_in_one_record_counts_once():
    parse = problem_types.MultiLabel().parse_label
    assert parse("f line 1: field 'label'", ["a", "a", " b", "b "]) == ["a", "b"]
    assert parse("f line 1: field 'label'", "a, a,b") == ["a", "b"]


@pytest.mark.parametrize("flags, fragment", [
    (["--loss", "focal"], "--loss focal does not apply"),
    (["--class-weights", "effective"], "--class-weights effective does not apply"),
    (["--metric-for-best-model", "accuracy"], "not a multi_label metric"),
    (["--standardize-targets"], "--standardize-targets is for --problem-type regression"),
])
def test_combinations_that_make_no_sense_are_refused(tmp_path, tiny_model_dir, capsys, flags, fragment):
    path = write_jsonl(tmp_path / "d.jsonl", topic_records(8))
    assert train(tiny_model_dir, tmp_path / "out", path, path, *flags) == 2
    assert_one_error_line(capsys.readouterr().err, fragment)


def test_techniques_that_make_sense_run(tmp_path, tiny_model_dir):
    """Balanced pos_weight, label smoothing, R-Drop (Bernoulli KL), FGM and EMA together."""
    path = write_jsonl(tmp_path / "d.jsonl", topic_records(16))
    assert train(tiny_model_dir, tmp_path / "out", path, path, "--class-weights", "balanced", "--label-smoothing",
                 "0.1", "--rdrop-alpha", "1.0", "--adversarial", "fgm", "--ema-decay", "0.5", "--max-steps", "2") == 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(row["loss"]) for row in rows if "loss" in row)


def test_bernoulli_consistency_is_zero_only_for_equal_passes():
    problem = problem_types.MultiLabel()
    logits = torch.tensor([[0.5, -1.0, 2.0]])
    assert problem.consistency(logits, logits).item() == pytest.approx(0.0, abs=1e-7)
    assert problem.consistency(logits, logits + 1).item() > 0
    assert problem.consistency(logits, -logits).item() == pytest.approx(problem.consistency(-logits, logits).item())


def test_balanced_pos_weight_is_negatives_over_positives():
    weights = problem_types.MultiLabel.balanced_pos_weight([[1, 0], [1, 0], [0, 1], [1, 0]])
    assert weights.tolist() == pytest.approx([1 / 3, 3.0])


def test_long_documents_multi_label_end_to_end(tmp_path, tiny_model_dir):
    """train_longdoc.py: document logits aggregated over windows, thresholds tuned and used by inference."""
    records = [{"text": " ".join([r["text"]] * 4), "label": r["label"]} for r in topic_records(16)]
    path = write_jsonl(tmp_path / "docs.jsonl", records)
    assert run_trainer("train_longdoc", tiny_model_dir, tmp_path / "out", "--data-path", path, "--val-path", path,
                       "--test-path", path, "--problem-type", "multi_label", "--epochs", "2") == 0
    model_dir = tmp_path / "out" / "checkpoint-best"
    toolkit = json.loads((model_dir / "config.json").read_text())["toolkit"]
    assert toolkit["task"] == "longdoc" and toolkit["problem_type"] == "multi_label"
    assert set(toolkit["thresholds"]) == set(TOPICS)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert set(metrics["test"]["by_aggregation"]) == {"mean", "max", "logsumexp"}
    assert "test_at_threshold_0.5" in metrics and "micro_f1" in metrics["baseline"]
    results = inference.predict_long_documents(inference.load_model(model_dir), [records[3]["text"]])
    probabilities, thresholds = results[0]["probabilities"], results[0]["thresholds"]
    assert results[0]["labels"] == [name for name in sorted(TOPICS) if probabilities[name] >= thresholds[name]]
    assert results[0]["num_chunks"] >= 2


def test_infer_refuses_a_temperature_and_prints_the_labels(multilabel_run, capsys):
    model_dir = multilabel_run[0] / "checkpoint-best"
    assert infer.main(["--model-path", str(model_dir), "--text", "music song", "--temperature", "2"]) == 2
    assert_one_error_line(capsys.readouterr().err, "--temperature is for single_label models", "multi_label model")
    assert infer.main(["--model-path", str(model_dir), "--text", "music song"]) == 0
    printed = capsys.readouterr().out
    assert "predicted labels: " in printed and "(threshold " in printed
