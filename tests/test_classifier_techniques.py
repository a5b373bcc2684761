"""Issue 3 flags wired into train_classifier.py: each test checks the flag does what it says."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import train_classifier
from common import data
from conftest import make_text_records, write_jsonl

EMBEDDING_KEY = "backbone.embeddings.word_embeddings.weight"


def run(tiny_model_dir, output_dir, train_path, *extra):
    return train_classifier.main(["--model-name", str(tiny_model_dir), "--output-dir", str(output_dir),
                                  "--data-path", str(train_path), "--precision", "fp32", "--epochs", "1",
                                  "--batch-size", "8", "--learning-rate", "5e-3", "--save-steps", "0",
                                  "--val-ratio", "0.25", *extra])


def pretrained_embeddings(tiny_model_dir):
    return load_file(str(tiny_model_dir / "model.safetensors"))["embeddings.word_embeddings.weight"]


def saved(output_dir, key=EMBEDDING_KEY):
    return load_file(str(output_dir / "checkpoint-best" / "model.safetensors"))[key]


@pytest.mark.parametrize("method", ["fgm", "pgd"])
def test_adversarial_training_restores_the_embeddings(tmp_path, tiny_model_dir, text_data, method):
    # with a zero learning rate nothing may change the weights: a perturbation left behind would show
    assert run(tiny_model_dir, tmp_path / "out", text_data["train"], "--adversarial", method,
               "--adv-epsilon", "0.5", "--learning-rate", "0", "--weight-decay", "0") == 0
    assert torch.equal(saved(tmp_path / "out"), pretrained_embeddings(tiny_model_dir))


def test_ema_weights_are_what_gets_evaluated_and_saved(tmp_path, tiny_model_dir, text_data):
    # decay 1.0 keeps the average at the initial weights although training moves the live weights
    assert run(tiny_model_dir, tmp_path / "ema", text_data["train"], "--ema-decay", "1.0") == 0
    assert run(tiny_model_dir, tmp_path / "plain", text_data["train"]) == 0
    assert torch.equal(saved(tmp_path / "ema"), pretrained_embeddings(tiny_model_dir))
    assert not torch.equal(saved(tmp_path / "plain"), pretrained_embeddings(tiny_model_dir))


def test_class_weights_reach_the_loss(tmp_path, tiny_model_dir, monkeypatch):
    from common import techniques
    seen = {}
    original = techniques.build_loss

    def spy(name, class_weights=None, *args, **kwargs):
        seen["name"], seen["weights"] = name, class_weights
        return original(name, class_weights, *args, **kwargs)
    monkeypatch.setattr(techniques, "build_loss", spy)
    records = make_text_records(16)
    imbalanced = [r for r in records if r["label"] == "negative"] + [r for r in records if r["label"] == "positive"][:4]
    path = write_jsonl(tmp_path / "imbalanced.jsonl", imbalanced)
    assert run(tiny_model_dir, tmp_path / "out", path, "--class-weights", "balanced", "--loss", "focal") == 0
    weights = seen["weights"].cpu().numpy()
    assert seen["name"] == "focal" and weights[1] > 2 * weights[0]  # the rare class weighs more


def test_weighted_sampler_balances_the_batches():
    labels = np.array([0] * 90 + [1] * 10)
    counts = np.bincount(labels)
    sampler = data.LengthGroupedBatchSampler([5] * 100, batch_size=10, seed=0,
                                             sample_weights=(1.0 / counts)[labels])
    drawn = labels[[i for batch in sampler for i in batch]]
    assert 0.35 < drawn.mean() < 0.65  # about half are the 10% class


def test_rdrop_adds_a_consistency_term_only_with_dropout(tiny_model_dir):
    from common.heads import SequenceClassifier
    from common.modeldir import load_pretrained_backbone
    from common.techniques import build_loss
    torch.manual_seed(0)
    model = SequenceClassifier(load_pretrained_backbone(str(tiny_model_dir)), 2, dropout=0.5).train()
    inputs = {"input_ids": torch.tensor([[2, 10, 11, 3]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    labels, loss_fn = torch.tensor([1]), build_loss("ce")
    torch.manual_seed(1)
    with_rdrop = train_classifier.compute_loss(model, inputs, labels, loss_fn, rdrop_alpha=4.0)
    model.eval()  # no dropout: both passes agree, the KL term vanishes
    assert train_classifier.compute_loss(model, inputs, labels, loss_fn, 4.0).item() == pytest.approx(
        loss_fn(model(**inputs), labels).item(), abs=1e-6)
    model.train()
    torch.manual_seed(1)
    doubled = {key: torch.cat([value, value]) for key, value in inputs.items()}
    logits_a, logits_b = model(**doubled).chunk(2)
    assert with_rdrop.item() > ((loss_fn(logits_a, labels) + loss_fn(logits_b, labels)) / 2).item()


def test_calibration_is_stored_and_used_as_the_default_temperature(tmp_path, tiny_model_dir, text_data):
    assert run(tiny_model_dir, tmp_path / "out", text_data["train"], "--epochs", "4") == 0
    config = json.loads((tmp_path / "out" / "checkpoint-best" / "config.json").read_text())
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert config["toolkit"]["temperature"] == pytest.approx(metrics["calibration"]["temperature"])
    assert metrics["calibration"]["nll_after"] <= metrics["calibration"]["nll_before"] + 1e-6
    for picture in ("reliability_diagram.png", "confusion_matrix.png", "training_curves.png"):
        assert (tmp_path / "out" / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_only_reproduces_the_test_metrics_and_groups(tmp_path, tiny_model_dir, text_data):
    records = [dict(r, source="weibo" if i % 2 else "news") for i, r in enumerate(make_text_records(8))]
    test_path = write_jsonl(tmp_path / "grouped.jsonl", records)
    assert run(tiny_model_dir, tmp_path / "out", text_data["train"], "--test-path", str(test_path),
               "--group-field", "source", "--val-path", str(text_data["val"])) == 0
    trained = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert set(trained["test_by_group"]) == {"news", "weibo"}
    assert train_classifier.main(["--eval-only", "--model-path", str(tmp_path / "out" / "checkpoint-best"),
                                  "--test-path", str(test_path), "--output-dir", str(tmp_path / "eval"),
                                  "--group-field", "source", "--precision", "fp32"]) == 0
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert evaluated["test"]["accuracy"] == trained["test"]["accuracy"]
    assert evaluated["test_by_group"] == trained["test_by_group"]
    errors = [json.loads(line) for line in (tmp_path / "eval" / "errors.jsonl").read_text().splitlines()]
    assert all(e["true_label"] != e["predicted_label"] for e in errors)


def test_text_options_are_stored_in_the_model_directory(tmp_path, tiny_model_dir):
    records = [dict(r, text=r["text"] + " 😀 @someone http://x.cn") for r in make_text_records(12)]
    path = write_jsonl(tmp_path / "social.jsonl", records)
    assert run(tiny_model_dir, tmp_path / "out", path, "--normalize", "--extend-vocab", "2",
               "--truncation-side", "left") == 0
    best = tmp_path / "out" / "checkpoint-best"
    preprocessing = json.loads((best / "config.json").read_text())["toolkit"]["preprocessing"]
    assert preprocessing["truncation_side"] == "left" and preprocessing["normalize"] is not None
    from common.modeldir import load_tokenizer
    tokenizer = load_tokenizer(str(best))
    assert len(tokenizer) > len(load_tokenizer(str(tiny_model_dir)))  # --extend-vocab tokens were saved
    assert saved(tmp_path / "out").shape[0] == len(tokenizer)  # and the embeddings resized to match
