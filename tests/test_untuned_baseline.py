"""Fine-tuning never silently makes a model worse: every trainer scores the starting model before
the first step, and says loudly when no trained model beat it. A vector model's untuned encoder is
itself usable, so it competes for checkpoint-best; a classifier's random head never does."""
import json

from safetensors.torch import load_file

from conftest import tiny_run_argv


def run(script, argv, capsys):
    capsys.readouterr()
    code = __import__(script).main([str(argument) for argument in argv])
    return code, capsys.readouterr()


def test_a_classifier_that_learned_nothing_is_reported(tiny_model_dir, tmp_path, capsys):
    argv = tiny_run_argv("train_classifier", tmp_path, tiny_model_dir, tmp_path / "out") + ["--learning-rate", "0"]
    code, output = run("train_classifier", argv, capsys)
    assert code == 0
    assert "fine-tuning did not beat the untuned model" in output.out + output.err
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["untuned"]["beaten"] is False and metrics["untuned"]["validation"]["step"] == 0


def test_the_untuned_encoder_stays_the_vector_model_unless_training_beats_it(tiny_model_dir, tmp_path, capsys):
    argv = tiny_run_argv("train_vector", tmp_path, tiny_model_dir, tmp_path / "out") + ["--learning-rate", "0"]
    code, output = run("train_vector", argv, capsys)
    assert code == 0
    assert "checkpoint-best is the untuned model" in output.out + output.err
    record = json.loads((tmp_path / "out" / "best_checkpoint.json").read_text())
    assert record["untuned_beaten"] is False and record["untuned"]["step"] == 0
    best_state = json.loads((tmp_path / "out" / "checkpoint-best" / "trainer_state.json").read_text())
    assert best_state["global_step"] == 0
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    published = load_file(str(tmp_path / "out" / "model.safetensors"))
    shared = [key for key in published if key.removeprefix("backbone.") in base]
    assert len(shared) > 10  # the encoder's weights, unchanged (the pooler is not part of a vector model)
    for key in shared:
        assert (published[key] == base[key.removeprefix("backbone.")]).all(), key


def test_the_final_evaluation_shows_a_tfidf_baseline_beside_the_model(tiny_model_dir, tmp_path, capsys):
    argv = tiny_run_argv("train_classifier", tmp_path, tiny_model_dir, tmp_path / "out")
    code, output = run("train_classifier", argv, capsys)
    assert code == 0 and "TF-IDF baseline" in output.out + output.err
    baseline = json.loads((tmp_path / "out" / "metrics.json").read_text())["baseline"]
    assert baseline["name"].startswith("tfidf") and 0.0 <= baseline["macro_f1"] <= 1.0
    code, _ = run("train_classifier", argv + ["--overwrite-output-dir", "--baseline", "none"], capsys)
    assert code == 0 and "baseline" not in json.loads((tmp_path / "out" / "metrics.json").read_text())


def test_vector_evaluation_shows_a_tfidf_baseline(tiny_model_dir, tmp_path, capsys):
    argv = tiny_run_argv("train_vector", tmp_path, tiny_model_dir, tmp_path / "out")
    assert run("train_vector", argv, capsys)[0] == 0
    code, output = run("train_vector", ["--mode", "evaluate", "--test-path", tmp_path / "pairs.jsonl",
                                        "--output-dir", tmp_path / "out", "--device", "cpu"], capsys)
    assert code == 0
    metrics = json.loads((tmp_path / "out" / "eval_metrics.json").read_text())
    assert metrics["baseline"]["name"].endswith("cosine") and "ndcg@10" in metrics["baseline"]
