"""--model-name takes a model directory this toolkit wrote (fine-tuning goes on from its encoder and its
tokenizer, added tokens included), and refuses a checkpoint that lacks encoder weights instead of
training from the random ones transformers would put in their place."""
import pytest
import torch
from safetensors.torch import load_file, save_file

import train_classifier
import train_vector
from common import modeldir
from conftest import assert_one_error_line, make_text_records, tiny_run_argv, trainer_argv, write_jsonl


def backbone_weights(directory):
    """The encoder weights of a toolkit model directory, named as in a bare encoder."""
    prefix = modeldir.BACKBONE_PREFIX
    return {name[len(prefix):]: tensor for name, tensor in load_file(str(directory / "model.safetensors")).items()
            if name.startswith(prefix)}


@pytest.fixture(scope="module")
def trained_vector_dir(tmp_path_factory, tiny_model_dir):
    """A tiny vector model's step-2 checkpoint (trained weights: its encoder differs from tiny_model_dir's)."""
    directory = tmp_path_factory.mktemp("vector")
    assert train_vector.main(tiny_run_argv("train_vector", directory, tiny_model_dir, directory / "run")) == 0
    return directory / "run" / "checkpoint-step-2"


def test_the_encoder_of_a_toolkit_model_directory_is_loaded(trained_vector_dir, tiny_model_dir):
    expected = backbone_weights(trained_vector_dir)
    loaded = modeldir.load_pretrained_backbone(str(trained_vector_dir)).state_dict()
    assert expected.keys() == loaded.keys()
    assert all(torch.equal(expected[name], loaded[name]) for name in expected)
    untuned = modeldir.load_pretrained_backbone(str(tiny_model_dir)).state_dict()
    assert not torch.equal(untuned["embeddings.word_embeddings.weight"], expected["embeddings.word_embeddings.weight"])


def test_a_classifier_trains_on_from_a_vector_model(trained_vector_dir, tmp_path, capsys):
    """With the encoder frozen, the classifier's encoder is exactly the vector model's."""
    data = write_jsonl(tmp_path / "train.jsonl", make_text_records(8))
    output_dir = tmp_path / "classifier"
    argv = trainer_argv("train_classifier", trained_vector_dir, output_dir, "--data-path", data, "--val-path", data,
                        "--freeze-backbone", "--baseline", "none")
    assert train_classifier.main(argv) == 0
    said = capsys.readouterr().out
    assert f"--model-name {trained_vector_dir}: a vector model of this toolkit" in said
    assert "--normalize" not in said  # trained without it
    expected, trained = backbone_weights(trained_vector_dir), backbone_weights(output_dir / "checkpoint-best")
    assert expected.keys() == trained.keys()
    assert all(torch.equal(expected[name], trained[name]) for name in expected)


def test_a_checkpoint_without_encoder_weights_exits_2(tiny_model_dir, tmp_path, capsys):
    """Weights saved under another prefix: every encoder weight would be drawn at random."""
    broken = tmp_path / "renamed"
    broken.mkdir()
    for path in tiny_model_dir.iterdir():
        if path.name != "model.safetensors":
            (broken / path.name).write_bytes(path.read_bytes())
    weights = load_file(str(tiny_model_dir / "model.safetensors"))
    save_file({f"encoder_model.{name}": tensor for name, tensor in weights.items()}, str(broken / "model.safetensors"),
              metadata={"format": "pt"})
    data = write_jsonl(tmp_path / "train.jsonl", make_text_records(4))
    argv = trainer_argv("train_classifier", broken, tmp_path / "out", "--data-path", data, "--val-path", data)
    assert train_classifier.main(argv) == 2
    assert_one_error_line(capsys.readouterr().err, f"--model-name {broken}", "not in the checkpoint")
    assert not (tmp_path / "out" / "checkpoint-best").exists()


def test_a_toolkit_model_directory_without_weights_exits_2_naming_model_name(trained_vector_dir, tmp_path, capsys):
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    for path in trained_vector_dir.iterdir():
        if path.is_file() and path.name != "model.safetensors":
            (incomplete / path.name).write_bytes(path.read_bytes())
    data = write_jsonl(tmp_path / "train.jsonl", make_text_records(4))
    argv = trainer_argv("train_classifier", incomplete, tmp_path / "out", "--data-path", data, "--val-path", data)
    assert train_classifier.main(argv) == 2
    assert_one_error_line(capsys.readouterr().err, f"--model-name {incomplete}: no model.safetensors")


def test_starting_from_a_normalized_model_names_its_normalize_spec(tiny_model_dir, tmp_path, capsys):
    """The text option the model was trained with is not inherited, and the run says so."""
    data = write_jsonl(tmp_path / "train.jsonl", make_text_records(4))
    first = tmp_path / "first"
    argv = trainer_argv("train_classifier", tiny_model_dir, first, "--data-path", data, "--val-path", data,
                        "--normalize", "social,emoji=drop", "--baseline", "none")
    assert train_classifier.main(argv) == 0
    capsys.readouterr()
    argv = trainer_argv("train_classifier", first / "checkpoint-best", tmp_path / "second", "--data-path", data,
                        "--val-path", data, "--baseline", "none")
    assert train_classifier.main(argv) == 0
    assert "it was trained on text normalized with --normalize social,emoji=drop" in capsys.readouterr().out


@pytest.mark.parametrize("mode", ["evaluate", "mine"])
def test_a_broken_encoder_given_by_model_path_is_named_by_that_flag(mode, tiny_model_dir, tmp_path, capsys):
    """train_vector.py --mode evaluate|mine --model-path ENCODER: the error names --model-path, the flag
    the user typed (it said --model-name, a flag this command line did not have)."""
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in tiny_model_dir.iterdir():
        (broken / path.name).write_bytes(b"not weights" if path.name == "model.safetensors" else path.read_bytes())
    pairs = str(write_jsonl(tmp_path / "pairs.jsonl", [{"query": "good movie", "document": "great film", "rel": 1.0},
                                                        {"query": "good movie", "document": "bad movie", "rel": 0.0}]))
    extra = (["--test-path", pairs, "--metrics-path", str(tmp_path / "m.json")] if mode == "evaluate"
             else ["--data-path", pairs, "--output-path", str(tmp_path / "mined.jsonl")])
    assert train_vector.main(["--mode", mode, "--model-path", str(broken), *extra]) == 2
    assert_one_error_line(capsys.readouterr().err, f"--model-path {broken}: cannot load a model there")
