"""Every bad option value gets one line and exit code 2 before any model loads, on the command
line and in a YAML config alike, in every trainer that has the option (common/cli.py's
OPTION_RANGES is the one table they share)."""
import os
import re

import pytest
import torch

from common import cli, modeldir
from common.errors import UserError
from conftest import assert_one_error_line, tiny_run_argv, write_jsonl

TRAINERS = ("train_classifier", "train_vector", "train_longdoc")
ANY = TRAINERS
LABELLED = ("train_classifier", "train_longdoc")

# (flag, value, trainers that have the flag)
BAD_VALUES = [
    ("--max-length", "1", ANY), ("--learning-rate", "nan", ANY), ("--learning-rate", "inf", ANY),
    ("--learning-rate", "-1", ANY), ("--logging-steps", "0", ANY), ("--seed", "-1", ANY),
    ("--seed", str(2 ** 70), ANY), ("--device", "tpu:7", ANY), ("--warmup-ratio", "nan", ANY),
    ("--weight-decay", "nan", ANY), ("--max-nonfinite-steps", "0", ANY), ("--num-workers", "-1", ANY),
    ("--eval-steps", "-1", ANY), ("--save-steps", "-1", ANY), ("--patience", "-1", ANY),
    ("--save-total-limit", "-1", ANY), ("--extend-vocab", "-1", ANY), ("--batch-size", "0", ANY),
    ("--gradient-accumulation-steps", "0", ANY), ("--max-grad-norm", "nan", ANY), ("--epochs", "1.5", ANY),
    ("--dropout", "1.5", LABELLED), ("--dropout", "nan", LABELLED), ("--val-ratio", "nan", LABELLED),
    ("--metric-for-best-model", "nope", LABELLED), ("--num-labels", "0", LABELLED),
    ("--focal-gamma", "nan", ("train_classifier",)), ("--rdrop-alpha", "nan", ("train_classifier",)),
    ("--adv-epsilon", "nan", ("train_classifier",)), ("--label-smoothing", "1", ("train_classifier",)),
    ("--ema-decay", "1.5", ("train_classifier",)), ("--temperature", "nan", ("train_vector",)),
    ("--temperature", "0", ("train_vector",)), ("--port", "70000", ("train_vector",)),
    ("--chunk-batch-size", "0", ("train_longdoc",)), ("--k", "0", ("train_vector",)),
]
CASES = [(script, flag, value) for flag, value, scripts in BAD_VALUES for script in scripts]


@pytest.fixture
def no_model_loading(monkeypatch):
    """A bad option must be found before anything expensive: loading fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded before the options were checked")
    monkeypatch.setattr(modeldir, "load_tokenizer", refuse)
    monkeypatch.setattr(modeldir, "load_pretrained_backbone", refuse)


def set_flag(argv, flag, value):
    if flag in argv:
        argv = list(argv)
        argv[argv.index(flag) + 1] = value
        return argv
    return [*argv, flag, value]


@pytest.mark.parametrize("script,flag,value", CASES, ids=[f"{s}{f}={v[:8]}" for s, f, v in CASES])
def test_a_bad_value_is_one_line_before_loading(script, flag, value, tiny_model_dir, tmp_path, capsys,
                                                no_model_loading):
    argv = set_flag(tiny_run_argv(script, tmp_path, tiny_model_dir, tmp_path / "out"), flag, value)
    capsys.readouterr()
    assert __import__(script).main(argv) == 2
    assert_one_error_line(capsys.readouterr().err, flag)
    assert not (tmp_path / "out").exists()


YAML_CASES = [
    ("training:\n  epochs: 1.5\n", "training.epochs"),
    ("training:\n  epochs: [1, 2]\n", "training.epochs"),
    ("training:\n  learning_rate: .nan\n", "training.learning_rate"),
    ("model:\n  dropout: 2\n", "model.dropout"),
    ("early_stopping:\n  metric: nope\n", "early_stopping.metric"),
    ("model:\n  freeze_backbone: maybe\n", "model.freeze_backbone"),
    ("labels: [&a [x, x, x, x, x, x, x, x, x], &b [*a, *a, *a, *a, *a, *a, *a, *a, *a], "
     "&c [*b, *b, *b, *b, *b, *b, *b, *b, *b], [*c, *c, *c, *c, *c, *c, *c, *c, *c]]\n", "labels"),
]


@pytest.mark.parametrize("text,key", YAML_CASES, ids=[key for _, key in YAML_CASES])
def test_yaml_values_are_checked_like_flags(text, key, tiny_model_dir, tmp_path, capsys, no_model_loading):
    import train_classifier
    config = tmp_path / "config.yaml"
    config.write_text(text)
    argv = tiny_run_argv("train_classifier", tmp_path, tiny_model_dir, tmp_path / "out") + ["--config", str(config)]
    capsys.readouterr()
    assert train_classifier.main(argv) == 2
    assert_one_error_line(capsys.readouterr().err, str(config))


@pytest.mark.parametrize("script", TRAINERS)
def test_cuda_on_a_machine_without_it_is_one_line(script, tiny_model_dir, tmp_path, capsys, no_model_loading):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    argv = set_flag(tiny_run_argv(script, tmp_path, tiny_model_dir, tmp_path / "out"), "--device", "cuda")
    capsys.readouterr()
    assert __import__(script).main(argv) == 2
    assert_one_error_line(capsys.readouterr().err, "--device cuda", "CUDA is not available")


def test_bounded_refuses_what_argparse_float_accepts():
    learning_rate = cli.OPTION_RANGES["learning_rate"]
    assert learning_rate("2e-5") == 2e-5
    for text in ("nan", "inf", "-inf", "-1", "1e400"):
        with pytest.raises(Exception, match="expected a number"):
            learning_rate(text)
    with pytest.raises(Exception, match="expected an integer"):
        cli.OPTION_RANGES["epochs"]("1.5")


@pytest.mark.parametrize("script", TRAINERS)
def test_a_mistyped_flag_gets_a_suggestion(script, capsys, no_model_loading):
    capsys.readouterr()
    assert __import__(script).main(["--data-pth", "x.jsonl"]) == 2
    assert_one_error_line(capsys.readouterr().err, "--data-pth", "did you mean --data-path?")


def test_a_flag_overrides_its_mutually_exclusive_partner_from_the_config(tmp_path):
    """configs set --warmup-ratio; --warmup-steps on the command line must win, not clash."""
    import train_classifier
    config = tmp_path / "c.yaml"
    config.write_text("training:\n  warmup_ratio: 0.2\n")
    args = train_classifier.parse_args(["--config", str(config), "--data-path", "x", "--warmup-steps", "50"])
    assert (args.warmup_steps, args.warmup_ratio) == (50, None)
    args = train_classifier.parse_args(["--config", str(config), "--data-path", "x"])
    assert (args.warmup_steps, args.warmup_ratio) == (None, 0.2)


@pytest.mark.parametrize("script", TRAINERS)
def test_a_max_length_past_the_models_positions_is_one_line_before_tokenizing(script, tiny_model_dir, tmp_path,
                                                                             capsys):
    """The tiny model has 512 positions: a longer --max-length used to fail mid-training on a long text."""
    argv = set_flag(tiny_run_argv(script, tmp_path, tiny_model_dir, tmp_path / "out"), "--max-length", "600")
    capsys.readouterr()
    assert __import__(script).main(argv) == 2
    assert_one_error_line(capsys.readouterr().err, "--max-length 600", "512 positions")


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "0"])
@pytest.mark.parametrize("script", LABELLED)
def test_a_bad_huber_delta_is_one_line_before_loading(script, value, tiny_model_dir, tmp_path, capsys,
                                                     no_model_loading):
    """It used to reach torch's huber_loss at the first evaluation: a RuntimeError traceback."""
    scores = write_jsonl(tmp_path / "scores.jsonl", [{"text": f"text {i}", "label": i / 4} for i in range(8)])
    argv = tiny_run_argv(script, tmp_path, tiny_model_dir, tmp_path / "out")
    argv = set_flag(set_flag(argv, "--data-path", str(scores)), "--val-path", str(scores))
    argv += ["--problem-type", "regression", "--regression-loss", "huber", "--huber-delta", value]
    capsys.readouterr()
    assert __import__(script).main(argv) == 2
    assert_one_error_line(capsys.readouterr().err, "--huber-delta", "expected a number > 0.0")


def test_k_says_which_values_it_takes(tiny_model_dir, tmp_path, capsys, no_model_loading):
    import train_vector
    argv = tiny_run_argv("train_vector", tmp_path, tiny_model_dir, tmp_path / "out") + ["--k", "3,0"]
    capsys.readouterr()
    assert train_vector.main(argv) == 2
    assert_one_error_line(capsys.readouterr().err, "--k", "expected comma-separated positive integers", "'3,0'")


# ---------------------------------------------------------------- the config file itself

def parse_classifier_config(tmp_path, text):
    """train_classifier's args with ``text`` as its --config."""
    import train_classifier
    config = tmp_path / "config.yaml"
    config.write_text(text)
    return train_classifier.parse_args(["--config", str(config), "--data-path", "x.jsonl"])


@pytest.mark.parametrize("raw", [b"training:\n  epochs: 1\n# caf\xe9\n", "training:\n  epochs: 1\n".encode("utf-16")],
                         ids=["latin-1", "utf-16"])
def test_a_config_that_is_not_utf8_is_one_line(raw, tiny_model_dir, tmp_path, capsys, no_model_loading):
    import train_classifier
    config = tmp_path / "config.yaml"
    config.write_bytes(raw)
    argv = tiny_run_argv("train_classifier", tmp_path, tiny_model_dir, tmp_path / "out") + ["--config", str(config)]
    capsys.readouterr()
    assert train_classifier.main(argv) == 2
    assert_one_error_line(capsys.readouterr().err, str(config), "not valid UTF-8", "byte offset")


@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_a_config_that_is_not_a_regular_file_is_one_line(kind, tmp_path):
    config = tmp_path / "config.yaml"
    config.mkdir() if kind == "directory" else os.mkfifo(config)  # a FIFO with no writer: opening it would block
    with pytest.raises(UserError, match=re.escape(f"{config}: the config file is not a regular file")):
        cli.load_yaml_config(config, {})


@pytest.mark.parametrize("text,resume", [("resume: true", "latest"), ("resume: false", None),
                                         ("resume: yes", "latest")])
def test_a_yaml_boolean_for_resume_means_the_bare_flag_or_none(text, resume, tmp_path):
    assert parse_classifier_config(tmp_path, text + "\n").resume == resume


def test_a_yaml_boolean_for_an_optional_value_flag_is_its_bare_form(tmp_path):
    assert parse_classifier_config(tmp_path, "data:\n  normalize: true\n").normalize == "social"


@pytest.mark.parametrize("text,key", [("output:\n  dir: true\n", "output.dir"),
                                      ("data:\n  val_path: no\n", "data.val_path"),
                                      ("checkpoint:\n  save_strategy: no\n", "checkpoint.save_strategy")])
def test_a_yaml_boolean_for_a_path_or_word_is_refused(text, key, tmp_path):
    with pytest.raises(UserError, match=f"key '{key}': expected .*, got the YAML boolean"):
        parse_classifier_config(tmp_path, text)


@pytest.mark.parametrize("text,fragments", [
    # PyYAML kept the last of a repeated key, or of a repeated section, without a word
    ("training:\n  epochs: 1\n  batch_size: 8\n  epochs: 5\n", ["line 4", "key 'epochs' repeats"]),
    ("training:\n  epochs: 2\ntraining:\n  batch_size: 4\n", ["line 3", "key 'training' repeats"]),
    # two keys reaching one option: the later one won
    ("training:\n  batch_size: 8\neval:\n  batch_size: 64\n", ["'training.batch_size' and 'eval.batch_size'"]),
    ("training:\n  epochs: 2\nepochs: 7\n", ["'training.epochs' and 'epochs'"]),
    ("model:\n  name: a\nmodel_name: b\n", ["'model.name' and 'model_name'"]),
    ("base: &b\n  epochs: 2\ntraining:\n  <<: *b\n  epochs: 3\n", ["'base.epochs' and 'training.epochs'"]),
], ids=["key-twice", "section-twice", "two-sections", "section-and-top-level", "alias-and-key", "anchor-section"])
def test_a_yaml_option_set_twice_is_one_line(text, fragments, tmp_path):
    with pytest.raises(UserError) as raised:
        parse_classifier_config(tmp_path, text)
    assert str(tmp_path / "config.yaml") in str(raised.value)
    for fragment in fragments:
        assert fragment in str(raised.value)


def test_a_yaml_merge_may_override_and_a_repeated_equal_value_is_fine(tmp_path):
    args = parse_classifier_config(tmp_path, "training: &t\n  epochs: 2\n  batch_size: 4\nsame: *t\n"
                                             "other:\n  <<: *t\n  batch_size: 4\n")
    assert (args.epochs, args.batch_size) == (2, 4)
    # a mapping overriding its own merge, itself merged later from a shallower place: valid YAML
    import yaml
    from common import cli
    loaded = yaml.load("a: &a {y: 1}\nx: {b: &b {<<: *a, y: 2}}\nc: {<<: *b, z: 3}\n", Loader=cli.UniqueKeyLoader)
    assert loaded == {"a": {"y": 1}, "x": {"b": {"y": 2}}, "c": {"y": 2, "z": 3}}


def test_an_alias_bomb_set_twice_is_one_short_line(tmp_path):
    """Two keys for one option, one an alias bomb (9 levels of 9): compared and quoted without expanding it."""
    levels = ["l0: &l0 [x, x, x, x, x, x, x, x, x]"]
    levels += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)]
    text = "\n".join(levels) + "\nmodel:\n  labels: *l8\nlabels: *l7\n"
    with pytest.raises(UserError) as raised:
        parse_classifier_config(tmp_path, text)
    message = str(raised.value)
    assert "'model.labels' and 'labels' set the same option" in message and len(message) < 1000
