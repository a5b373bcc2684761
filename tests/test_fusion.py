"""--fuse-baseline: the single-label classifier fused with its TF-IDF baseline, the baseline's share tuned
on validation, stored without pickle, and applied wherever the model is used (infer, server, ONNX)."""
import json

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from common import baselines, fusion, inference
from common.errors import UserError
from conftest import assert_one_error_line, make_text_records, run_trainer, write_jsonl

TEXTS = ["good film", "great acting", "bad plot", "awful music", "fine story", "dull scenes", "lovely cast",
         "terrible end", "good music", "bad acting", "great end", "dull plot"]


def fitted(labels, num_labels):
    return baselines.TextBaseline.fit(TEXTS, labels, num_labels)


@pytest.mark.parametrize("labels,num_labels", [([0, 0, 1, 1] * 3, 2), ([0, 1, 2] * 4, 3), ([0, 2, 3] * 4, 4)])
def test_a_stored_baseline_gives_sklearns_probabilities(tmp_path, labels, num_labels):
    baseline = fitted(labels, num_labels)
    path = tmp_path / fusion.BASELINE_FILE
    path.write_bytes(fusion.baseline_bytes(baseline))
    loaded = fusion.load_baseline(path, num_labels)
    queries = ["good acting", "awful plot", "unseen words", ""]
    vectorizer, _, _ = baselines.build_vectorizer(TEXTS)
    reference = LogisticRegression(max_iter=2000, random_state=baselines.RANDOM_STATE).fit(
        vectorizer.fit_transform(TEXTS), labels)
    expected = np.zeros((len(queries), num_labels))
    expected[:, reference.classes_] = reference.predict_proba(vectorizer.transform(queries))
    np.testing.assert_allclose(loaded.probabilities(queries), expected, atol=1e-5)
    assert loaded.name == baseline.name == "tfidf-word-1-2+logreg"
    assert (loaded.probabilities(queries)[:, 1] == 0).all() if num_labels == 4 else True  # label 1 never seen


def test_the_share_is_tuned_on_validation_and_the_smallest_of_equals_wins():
    labels = np.array([0, 1, 0, 1, 0, 1])
    right = np.eye(2)[labels] * 0.8 + 0.1  # confident and right
    wrong = np.eye(2)[1 - labels] * 0.8 + 0.1  # confident and wrong
    weight, table = fusion.tune_weight(right, wrong, labels, ["a", "b"])
    assert weight == 0.0 and set(table) == set(fusion.FUSION_WEIGHTS)
    unsure = np.full((6, 2), 0.5) + np.array([0.01, -0.01])  # leans to "a" everywhere
    weight, table = fusion.tune_weight(unsure, right, labels, ["a", "b"])
    assert weight == 0.1 and table[0.1] == 1.0 and table[0.0] < 1.0  # a little of the baseline decides
    assert max(fusion.FUSION_WEIGHTS) < 1.0  # the fine-tuned model always keeps a share


def damage(path, how):
    good = path.read_bytes()
    if how == "missing":
        path.unlink()
    elif how == "garbage":
        path.write_bytes(b"not a safetensors file at all")
    elif how == "truncated":
        path.write_bytes(good[:len(good) // 2])


@pytest.mark.parametrize("how", ["missing", "garbage", "truncated"])
def test_a_damaged_baseline_file_is_one_line_naming_it(tmp_path, how):
    path = tmp_path / fusion.BASELINE_FILE
    path.write_bytes(fusion.baseline_bytes(fitted([0, 1] * 6, 2)))
    damage(path, how)
    with pytest.raises(UserError, match=str(path)):
        fusion.load_baseline(path, 2)


def rewritten(path, change):
    """The baseline file at ``path`` rewritten with ``change(tensors, metadata)`` applied."""
    from safetensors import safe_open
    from safetensors.numpy import save
    with safe_open(str(path), framework="numpy") as stored:
        metadata, tensors = dict(stored.metadata()), {name: stored.get_tensor(name) for name in stored.keys()}
    change(tensors, metadata)
    path.write_bytes(save(tensors, metadata))


def set_vocabulary_index(tensors, metadata):
    vocabulary = json.loads(metadata["vocabulary"])
    vocabulary[next(iter(vocabulary))] = "0"
    metadata["vocabulary"] = json.dumps(vocabulary)


@pytest.mark.parametrize("change,fragment", [
    (set_vocabulary_index, "vocabulary indices"),
    (lambda t, m: t.update(classes=t["classes"].astype(np.float32)), "class ids"),
    (lambda t, m: t.update(intercepts=np.array([np.nan], dtype=np.float32)), "NaN"),
    (lambda t, m: t.update(idf=t["idf"][:-1]), "idf"),
    (lambda t, m: m.update(vectorizer=json.dumps(dict(json.loads(m["vectorizer"]), analyzer={"x": 1}))),
     "vectorizer settings"),
    (lambda t, m: m.update(vectorizer="[1, 2]"), "JSON objects"),
    (lambda t, m: m.pop("vocabulary"), "vocabulary"),
])
def test_a_hand_edited_baseline_is_refused_at_load(tmp_path, change, fragment):
    path = tmp_path / fusion.BASELINE_FILE
    path.write_bytes(fusion.baseline_bytes(fitted([0, 1] * 6, 2)))
    rewritten(path, change)
    with pytest.raises(UserError, match=fragment) as error:
        fusion.load_baseline(path, 2)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_a_baseline_for_other_labels_is_refused(tmp_path):
    path = tmp_path / fusion.BASELINE_FILE
    path.write_bytes(fusion.baseline_bytes(fitted([0, 1, 2] * 4, 3)))
    with pytest.raises(UserError, match="class ids"):
        fusion.load_baseline(path, 2)


# ---------------------------------------------------------------- the trainers and everything that loads a model

@pytest.fixture
def separable(tmp_path):
    """Training, validation and test files a TF-IDF baseline gets right and a 1-epoch tiny BERT does not."""
    # 100 validation records, 50 of each class: the least that may tune the share (as for a temperature)
    return {split: write_jsonl(tmp_path / f"{split}.jsonl", make_text_records(count))
            for split, count in (("train", 24), ("val", 50), ("test", 8))}


def train_fused(script, tiny_model_dir, data, output_dir, *extra):
    argv = ["--data-path", data["train"], "--val-path", data["val"], "--test-path", data["test"],
            "--fuse-baseline", "true", "--learning-rate", "1e-6", *extra]
    return run_trainer(script, tiny_model_dir, output_dir, *argv)


def test_a_fused_classifier_is_stored_and_used_by_infer_and_the_server(tiny_model_dir, separable, tmp_path):
    assert train_fused("train_classifier", tiny_model_dir, separable, tmp_path / "out") == 0
    model_dir = tmp_path / "out" / "checkpoint-best"
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    weight = metrics["fusion"]["weight"]
    assert weight > 0 and metrics["fusion"]["evaluation"]["accuracy"] >= metrics["test"]["accuracy"]
    toolkit = json.loads((model_dir / "config.json").read_text())["toolkit"]
    assert toolkit["baseline_fusion"] == {"weight": weight, "baseline": metrics["baseline"]["name"]}
    checksums = json.loads((model_dir / "checksums.json").read_text())
    assert fusion.BASELINE_FILE in checksums  # written before the checksums were refreshed
    card = (model_dir / "MODEL_CARD.md").read_text()
    fused_row = f"| this model fused with the TF-IDF baseline (its share {weight:g}) | test | "
    assert fused_row + f"{metrics['fusion']['evaluation']['accuracy']:.4f} |" in card
    assert "- `baseline_fusion`: weight" in card

    loaded = inference.load_model(model_dir)
    texts = [record["text"] for record in make_text_records(2)]
    results = inference.classify(loaded, texts, with_logits=True)
    model_only = inference.softmax(np.array([result["logits"] for result in results]), loaded.toolkit["temperature"])
    expected = (1 - weight) * model_only + weight * loaded.baseline.probabilities(texts)
    shown = np.array([[result["probabilities"][name] for name in loaded.label_names] for result in results])
    np.testing.assert_allclose(shown, expected, atol=1e-5)
    assert all(result["baseline_weight"] == weight for result in results)
    info = inference.ClassificationService(loaded).info()
    assert info["baseline_fusion"] == {"baseline": loaded.baseline.name, "weight": weight}


def test_a_fused_classifier_exports_its_baseline_beside_the_graph(tiny_model_dir, separable, tmp_path):
    import export_onnx
    assert train_fused("train_classifier", tiny_model_dir, separable, tmp_path / "out") == 0
    model_dir, onnx_path = tmp_path / "out" / "checkpoint-best", tmp_path / "export" / "model.onnx"
    assert export_onnx.main(["--model-path", str(model_dir), "--output-path", str(onnx_path)]) == 0
    assert fusion.baseline_path_of_onnx(onnx_path).is_file()
    texts = [record["text"] for record in make_text_records(3)]
    from_torch = inference.classify(inference.load_model(model_dir), texts)
    from_onnx = inference.classify(inference.load_model(onnx_path), texts)
    assert [r["label"] for r in from_onnx] == [r["label"] for r in from_torch]
    assert all(r["baseline_weight"] == from_torch[0]["baseline_weight"] > 0 for r in from_onnx)
    fusion.baseline_path_of_onnx(onnx_path).unlink()
    with pytest.raises(UserError, match="model.baseline.safetensors"):
        inference.load_model(onnx_path)


def test_a_fused_long_document_classifier_fuses_whole_documents(tiny_model_dir, separable, tmp_path):
    assert train_fused("train_longdoc", tiny_model_dir, separable, tmp_path / "out") == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    loaded = inference.load_model(tmp_path / "out" / "checkpoint-best")
    assert loaded.baseline is not None and loaded.baseline_weight == metrics["fusion"]["weight"] > 0
    results = inference.predict_long_documents(loaded, ["good film good film", "bad plot bad plot"])
    assert all(result["baseline_weight"] == loaded.baseline_weight and "num_chunks" in result for result in results)


def test_when_fusing_does_not_help_on_validation_the_model_is_stored_alone(tiny_model_dir, tmp_path):
    # every label is the same word salad: the baseline can only guess, so a share of 0 ties the best
    records = [{"text": "same words here", "label": label} for label in ("negative", "positive") * 50]
    data = {split: write_jsonl(tmp_path / f"{split}.jsonl", records) for split in ("train", "val", "test")}
    assert train_fused("train_classifier", tiny_model_dir, data, tmp_path / "out") == 0
    model_dir = tmp_path / "out" / "checkpoint-best"
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["fusion"]["weight"] == 0
    assert not (model_dir / fusion.BASELINE_FILE).exists()
    assert "baseline_fusion" not in json.loads((model_dir / "config.json").read_text())["toolkit"]
    assert inference.load_model(model_dir).baseline is None


@pytest.mark.parametrize("extra,fragment", [(["--baseline", "none"], "drop --baseline none"),
                                            (["--problem-type", "multi_label"], "single-label")])
def test_fusion_without_its_baseline_or_one_label_is_refused_before_training(tiny_model_dir, separable, tmp_path,
                                                                             capsys, extra, fragment):
    import train_classifier
    code = train_classifier.main(["--data-path", str(separable["train"]), "--model-name", str(tiny_model_dir),
                                  "--output-dir", str(tmp_path / "out"), "--fuse-baseline", "true", *extra])
    assert code == 2 and not (tmp_path / "out").exists()
    assert_one_error_line(capsys.readouterr().err, "--fuse-baseline", fragment)


def test_a_hand_edited_fusion_on_a_multi_label_model_is_refused(tmp_path):
    toolkit = {"task": "classifier", "problem_type": "multi_label", "baseline_fusion": {"weight": 0.3}}
    with pytest.raises(UserError, match="only a single-label classifier"):
        fusion.load_for_model(toolkit, tmp_path / fusion.BASELINE_FILE, 2, tmp_path / "config.json")


def test_eval_only_reports_a_fused_models_figures_with_its_stored_share(tiny_model_dir, separable, tmp_path, capsys):
    import train_classifier
    assert train_fused("train_classifier", tiny_model_dir, separable, tmp_path / "out") == 0
    trained = json.loads((tmp_path / "out" / "metrics.json").read_text())["fusion"]
    capsys.readouterr()
    assert train_classifier.main(["--eval-only", "--model-path", str(tmp_path / "out" / "checkpoint-best"),
                                  "--test-path", str(separable["test"]), "--output-dir", str(tmp_path / "eval"),
                                  "--device", "cpu", "--precision", "fp32"]) == 0
    headline = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())["fusion"]
    assert evaluated["weight"] == trained["weight"]
    assert headline["fused_accuracy"] == evaluated["evaluation"]["accuracy"] == trained["evaluation"]["accuracy"]


def test_a_validation_set_too_small_to_choose_a_share_stores_the_model_alone(tiny_model_dir, separable, tmp_path):
    separable["val"] = write_jsonl(tmp_path / "small_val.jsonl", make_text_records(8))
    assert train_fused("train_classifier", tiny_model_dir, separable, tmp_path / "out") == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["fusion"]["weight"] == 0 and "only 16 validation examples" in metrics["fusion"]["skipped"]
    assert metrics["baseline"]["accuracy"] >= 0.0  # the baseline is still shown beside the model
    assert inference.load_model(tmp_path / "out" / "checkpoint-best").baseline is None


def test_the_server_answers_with_the_fused_probabilities(tiny_model_dir, separable, tmp_path):
    import asyncio

    from common import server
    from test_server import client_for
    assert train_fused("train_classifier", tiny_model_dir, separable, tmp_path / "out") == 0
    loaded = inference.load_model(tmp_path / "out" / "checkpoint-best")
    texts = ["good film good acting", "bad plot"]
    expected = inference.classify(loaded, texts)
    app = server.create_app(inference.build_service(loaded), batch_wait_ms=0)

    async def calls():
        async with client_for(app) as client:
            return [await client.post("/predict", json=body) for body in
                    ({"texts": texts}, *({"inputs": text} for text in texts))]  # ours, then TEI's one at a time
    ours, *tei = asyncio.run(calls())
    assert all(response.status_code == 200 for response in (ours, *tei)), [r.text for r in (ours, *tei)]
    for answer, wanted in zip(ours.json()["predictions"], expected):
        assert answer["probabilities"] == wanted["probabilities"] and answer["baseline_weight"] > 0
    for answer, wanted in zip(tei, expected):
        assert {row["label"]: row["score"] for row in answer.json()} == wanted["probabilities"]


def test_an_unfused_model_exported_over_a_fused_export_leaves_no_baseline_behind(tiny_model_dir, separable,
                                                                                  tmp_path):
    import export_onnx
    assert train_fused("train_classifier", tiny_model_dir, separable, tmp_path / "fused") == 0
    assert run_trainer("train_classifier", tiny_model_dir, tmp_path / "alone", "--data-path", separable["train"],
                       "--val-path", separable["val"]) == 0
    onnx_path = tmp_path / "export" / "model.onnx"
    for model_dir, extra in ((tmp_path / "fused", []), (tmp_path / "alone", ["--overwrite-output"])):
        assert export_onnx.main(["--model-path", str(model_dir / "checkpoint-best"), "--output-path",
                                 str(onnx_path), *extra]) == 0
    assert not fusion.baseline_path_of_onnx(onnx_path).exists()
    assert inference.load_model(onnx_path).baseline is None
