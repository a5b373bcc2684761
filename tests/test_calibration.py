"""common/calibration.py: temperature fitting, ECE, NLL, reliability diagram."""
import numpy as np
import pytest
import torch

from common.calibration import (calibration_report, expected_calibration_error, fit_temperature,
                                negative_log_likelihood, reliability_bins, write_reliability_diagram)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def overconfident_logits(true_temperature=2.5, n=4000, classes=5, seed=0):
    """Labels drawn from softmax(z); the model reports z * T, i.e. is over-confident by T."""
    generator = torch.Generator().manual_seed(seed)
    calibrated = torch.randn(n, classes, generator=generator) * 2.0
    labels = torch.multinomial(torch.softmax(calibrated, -1), 1, generator=generator).squeeze(1)
    return calibrated * true_temperature, labels


def test_fit_temperature_recovers_a_known_temperature():
    logits, labels = overconfident_logits(2.5)
    assert fit_temperature(logits, labels) == pytest.approx(2.5, abs=0.2)


def test_fit_temperature_below_one_for_under_confident_logits():
    logits, labels = overconfident_logits(0.5)
    assert fit_temperature(logits, labels) == pytest.approx(0.5, abs=0.1)


def test_fitted_temperature_lowers_nll_and_ece():
    logits, labels = overconfident_logits(3.0)
    report = calibration_report(logits, labels)
    assert report["nll_after"] < report["nll_before"]
    assert report["ece_after"] < report["ece_before"] / 2
    assert report["num_examples"] == 4000 and report["n_bins"] == 15
    assert report["nll_after"] == pytest.approx(negative_log_likelihood(logits, labels, report["temperature"]))


def test_fit_temperature_accepts_numpy_and_empty_input():
    logits, labels = overconfident_logits(2.0, n=500)
    assert fit_temperature(logits.numpy(), labels.numpy()) == pytest.approx(fit_temperature(logits, labels))
    assert fit_temperature(np.zeros((0, 3)), np.zeros(0, dtype=int)) == 1.0


def test_negative_log_likelihood_by_hand():
    logits = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    labels = torch.tensor([0, 1])
    by_hand = (np.log(2) + np.log(1 + np.exp(2.0))) / 2
    assert negative_log_likelihood(logits, labels) == pytest.approx(by_hand)
    by_hand_t2 = (np.log(2) + np.log(1 + np.exp(1.0))) / 2
    assert negative_log_likelihood(logits, labels, temperature=2.0) == pytest.approx(by_hand_t2)


def test_expected_calibration_error_by_hand():
    # 5 predictions; with 5 bins: 0.9, 0.85 in (0.8, 1]; 0.7 in (0.6, 0.8]; 0.55, 0.6 in (0.4, 0.6]
    probs = np.array([[0.9, 0.1], [0.85, 0.15], [0.3, 0.7], [0.55, 0.45], [0.4, 0.6]])
    labels = np.array([0, 1, 1, 0, 0])
    # bin (0.8,1]: conf 0.875, acc 0.5 -> 2 * 0.375; bin (0.6,0.8]: conf 0.7, acc 1 -> 1 * 0.3;
    # bin (0.4,0.6]: conf 0.575, acc 0.5 -> 2 * 0.075
    expected = (2 * 0.375 + 1 * 0.3 + 2 * 0.075) / 5
    assert expected_calibration_error(probs, labels, n_bins=5) == pytest.approx(expected)
    bins = reliability_bins(probs, labels, n_bins=5)
    assert bins["count"].tolist() == [0, 0, 2, 1, 2]


def test_ece_is_zero_when_confidence_matches_accuracy():
    probs = np.array([[0.75, 0.25]] * 4)
    labels = np.array([0, 0, 0, 1])
    assert expected_calibration_error(probs, labels) == pytest.approx(0.0)
    assert expected_calibration_error(np.array([[1.0, 0.0]]), np.array([0])) == pytest.approx(0.0)


def test_reliability_diagram_is_a_png(tmp_path):
    logits, labels = overconfident_logits(2.0, n=300)
    path = write_reliability_diagram(tmp_path / "reliability.png", torch.softmax(logits, -1).numpy(),
                                     labels.numpy(), title="validation")
    data = (tmp_path / "reliability.png").read_bytes()
    assert path == tmp_path / "reliability.png"
    assert data[:8] == PNG_SIGNATURE and len(data) > 5000
    from matplotlib.image import imread
    assert imread(str(tmp_path / "reliability.png")).shape[:2] == (600, 500)
