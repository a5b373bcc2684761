"""common/calibration.py: temperature fitting, ECE, NLL, reliability diagram."""
import numpy as np
import pytest
import torch

from common.calibration import (MAX_TEMPERATURE, MIN_TEMPERATURE, calibration_report, expected_calibration_error,
                                fit_temperature, format_calibration, negative_log_likelihood, reliability_bins,
                                write_reliability_diagram)

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


# ---------------------------------------------------------------- when the temperature is applied

def test_a_healthy_validation_set_applies_the_temperature_and_lowers_nll():
    logits, labels = overconfident_logits(2.5, n=600, classes=3)
    report = calibration_report(logits, labels)
    assert report["applied"] is True and report["reason"] == "fitted on 600 validation examples"
    assert report["temperature"] == report["fitted_temperature"] == pytest.approx(2.5, abs=0.4)
    assert report["temperature"] == round(report["temperature"], 4)
    assert report["nll_after"] < report["nll_before"]
    assert report["min_class_count"] >= 20
    line = format_calibration(report)
    assert f"temperature {report['temperature']:.3f} applied" in line and "0.0000000" not in line


def test_a_twelve_record_validation_set_is_reported_and_not_applied():
    # a model near chance on 12 records: the NLL keeps falling toward uniform, the fit runs to 20
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(12, 2, generator=generator) * 4.0
    labels = (logits.argmax(-1) + torch.tensor([1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0])) % 2  # 7 of 12 wrong
    assert fit_temperature(logits, labels) == MAX_TEMPERATURE  # what used to be applied
    report = calibration_report(logits, labels)
    assert report["applied"] is False and report["temperature"] == 1.0
    assert report["fitted_temperature"] == MAX_TEMPERATURE
    assert "only 12 validation examples" in report["reason"]
    assert report["nll_after"] == report["nll_before"] and report["ece_after"] == report["ece_before"]
    line = format_calibration(report)
    assert "not applied" in line and "20.000" in line


def test_a_class_with_few_validation_examples_is_not_enough():
    logits, labels = overconfident_logits(2.5, n=600, classes=3)
    keep = (labels != 2) | (torch.arange(600) < 40)  # class 2 keeps only its first few examples
    labels, logits = labels[keep], logits[keep]
    assert 0 < int((labels == 2).sum()) < 20
    report = calibration_report(logits, labels)
    assert report["applied"] is False and "class id 2" in report["reason"]
    assert report["temperature"] == 1.0


def test_a_fit_at_the_upper_bound_is_reported_and_not_applied():
    # plenty of data, but confident logits that carry no information about the labels
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(400, 2, generator=generator) * 5.0
    labels = torch.arange(400) % 2
    report = calibration_report(logits, labels)
    assert report["fitted_temperature"] == MAX_TEMPERATURE
    assert report["applied"] is False and report["temperature"] == 1.0
    assert "upper bound" in report["reason"]


def test_a_fit_at_the_lower_bound_is_reported_and_not_applied():
    # a validation set separated with margin: the NLL keeps falling as T -> 0
    labels = torch.arange(400) % 2
    logits = torch.nn.functional.one_hot(labels, 2).double() * 3.0
    report = calibration_report(logits, labels)
    assert report["fitted_temperature"] == MIN_TEMPERATURE
    assert report["applied"] is False and report["temperature"] == 1.0
    assert "lower bound" in report["reason"]


def test_the_support_thresholds_can_be_lowered():
    logits, labels = overconfident_logits(2.5, n=60, classes=2, seed=3)
    assert calibration_report(logits, labels)["applied"] is False
    report = calibration_report(logits, labels, min_examples=50, min_per_class=10)
    assert report["applied"] is True and report["temperature"] != 1.0


def test_an_empty_validation_set_gives_a_report_not_an_error():
    report = calibration_report(np.zeros((0, 3)), np.zeros(0, dtype=int))
    assert report["applied"] is False and report["temperature"] == 1.0
    assert report["nll_before"] is None and report["num_examples"] == 0 and report["min_class_count"] == 0
    assert "not applied" in format_calibration(report)
