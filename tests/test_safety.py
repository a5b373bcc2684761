"""Loading safely: weights come from safetensors, trainer state from torch.load(weights_only=True)
(a pickled object is refused with exit 2), and trust_remote_code reaches from_pretrained only
when --trust-remote-code is given."""
import re
import shutil
from pathlib import Path

import pytest
import torch
import transformers

from common import checkpoints
from conftest import tiny_run_argv

REPO = Path(__file__).resolve().parents[1]
TRAINERS = ("train_classifier", "train_vector", "train_longdoc")


def import_trainer(script):
    if not (REPO / f"{script}.py").is_file():
        pytest.skip(f"{script}.py is not in the repository yet")
    return __import__(script)


@pytest.fixture(scope="module")
def classifier_run(tiny_model_dir, tmp_path_factory):
    import train_classifier
    tmp_path = tmp_path_factory.mktemp("run")
    output_dir = tmp_path / "out"
    assert train_classifier.main(tiny_run_argv("train_classifier", tmp_path, tiny_model_dir, output_dir)) == 0
    return tmp_path, output_dir


# ---------------------------------------------------------------- weights and trainer state

def test_checkpoints_hold_weights_only_as_safetensors(classifier_run):
    _, output_dir = classifier_run
    for directory in (output_dir / "checkpoint-step-1", output_dir / "checkpoint-best"):
        assert (directory / "model.safetensors").is_file()
        pickles = [p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pkl", ".pth")]
        assert pickles == (["trainer_state.pt"] if "step" in directory.name else [])
    state = torch.load(output_dir / "checkpoint-step-1" / "trainer_state.pt", weights_only=True)
    assert state["global_step"] == 1 and "optimizer" in state and "rng" in state


def test_a_model_directory_loads_without_unpickling_anything(classifier_run, monkeypatch):
    from common.heads import SequenceClassifier

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load used to load a model directory")
    monkeypatch.setattr(torch, "load", refuse)
    model, _, _, config = SequenceClassifier.from_directory(classifier_run[1] / "checkpoint-best")
    assert config.id2label and sum(p.numel() for p in model.parameters()) > 0


class WritesAFileWhenUnpickled:
    """Stands for a malicious payload: unpickling it (weights_only=False) would create a file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_a_pickled_object_in_trainer_state_is_refused(classifier_run, tiny_model_dir, capsys):
    import train_classifier
    tmp_path, output_dir = classifier_run
    checkpoint = tmp_path / "poisoned-checkpoint"
    shutil.copytree(output_dir / "checkpoint-step-1", checkpoint)
    marker = tmp_path / "payload-ran"
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=True)
    state["optimizer"] = WritesAFileWhenUnpickled(marker)
    torch.save(state, checkpoint / "trainer_state.pt")
    checkpoints.write_checksums(checkpoint)  # as an attacker would: the unpickling itself must refuse it
    argv = tiny_run_argv("train_classifier", tmp_path, tiny_model_dir, tmp_path / "resumed") + ["--resume",
                                                                                               str(checkpoint)]
    capsys.readouterr()
    assert train_classifier.main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "trainer_state.pt" in errors[0] and "unreadable" in errors[0]
    assert not marker.exists()


def test_repository_code_never_unpickles_unsafely():
    """Every torch.load in the scripts and common/ passes weights_only=True; no pickle.load at all."""
    sources = [path for path in REPO.glob("*.py")] + list((REPO / "common").glob("*.py"))
    for path in sources:
        text = path.read_text(encoding="utf-8")
        for call in re.finditer(r"torch\.load\(", text):
            arguments = text[call.end():text.find(")", call.end()) + 1]
            assert "weights_only=True" in arguments, f"{path.name}: torch.load without weights_only=True"
        assert not re.search(r"\bpickle\.loads?\(", text), f"{path.name}: pickle.load"
        assert not re.search(r"trust_remote_code\s*=\s*True", text), f"{path.name}: trust_remote_code=True"


# ---------------------------------------------------------------- trust_remote_code

class StopAfterLoading(Exception):
    pass


@pytest.mark.parametrize("script", TRAINERS)
@pytest.mark.parametrize("flag", [False, True])
def test_trust_remote_code_only_with_the_flag(script, flag, tmp_path, tiny_model_dir, monkeypatch):
    module = import_trainer(script)
    seen = []
    original_model = transformers.AutoModel.from_pretrained.__func__
    original_tokenizer = transformers.AutoTokenizer.from_pretrained.__func__

    def tokenizer_from_pretrained(cls, *args, **kwargs):
        seen.append(("tokenizer", kwargs.get("trust_remote_code")))
        return original_tokenizer(cls, *args, **kwargs)

    def model_from_pretrained(cls, *args, **kwargs):
        seen.append(("model", kwargs.get("trust_remote_code")))
        original_model(cls, *args, **kwargs)
        raise StopAfterLoading()  # the loading is what this test is about; skip the training
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", classmethod(tokenizer_from_pretrained))
    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", classmethod(model_from_pretrained))
    argv = tiny_run_argv(script, tmp_path, tiny_model_dir, tmp_path / "out") + (["--trust-remote-code"] if flag else [])
    with pytest.raises(StopAfterLoading):
        module.main(argv)
    assert {kind for kind, _ in seen} == {"tokenizer", "model"}
    assert all(bool(value) == flag for _, value in seen), seen
