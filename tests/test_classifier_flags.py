"""train_classifier.py's head, data and technique flags: each test checks the flag's effect, not only that it runs."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from sklearn.metrics import average_precision_score, roc_auc_score

import infer
import train_classifier
from common import data, inference, modeldir, optimization, techniques
from common.heads import SequenceClassifier, pool_hidden_states
from common.text import build_normalizer
from conftest import make_text_records, write_jsonl
from test_classifier import run

SHORT_TEXT = "good movie"
LONG_TEXT = "this film was very very good and the movie is great and i love it"


def weights(directory):
    return load_file(str(directory / "model.safetensors"))


def toolkit_of(directory):
    return json.loads((directory / "config.json").read_text())["toolkit"]


def encode_batch(tokenizer, texts, max_length=64):
    return data.PaddingCollator(tokenizer.pad_token_id)(data.encode_texts(tokenizer, texts, None, max_length))


def capture_optimizer(monkeypatch):
    """Record the model handed to build_optimizer, its head weights at that moment, and the optimizer."""
    seen = {}
    original = optimization.build_optimizer

    def spy(model, *args, **kwargs):
        optimizer = original(model, *args, **kwargs)
        seen.update(model=model, optimizer=optimizer,
                    initial_head={name: value.detach().clone() for name, value in model.head.state_dict().items()})
        return optimizer
    monkeypatch.setattr(optimization, "build_optimizer", spy)
    return seen


# ---------------------------------------------------------------- pooling

@pytest.mark.parametrize("pooling", ["cls", "mean", "max"])
def test_pooled_vector_is_the_same_alone_and_in_a_padded_batch(tiny_model_dir, pooling):
    tokenizer = modeldir.load_tokenizer(str(tiny_model_dir))
    torch.manual_seed(0)
    model = SequenceClassifier(modeldir.load_pretrained_backbone(str(tiny_model_dir)), 2, pooling).eval()
    alone = encode_batch(tokenizer, [SHORT_TEXT])
    padded = encode_batch(tokenizer, [SHORT_TEXT, LONG_TEXT])
    assert padded["attention_mask"][0].sum() < padded["attention_mask"].shape[1]  # the short text is padded
    with torch.no_grad():
        vector_alone = model.encode(alone["input_ids"], alone["attention_mask"])[0]
        vector_padded = model.encode(padded["input_ids"], padded["attention_mask"])[0]
        states = model.backbone(input_ids=padded["input_ids"],
                                attention_mask=padded["attention_mask"]).last_hidden_state
    torch.testing.assert_close(vector_padded, vector_alone, atol=1e-5, rtol=1e-5)
    if pooling == "mean":  # padding positions carry states: an average over all positions would differ
        assert not torch.allclose(states[0].mean(0), vector_alone, atol=1e-4)


def test_mean_and_max_pooling_exclude_padding_positions():
    # real tokens all negative, padding large: a mask multiplied in (zeros) or padding left in would win
    hidden = torch.tensor([[[-1.0, -4.0], [-3.0, -2.0], [50.0, 60.0]]])  # (batch 1, seq 3, hidden 2)
    mask = torch.tensor([[1, 1, 0]])
    assert pool_hidden_states(hidden, mask, "mean").tolist() == [[-2.0, -3.0]]
    assert pool_hidden_states(hidden, mask, "max").tolist() == [[-1.0, -2.0]]
    assert pool_hidden_states(hidden, mask, "cls").tolist() == [[-1.0, -4.0]]


@pytest.mark.parametrize("pooling", ["mean", "max"])
def test_pooling_flag_reaches_the_model(tiny_model_dir, pooling):
    args = train_classifier.parse_args(["--data-path", "unused.jsonl", "--model-name", str(tiny_model_dir),
                                        "--pooling", pooling])
    model = train_classifier.build_model(args, 2, modeldir.load_tokenizer(str(tiny_model_dir)))
    assert model.pooling == pooling and model.head_settings["pooling"] == pooling
    assert model.backbone.pooler is None  # only --pooling pooler keeps (and trains) the pooler


def test_pooler_pooling_uses_and_trains_the_backbone_pooler(tmp_path, tiny_model_dir, text_data):
    assert run(tiny_model_dir, tmp_path / "out", "--data-path", str(text_data["train"]), "--val-path",
               str(text_data["val"]), "--pooling", "pooler") == 0
    best = tmp_path / "out" / "checkpoint-best"
    assert toolkit_of(best)["head"]["pooling"] == "pooler"
    pretrained = weights(tiny_model_dir)
    assert not torch.equal(weights(best)["backbone.pooler.dense.weight"], pretrained["pooler.dense.weight"])
    model, tokenizer, _, _ = SequenceClassifier.from_directory(best)
    batch = encode_batch(tokenizer, [SHORT_TEXT, LONG_TEXT])
    with torch.no_grad():
        outputs = model.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 token_type_ids=batch["token_type_ids"])
        pooled = model.encode(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    torch.testing.assert_close(pooled, outputs.pooler_output)
    assert not torch.allclose(pooled, outputs.last_hidden_state[:, 0])  # not the raw [CLS] state


# ---------------------------------------------------------------- head LayerNorm and dropout

def test_head_layernorm_and_dropout_are_built_trained_saved_and_reloaded(tmp_path, tiny_model_dir, text_data,
                                                                         monkeypatch):
    seen = capture_optimizer(monkeypatch)
    assert run(tiny_model_dir, tmp_path / "out", "--data-path", str(text_data["train"]), "--val-path",
               str(text_data["val"]), "--head-layernorm", "--dropout", "0.37") == 0
    trained = seen["model"]
    assert isinstance(trained.head.layernorm, torch.nn.LayerNorm) and trained.head.dropout.p == 0.37
    optimized = {id(p) for group in seen["optimizer"].param_groups for p in group["params"]}
    assert {id(p) for p in trained.head.layernorm.parameters()} <= optimized

    best = tmp_path / "out" / "checkpoint-best"
    config = json.loads((best / "config.json").read_text())
    assert config["toolkit"]["head"]["head_layernorm"] is True and config["toolkit"]["head"]["dropout"] == 0.37
    # --dropout is the head's: the encoder keeps its own dropout
    pretrained_config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["hidden_dropout_prob"] == pretrained_config["hidden_dropout_prob"]
    state = weights(best)
    assert not torch.equal(state["head.layernorm.weight"], torch.ones(32))  # learnt, not left at its init
    model, _, _, _ = SequenceClassifier.from_directory(best)
    assert isinstance(model.head.layernorm, torch.nn.LayerNorm) and model.head.dropout.p == 0.37
    assert torch.equal(model.head.layernorm.weight, state["head.layernorm.weight"])
    # the LayerNorm sits in the forward path: rescaling the pooled vector does not change the logits
    pooled = torch.randn(3, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.head(pooled * 10), model.head(pooled), atol=1e-4, rtol=1e-4)


def test_without_head_layernorm_the_head_has_none(tiny_model_dir):
    args = train_classifier.parse_args(["--data-path", "unused.jsonl", "--model-name", str(tiny_model_dir),
                                        "--dropout", "0.25"])
    model = train_classifier.build_model(args, 2, modeldir.load_tokenizer(str(tiny_model_dir)))
    assert isinstance(model.head.layernorm, torch.nn.Identity) and model.head.dropout.p == 0.25
    assert model.head_settings["dropout"] == 0.25 and model.head_settings["head_layernorm"] is False


# ---------------------------------------------------------------- frozen backbone

def test_freeze_backbone_trains_only_the_head(tmp_path, tiny_model_dir, text_data, monkeypatch):
    seen = capture_optimizer(monkeypatch)
    assert run(tiny_model_dir, tmp_path / "out", "--data-path", str(text_data["train"]), "--val-path",
               str(text_data["val"]), "--freeze-backbone", "--epochs", "2") == 0
    model = seen["model"]
    optimized = {id(p) for group in seen["optimizer"].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.head.parameters()}

    pretrained, state = weights(tiny_model_dir), weights(tmp_path / "out" / "checkpoint-best")
    backbone_keys = [key for key in state if key.startswith("backbone.")]
    assert len(backbone_keys) > 20
    changed = [key for key in backbone_keys if not torch.equal(state[key], pretrained[key[len("backbone."):]])]
    assert changed == []
    assert all(not torch.equal(state[f"head.{name}"], initial) for name, initial in seen["initial_head"].items())


# ---------------------------------------------------------------- preprocessing at inference

def test_inference_applies_the_stored_normalization_and_left_truncation(tmp_path, tiny_model_dir, text_data,
                                                                        monkeypatch, capsys):
    # full-width letters, a mention and a link at the end: normalization changes the tail kept by left truncation
    raw = "this film was very bad and sad but the movie is ＧＯＯＤ @someone http://t.cn/abc"
    test_path = write_jsonl(tmp_path / "test.jsonl", [{"text": raw, "label": "positive"},
                                                      {"text": "bad movie", "label": "negative"}])
    training_features = {}
    original_build = data.build_classification_dataset

    def record_features(tokenizer, examples, *args, **kwargs):
        dataset = original_build(tokenizer, examples, *args, **kwargs)
        training_features.update({example.locator: feature for example, feature in zip(examples, dataset.features)})
        return dataset
    monkeypatch.setattr(data, "build_classification_dataset", record_features)
    max_length = 8
    assert run(tiny_model_dir, tmp_path / "out", "--data-path", str(text_data["train"]), "--val-path",
               str(text_data["val"]), "--test-path", str(test_path), "--normalize", "--truncation-side", "left",
               "--max-length", str(max_length)) == 0
    trained_ids = training_features[f"{test_path} line 1"]["input_ids"]

    fed = []
    original_call = inference.TorchRunner.__call__

    def record_inputs(self, batch):
        fed.append({key: value.clone() for key, value in batch.items()})
        return original_call(self, batch)
    monkeypatch.setattr(inference.TorchRunner, "__call__", record_inputs)
    best = tmp_path / "out" / "checkpoint-best"
    assert infer.main(["--model-path", str(best), "--text", raw, "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["input"] == raw and result["label"] in ("negative", "positive")
    assert len(fed) == 1 and fed[0]["attention_mask"].all()
    inferred_ids = fed[0]["input_ids"][0].tolist()

    tokenizer = modeldir.load_tokenizer(str(best))
    normalized = build_normalizer(toolkit_of(best)["preprocessing"]["normalize"])(raw)
    assert normalized == "this film was very bad and sad but the movie is GOOD @user http"

    def encoded(text, side):
        return data.encode_texts(tokenizer, [text], None, max_length, side)[0]["input_ids"]
    assert len(inferred_ids) == max_length
    assert inferred_ids == trained_ids == encoded(normalized, "left")
    assert inferred_ids[-2] == tokenizer.convert_tokens_to_ids("http")  # the end of the text is kept
    for other in (encoded(raw, "left"), encoded(normalized, "right"), encoded(raw, "right")):
        assert inferred_ids != other


# ---------------------------------------------------------------- binary metrics

def test_binary_metrics_match_sklearn_on_the_saved_model(tmp_path, tiny_model_dir, text_data):
    assert run(tiny_model_dir, tmp_path / "out", "--data-path", str(text_data["train"]), "--val-path",
               str(text_data["val"]), "--test-path", str(text_data["test"])) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    model, tokenizer, toolkit, config = SequenceClassifier.from_directory(tmp_path / "out" / "checkpoint-best")
    for split, path in (("validation", text_data["val"]), ("test", text_data["test"])):
        examples = data.load_text_examples(path)
        truth = np.array([config.label2id[example.raw_label] for example in examples])
        positive = []
        for example in examples:  # one at a time: no padding, no batching effects
            batch = encode_batch(tokenizer, [example.text], toolkit["preprocessing"]["max_length"])
            with torch.no_grad():
                logits = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
            positive.append(torch.softmax(logits, -1)[0, 1].item())
        assert metrics[split]["roc_auc"] == pytest.approx(roc_auc_score(truth, positive), abs=1e-6)
        assert metrics[split]["pr_auc"] == pytest.approx(average_precision_score(truth, positive), abs=1e-6)
        assert 0.0 <= metrics[split]["roc_auc"] <= 1.0 and 0.0 <= metrics[split]["pr_auc"] <= 1.0


def test_three_class_metrics_have_no_roc_or_pr_auc(tmp_path, tiny_model_dir):
    records = make_text_records(8) + [{"text": text, "label": "sports"}
                                      for text in ["sports news", "the game", "a team", "great game"] * 2]
    path = write_jsonl(tmp_path / "three.jsonl", records)
    assert run(tiny_model_dir, tmp_path / "out", "--data-path", str(path), "--val-ratio", "0.3",
               "--test-path", str(path)) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    for split in ("validation", "test"):
        assert len(metrics[split]["per_class"]) == 3
        assert "roc_auc" not in metrics[split] and "pr_auc" not in metrics[split]


# ---------------------------------------------------------------- weighted sampler

def test_weighted_sampler_balances_the_training_batches(tmp_path, tiny_model_dir, text_data, monkeypatch):
    records = make_text_records(40)
    imbalanced = [r for r in records if r["label"] == "negative"] + \
        [r for r in records if r["label"] == "positive"][:8]  # 40 negative, 8 positive
    path = write_jsonl(tmp_path / "imbalanced.jsonl", imbalanced)
    seen_labels, loaders = [], []
    original_loss, original_loader = train_classifier.compute_loss, train_classifier.build_train_loader

    def record_labels(model, inputs, labels, *args):
        seen_labels.extend(labels.tolist())
        return original_loss(model, inputs, labels, *args)

    def record_loader(dataset, args, context, sample_weights=None):
        loaders.append((dataset, sample_weights))
        return original_loader(dataset, args, context, sample_weights)
    monkeypatch.setattr(train_classifier, "compute_loss", record_labels)
    monkeypatch.setattr(train_classifier, "build_train_loader", record_loader)
    assert run(tiny_model_dir, tmp_path / "out", "--data-path", str(path), "--val-path", str(text_data["val"]),
               "--sampler", "weighted", "--epochs", "4", "--patience", "0", "--learning-rate", "1e-4") == 0
    dataset, sample_weights = loaders[0]
    labels = np.array([feature["labels"] for feature in dataset.features])
    assert labels.mean() == pytest.approx(8 / 48)
    # each example weighs 1 / (its class's count): the 8 positives weigh 5 times the 40 negatives
    assert np.allclose(sample_weights, np.where(labels == 1, 1 / 8, 1 / 40))
    assert len(seen_labels) == 4 * 48  # draws with replacement, as many as the epoch has examples
    assert 0.38 < np.mean(seen_labels) < 0.62  # about half positive, against 17% in the data


def test_weighted_sampler_with_class_weights_warns(tiny_model_dir, capsys):
    common = ["--data-path", "unused.jsonl", "--model-name", str(tiny_model_dir), "--sampler", "weighted"]
    train_classifier.parse_args(common)
    assert "warning" not in capsys.readouterr().err
    train_classifier.parse_args(common + ["--class-weights", "balanced"])
    error = capsys.readouterr().err
    assert "warning: --sampler weighted together with --class-weights corrects the imbalance twice" in error


# ---------------------------------------------------------------- label smoothing

def test_label_smoothing_reaches_the_training_loss(tmp_path, tiny_model_dir, text_data, monkeypatch):
    calls = []
    original = techniques.build_loss

    def spy(name, class_weights=None, label_smoothing=0.0, *args, **kwargs):
        loss_fn = original(name, class_weights, label_smoothing, *args, **kwargs)

        def recorded(logits, labels):
            loss = loss_fn(logits, labels)
            calls.append((label_smoothing, logits.detach().clone(), labels.clone(), loss.item()))
            return loss
        return recorded
    monkeypatch.setattr(techniques, "build_loss", spy)
    assert run(tiny_model_dir, tmp_path / "out", "--data-path", str(text_data["train"]), "--val-path",
               str(text_data["val"]), "--label-smoothing", "0.2", "--max-steps", "1", "--logging-steps", "1") == 0
    smoothing, logits, labels, loss = calls[0]
    assert smoothing == 0.2
    rows = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    logged = next(row["loss"] for row in rows if row.get("step") == 1 and "loss" in row)
    smoothed = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.2).item()
    plain = torch.nn.functional.cross_entropy(logits, labels).item()
    assert logged == pytest.approx(loss, abs=1e-6) and loss == pytest.approx(smoothed, abs=1e-6)
    assert abs(smoothed - plain) > 1e-3


# ---------------------------------------------------------------- dataset summary and --extend-vocab

def test_dataset_summary_reports_lengths_and_truncation(tmp_path, tiny_model_dir, text_data, capsys):
    # 101 records, so p50, p90 and p99 fall exactly on records 50, 90 and 99 (no interpolation);
    # 10 words plus [CLS] and [SEP] fill --max-length 12 exactly: not truncated
    word_counts = [5] * 51 + [9] * 30 + [10] * 10 + [14] * 9 + [30]
    records = [{"text": " ".join(["good" if index % 2 else "bad"] * (count - 1) + ["zzz" if count == 30 else "movie"]),
                "label": "positive" if index % 2 else "negative"} for index, count in enumerate(word_counts)]
    path = write_jsonl(tmp_path / "lengths.jsonl", records)
    assert run(tiny_model_dir, tmp_path / "out", "--data-path", str(path), "--val-path", str(text_data["val"]),
               "--max-length", "12", "--max-steps", "1") == 0
    summary = json.loads((tmp_path / "out" / "dataset_summary.json").read_text())[0]
    assert summary["split"] == "train" and summary["records"] == 101
    # lengths count [CLS] and [SEP], measured before truncation
    assert summary["token_length"] == {"p50": 7, "p90": 12, "p99": 16, "max": 32}
    assert summary["truncated"] == 10 and summary["max_length"] == 12  # the 14- and 30-word records
    assert summary["classes"] == {"negative": {"count": 51, "share": round(51 / 101, 4)},
                                  "positive": {"count": 50, "share": round(50 / 101, 4)}}
    assert summary["unk_rate"] == round(1 / sum(word_counts), 4)  # the one "zzz"
    printed = capsys.readouterr().out
    assert "train: 101 records; tokens p50=7 p90=12 p99=16 max=32; 10 truncated at max_length=12" in printed


def test_extend_vocab_reports_the_unk_rate_before_and_after(tmp_path, tiny_model_dir, capsys):
    # every record has one word the vocabulary lacks (an emoji or 猫) among three tokens
    records = [{"text": text, "label": label} for text, label in
               [("good movie 😀", "positive"), ("great film 😀", "positive"),
                ("bad movie 猫", "negative"), ("terrible film 猫", "negative")] * 4]
    train_path = write_jsonl(tmp_path / "train.jsonl", records)
    val_path = write_jsonl(tmp_path / "val.jsonl", records[:4])
    before = counted_unk_rate(tiny_model_dir, [r["text"] for r in records])
    assert before == pytest.approx(1 / 3)
    assert run(tiny_model_dir, tmp_path / "out", "--data-path", str(train_path), "--val-path", str(val_path),
               "--extend-vocab", "2", "--max-steps", "1") == 0
    printed = capsys.readouterr().out
    assert "[UNK] rate of the training texts 33.33% before, 0.00% after" in printed
    summaries = json.loads((tmp_path / "out" / "dataset_summary.json").read_text())
    assert [s["unk_rate"] for s in summaries] == [0.0, 0.0]
    assert "train: 16 records" in printed and "[UNK] rate 0.00%" in printed


def counted_unk_rate(tiny_model_dir, texts):
    """The [UNK] share counted directly with the original tokenizer (special tokens excluded)."""
    tokenizer = modeldir.load_tokenizer(str(tiny_model_dir))
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    return sum(row.count(tokenizer.unk_token_id) for row in ids) / sum(len(row) for row in ids)


def test_freeze_backbone_with_extend_vocab_is_refused(tmp_path, tiny_model_dir, text_data, capsys):
    # the added tokens' embedding rows would stay random: refused before any work
    assert run(tiny_model_dir, tmp_path / "out", "--data-path", str(text_data["train"]), "--freeze-backbone",
               "--extend-vocab", "1") == 2
    assert "--freeze-backbone with --extend-vocab" in capsys.readouterr().err
