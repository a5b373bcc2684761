"""MODEL_CARD.md: every trainer writes one into the model it publishes, from what the run recorded."""
import json

import pytest

from common import checkpoints, model_card
from conftest import run_trainer, write_jsonl

# the test's tmp_path is a machine path: the card names data files by name, size and sha256 only


def card_of(directory):
    return (directory / model_card.CARD_FILE).read_text(encoding="utf-8")


def table_row(card, first_cells):
    """{column: cell} of the results row that starts with ``first_cells``."""
    lines = card.splitlines()
    header = next(line for line in lines if line.startswith("| model | split |"))
    prefix = "| " + " | ".join(first_cells) + " |"
    line = next(line for line in lines if line.startswith(prefix))
    cells = lambda text: [cell.strip() for cell in text.strip(" |").split("|")]  # noqa: E731
    return dict(zip(cells(header)[2:], cells(line[len(prefix):])))


def test_a_classifier_card_shows_the_model_beside_its_alternatives(tiny_model_dir, text_data, tmp_path):
    output_dir = tmp_path / "out"
    assert run_trainer("train_classifier", tiny_model_dir, output_dir, "--data-path", text_data["train"],
                       "--val-path", text_data["val"], "--test-path", text_data["test"]) == 0
    model_dir = output_dir / "checkpoint-best"
    card, metrics = card_of(model_dir), json.loads((output_dir / "metrics.json").read_text())
    assert card.startswith("---\ntags:\n") and "- text-classification" in card
    assert "base_model:" not in card  # a local base model names no Hub repository
    assert f"fine-tuned from {tiny_model_dir.name}" in card
    for metric in ("accuracy", "macro_f1", "weighted_f1"):
        assert table_row(card, ["this model", "test"])[metric] == f"{metrics['test'][metric]:.4f}"
        assert table_row(card, ["this model", "validation"])[metric] == f"{metrics['validation'][metric]:.4f}"
        tfidf = table_row(card, [f"TF-IDF baseline ({metrics['baseline']['name']})", "test"])
        assert tfidf[metric] == f"{metrics['baseline'][metric]:.4f}"
    assert table_row(card, ["majority class", "test"])["accuracy"] == \
        f"{metrics['majority_baseline']['accuracy']:.4f}"
    assert table_row(card, ["the untuned base model", "validation"])["macro_f1"] == \
        f"{metrics['untuned']['validation']['eval_macro_f1']:.4f}"
    for split in ("train", "val", "test"):
        path = text_data[split]
        assert f"| {path.name} | {path.stat().st_size} | {checkpoints.file_sha256(path)} |" in card
    assert str(tmp_path) not in card  # the training machine's directories stay on it
    assert "--data-path train.jsonl" in card
    assert "`preprocessing`: max_length" in card and "`temperature`" in card
    assert "python infer.py --model-path MODEL_DIR" in card
    checkpoints.verify_checksums(model_dir)  # the card is in the refreshed sums
    assert model_card.CARD_FILE in json.loads((model_dir / checkpoints.CHECKSUM_FILE).read_text())


def test_eval_only_leaves_the_evaluated_models_card_alone(tiny_model_dir, text_data, tmp_path):
    assert run_trainer("train_classifier", tiny_model_dir, tmp_path / "out", "--data-path", text_data["train"],
                       "--val-path", text_data["val"]) == 0
    model_dir = tmp_path / "out" / "checkpoint-best"
    before = card_of(model_dir)
    import train_classifier
    assert train_classifier.main(["--eval-only", "--model-path", str(model_dir), "--test-path",
                                  str(text_data["test"]), "--output-dir", str(tmp_path / "eval"),
                                  "--device", "cpu"]) == 0
    assert card_of(model_dir) == before and not (tmp_path / "eval" / model_card.CARD_FILE).exists()


def test_a_long_document_card(tiny_model_dir, text_data, tmp_path):
    assert run_trainer("train_longdoc", tiny_model_dir, tmp_path / "out", "--data-path", text_data["train"],
                       "--val-path", text_data["val"]) == 0
    card = card_of(tmp_path / "out" / "checkpoint-best")
    assert "# Long-document classifier fine-tuned from" in card
    assert table_row(card, ["this model", "validation"])  # no test file: validation is the report split
    assert "| test |" not in card


def test_a_vector_card_is_written_beside_the_published_model(tiny_model_dir, tmp_path):
    pairs = [{"query": f"query {index}", "document": f"document {index}", "rel": 1.0} for index in range(8)]
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    output_dir = tmp_path / "out"
    assert run_trainer("train_vector", tiny_model_dir, output_dir, "--data-path", data, "--val-path", data,
                       "--loss", "infonce") == 0
    card = card_of(output_dir)  # the top of --output-dir is the published model
    assert "# Embedding model fine-tuned from" in card and "- sentence-similarity" in card
    best = json.loads((output_dir / "best_checkpoint.json").read_text())
    assert table_row(card, ["this model", "validation"])["loss"] == f"{best['val_loss']:.4f}"
    assert table_row(card, ["the untuned base model", "validation"])["loss"] == f"{best['untuned']['eval_loss']:.4f}"
    assert "train_vector.py --mode deploy --model-path MODEL_DIR" in card


@pytest.mark.parametrize("best_step", [0, 4])
def test_the_vector_card_reads_the_published_checkpoints_own_evaluation(best_step, tmp_path):
    """checkpoint-best (no step in its name: --save-steps 0) holds the step its trainer_state.json records."""
    import train_vector
    rows = [{"step": 0, "eval_loss": 0.9, "untuned": True}, {"step": 2, "loss": 0.5},
            {"step": 4, "eval_loss": 0.7, "untuned": False}, {"step": 4, "eval_loss": 0.6, "untuned": False}]
    log_path = write_jsonl(tmp_path / "train_log.jsonl", rows)
    best = tmp_path / "checkpoint-best"
    best.mkdir()
    (best / checkpoints.TRAINER_SUMMARY_FILE).write_text(json.dumps({"global_step": best_step}))
    expected = rows[0] if best_step == 0 else rows[3]  # a step scored twice (a resume): the later row
    assert train_vector.validation_row(log_path, best) == expected


def test_overwrite_output_dir_replaces_the_runs_card(tiny_model_dir, text_data, tmp_path):
    argv = ["--data-path", text_data["train"], "--val-path", text_data["val"]]
    assert run_trainer("train_classifier", tiny_model_dir, tmp_path / "out", *argv) == 0
    assert run_trainer("train_classifier", tiny_model_dir, tmp_path / "out", *argv, "--seed", "7",
                       "--overwrite-output-dir") == 0
    assert "--seed 7" in card_of(tmp_path / "out" / "checkpoint-best")


@pytest.mark.parametrize("value, shown", [({"max_length": 8, "normalize": None}, "max_length 8"),
                                          (list(range(20)), "20 values"), (1.5, "1.5")])
def test_stored_settings_are_shown_compactly(value, shown):
    assert model_card.format_setting(value) == shown
