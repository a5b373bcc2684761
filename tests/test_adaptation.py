"""--new-token-init, --new-token-lr, --mlm-adapt-steps and --unlabeled-path (common/adaptation.py,
common/optimization.py), alone and in every trainer."""
import argparse
import copy

import pytest
import torch

from common import adaptation, modeldir, optimization
from common.training import resolve_precision
from common.vocab import extend_vocabulary, fit_embeddings_to_tokenizer
from conftest import assert_one_error_line, make_text_records, run_trainer, write_jsonl

ADDED_TEXTS = ["猫狗鱼鸟 good", "鸟鱼狗猫 bad"]  # four characters the tiny vocabulary lacks


def extended_backbone(tiny_model_dir, init="random"):
    tokenizer = modeldir.load_tokenizer(str(tiny_model_dir))
    backbone = modeldir.load_pretrained_backbone(str(tiny_model_dir))
    extend_vocabulary(tokenizer, ADDED_TEXTS, 1)
    fit_embeddings_to_tokenizer(backbone, tokenizer, init)
    return backbone, tokenizer


def options(**overrides):
    values = dict(learning_rate=1e-3, weight_decay=0.01, adam_epsilon=1e-8, new_token_lr=None, mlm_adapt_steps=0,
                  max_length=16, batch_size=4, seed=0, max_grad_norm=1.0, device_obj=torch.device("cpu"),
                  precision_obj=resolve_precision("fp32", torch.device("cpu")))
    return argparse.Namespace(**{**values, **overrides})


def one_step_update(backbone, tokenizer, args):
    """How far one AdamW step moves each embedding row."""
    optimizer = optimization.build_optimizer(backbone, args.learning_rate, args.weight_decay, device=None)
    optimization.scale_new_token_updates(optimizer, backbone, args)
    before = backbone.get_input_embeddings().weight.detach().clone()
    inputs = tokenizer(ADDED_TEXTS, padding=True, return_tensors="pt")
    backbone(**inputs).last_hidden_state.pow(2).mean().backward()
    optimizer.step()
    return backbone.get_input_embeddings().weight.detach() - before


def test_new_token_lr_scales_only_the_added_rows_update(tiny_model_dir):
    torch.manual_seed(0)
    backbone, tokenizer = extended_backbone(tiny_model_dir)
    twin = copy.deepcopy(backbone)
    first_new = backbone.get_input_embeddings().first_added_row
    plain = one_step_update(backbone, tokenizer, options())
    faster = one_step_update(twin, tokenizer, options(new_token_lr=1e-2))
    assert plain[first_new:].abs().sum() > 0
    assert torch.allclose(faster[first_new:], 10 * plain[first_new:], atol=1e-7)
    assert torch.allclose(faster[:first_new], plain[:first_new], atol=1e-9)


def test_mlm_adaptation_trains_the_backbone_in_place_and_the_added_rows(tiny_model_dir, capsys):
    torch.manual_seed(0)
    backbone, tokenizer = extended_backbone(tiny_model_dir)
    embeddings = backbone.get_input_embeddings()
    rows_before = embeddings.weight.detach()[embeddings.first_added_row:].clone()
    layer_before = backbone.encoder.layer[0].attention.self.query.weight.detach().clone()
    texts = ADDED_TEXTS * 8
    adaptation.adapt_with_mlm(backbone, tokenizer, texts, options(mlm_adapt_steps=6))
    assert backbone.get_input_embeddings() is embeddings  # the task's own encoder, not a copy
    assert not torch.equal(embeddings.weight.detach()[embeddings.first_added_row:], rows_before)
    assert not torch.equal(backbone.encoder.layer[0].attention.self.query.weight.detach(), layer_before)
    assert "MLM adaptation: 6 steps on 16 texts, masked-token loss" in capsys.readouterr().out


def test_a_resumed_run_is_not_adapted_again(tiny_model_dir):
    backbone, tokenizer = extended_backbone(tiny_model_dir)
    weights = {name: value.clone() for name, value in backbone.state_dict().items()}
    adaptation.adapt_before_training(backbone, tokenizer, ADDED_TEXTS, options(mlm_adapt_steps=3),
                                     resume_from="checkpoint-step-2")
    assert all(torch.equal(value, weights[name]) for name, value in backbone.state_dict().items())


def test_unlabeled_texts_come_from_txt_lines_or_data_records(tmp_path):
    (tmp_path / "u.txt").write_text("first text\n\n  second text  \n", encoding="utf-8")
    write_jsonl(tmp_path / "u.jsonl", [{"body": "a"}, {"body": "b"}])
    assert [text for _, text in adaptation.read_unlabeled_records(tmp_path / "u.txt")] == ["first text", "second text"]
    assert [text for _, text in adaptation.read_unlabeled_records(tmp_path / "u.jsonl", "body")] == ["a", "b"]


# ---------------------------------------------------------------- in every trainer

def trainer_data(script, tmp_path):
    if script == "train_vector":
        pairs = [{"query": "good movie", "document": "a great film", "rel": 1.0},
                 {"query": "music", "document": "stock price", "rel": 0.0}] * 4
        path = write_jsonl(tmp_path / "pairs.jsonl", pairs)
        return ["--train-path", path, "--val-path", path]
    path = write_jsonl(tmp_path / "d.jsonl", make_text_records(6))
    return ["--data-path", path, "--val-path", path]


@pytest.mark.parametrize("script", ["train_classifier", "train_longdoc", "train_vector"])
def test_every_trainer_extends_over_unlabeled_texts_and_adapts(script, tmp_path, tiny_model_dir, capsys):
    (tmp_path / "unlabeled.txt").write_text("猫猫 good\n猫 bad movie\n" * 3, encoding="utf-8")
    output_dir = tmp_path / "out"
    assert run_trainer(script, tiny_model_dir, output_dir, *trainer_data(script, tmp_path), "--extend-vocab", "2",
                       "--unlabeled-path", tmp_path / "unlabeled.txt", "--mlm-adapt-steps", "3",
                       "--new-token-lr", "1e-2", "--baseline", "none") == 0
    printed = capsys.readouterr().out
    assert "--extend-vocab 2: added 1 tokens" in printed
    # the default start in every trainer: placed from the training and unlabeled texts
    assert "--new-token-init cooccurrence: 1 of 1 added rows placed from their neighbours" in printed
    assert "MLM adaptation: 3 steps" in printed
    saved = next(path for path in (output_dir / "checkpoint-best", output_dir) if (path / "config.json").is_file())
    assert "猫" in modeldir.load_tokenizer(str(saved)).get_vocab()  # a token only the unlabeled file has


@pytest.mark.parametrize("flags, fragment", [
    (["--new-token-lr", "1e-3"], "--new-token-lr applies to tokens added by --extend-vocab"),
    (["--unlabeled-path", "u.txt"], "--unlabeled-path is read only for --extend-vocab and --mlm-adapt-steps"),
    (["--extend-vocab", "1", "--freeze-backbone"], "--freeze-backbone with --extend-vocab"),
    (["--mlm-adapt-steps", "-1"], "--mlm-adapt-steps"),
])
def test_options_that_would_do_nothing_are_refused(flags, fragment, tmp_path, tiny_model_dir, text_data, capsys):
    status = run_trainer("train_classifier", tiny_model_dir, tmp_path / "out", "--data-path", text_data["train"],
                         *flags)
    assert status == 2
    assert_one_error_line(capsys.readouterr().err, fragment)


def test_a_missing_unlabeled_file_is_one_line(tmp_path, tiny_model_dir, text_data, capsys):
    status = run_trainer("train_classifier", tiny_model_dir, tmp_path / "out", "--data-path", text_data["train"],
                         "--mlm-adapt-steps", "2", "--unlabeled-path", tmp_path / "missing.txt")
    assert status == 2
    assert_one_error_line(capsys.readouterr().err, "--unlabeled-path", "missing.txt")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("script", ["train_classifier", "train_longdoc", "train_vector"])
def test_added_rows_learn_ten_times_faster_unless_told(script, tmp_path):
    import importlib
    parse_args = importlib.import_module(script).parse_args
    data = ["--data-path", "t.jsonl"] + (["--val-path", "v.jsonl"] if script == "train_vector" else [])
    common = [*data, "--learning-rate", "1e-4"]
    assert parse_args([*common, "--extend-vocab", "2"]).new_token_lr == pytest.approx(1e-3)
    assert parse_args([*common, "--extend-vocab", "2", "--new-token-lr", "3e-4"]).new_token_lr == 3e-4
    assert parse_args(common).new_token_lr is None  # nothing added, nothing to speed up
