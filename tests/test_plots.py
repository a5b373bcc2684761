"""common/plots.py: confusion matrix and training curves PNGs, most-confused pairs."""
from matplotlib.image import imread

from common.plots import (most_confused_pairs, validation_metric_names, write_confusion_matrix_png,
                          write_training_curves_png)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NAMES = ["joy", "sad", "angry", "fear"]
MATRIX = [[50, 2, 0, 1],
          [3, 40, 9, 0],
          [0, 9, 30, 4],
          [1, 0, 0, 10]]


def test_most_confused_pairs_by_hand():
    assert most_confused_pairs(MATRIX, NAMES, top=3) == [("sad", "angry", 9), ("angry", "sad", 9),
                                                         ("angry", "fear", 4)]
    assert len(most_confused_pairs(MATRIX, NAMES, top=100)) == 7  # every non-zero off-diagonal cell
    assert most_confused_pairs([[5, 0], [0, 5]], ["a", "b"]) == []


def test_confusion_matrix_png(tmp_path):
    path = write_confusion_matrix_png(tmp_path / "cm.png", MATRIX, NAMES)
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    height, width = imread(str(path)).shape[:2]
    assert width > height > 300


def test_confusion_matrix_png_with_an_empty_class(tmp_path):
    path = write_confusion_matrix_png(tmp_path / "cm.png", [[3, 1], [0, 0]], ["a", "b"])
    assert path.read_bytes()[:8] == PNG_SIGNATURE


def test_training_curves_png(tmp_path):
    rows = [{"step": step, "epoch": 0, "loss": 1.0 / step, "learning_rate": 1e-5} for step in range(1, 40)]
    rows += [{"step": 20, "epoch": 0, "eval_loss": 0.5, "eval_accuracy": 0.7, "eval_macro_f1": 0.6,
              "improved": True},
             {"step": 39, "epoch": 1, "eval_loss": 0.4, "eval_accuracy": 0.8, "eval_macro_f1": 0.75,
              "eval_num_examples": 120, "improved": True}]
    assert validation_metric_names(rows) == ["eval_accuracy", "eval_macro_f1"]
    path = write_training_curves_png(tmp_path / "curves.png", rows)
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert imread(str(path)).shape[:2] == (400, 1000)


def test_training_curves_png_without_evaluations(tmp_path):
    path = write_training_curves_png(tmp_path / "curves.png", [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}])
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    empty = write_training_curves_png(tmp_path / "empty.png", [])
    assert empty.read_bytes()[:8] == PNG_SIGNATURE
