"""tledge.bench.reliability: ECE and its bins, confident errors, selective prediction, temperature scaling, the SVG."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from tledge.bench.reliability import (
    expected_calibration_error,
    failure_summary,
    high_confidence_errors,
    selective_prediction,
    softmax,
)
from tledge.bench.temperature import fit_temperature
from tledge.errors import TledgeError
from tledge.report.reliability_chart import reliability_svg

SVG = "{http://www.w3.org/2000/svg}"


def _calibrated(n: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities whose top-1 confidence is right exactly as often as it claims: confidence c ~ U(0.4, 1) on a
    random class, the rest spread evenly, and the label equals that class with probability c."""
    rng = np.random.default_rng(seed)
    conf = rng.uniform(0.4, 1.0, n)
    pred = rng.integers(0, classes, n)
    probs = np.repeat(((1 - conf) / (classes - 1))[:, None], classes, axis=1)
    probs[np.arange(n), pred] = conf
    right = rng.random(n) < conf
    other = (pred + rng.integers(1, classes, n)) % classes  # any class but the predicted one
    return probs, np.where(right, pred, other)


def _binary(conf, right) -> tuple[np.ndarray, np.ndarray]:
    """Two-class probabilities predicting class 0 with the given confidences (> 0.5); label 0 where right."""
    conf = np.asarray(conf, dtype=np.float64)
    return np.stack([conf, 1 - conf], axis=1), np.where(np.asarray(right, dtype=bool), 0, 1)


# ---------------------------------------------------------------------------------------------------------------
# softmax and ECE


def test_softmax_is_stable_and_leaves_input_alone():
    logits = np.array([[1000.0, 1001.0, 999.0], [-5.0, 0.0, 5.0]], dtype=np.float32)
    before = logits.copy()
    p = softmax(logits)
    assert p.dtype == np.float64 and np.all(np.isfinite(p))
    np.testing.assert_allclose(p.sum(axis=1), 1.0)
    np.testing.assert_allclose(p[0], softmax([[0.0, 1.0, -1.0]])[0])  # shift invariance, no overflow
    np.testing.assert_array_equal(logits, before)


def test_calibrated_set_has_small_ece_and_overconfident_a_large_one():
    probs, labels = _calibrated(40_000, 4, seed=0)
    calibrated = expected_calibration_error(probs, labels)["ece"]
    overconfident = expected_calibration_error(softmax(np.log(probs) * 5), labels)["ece"]
    assert calibrated < 0.015
    assert overconfident > 0.15
    assert overconfident > 8 * calibrated


def test_ece_by_hand():
    probs = np.array([
        [0.9, 0.05, 0.05],  # conf .9, right
        [0.8, 0.1, 0.1],  # conf .8, wrong (label 1)
        [0.2, 0.6, 0.2],  # conf .6, right
        [0.4, 0.3, 0.3],  # conf .4, right
    ])
    labels = np.array([0, 1, 1, 0])
    two = expected_calibration_error(probs, labels, bins=2)
    # (0, .5]: one sample, acc 1, conf .4 -> gap .6; (.5, 1]: acc 2/3, conf 2.3/3 -> gap .1
    assert two["ece"] == pytest.approx(0.25 * 0.6 + 0.75 * 0.1)
    assert two["mce"] == pytest.approx(0.6)
    assert [b["count"] for b in two["bins"]] == [1, 3]
    assert two["bins"][1]["confidence"] == pytest.approx(2.3 / 3)
    assert two["bins"][1]["accuracy"] == pytest.approx(2 / 3)

    five = expected_calibration_error(probs, labels, bins=5)
    # right-closed bins: .4 -> (.2, .4], .6 -> (.4, .6], .8 -> (.6, .8], .9 -> (.8, 1]; the first bin is empty
    assert [b["count"] for b in five["bins"]] == [0, 1, 1, 1, 1]
    assert five["bins"][0]["confidence"] is None and five["bins"][0]["accuracy"] is None
    assert [(b["lo"], b["hi"]) for b in five["bins"]][:2] == [(0.0, 0.2), (0.2, 0.4)]
    assert five["ece"] == pytest.approx((0.6 + 0.4 + 0.8 + 0.1) / 4)
    assert five["mce"] == pytest.approx(0.8)


# ---------------------------------------------------------------------------------------------------------------
# confident errors and selective prediction


def test_high_confidence_errors_listed_and_sorted():
    conf = [0.95, 0.99, 0.85, 0.99, 0.9, 0.91, 0.6]
    right = [False, False, False, True, False, False, False]
    probs, labels = _binary(conf, right)
    files = [f"img{i}.jpg" for i in range(len(conf))]
    rows = high_confidence_errors(probs, labels, files, ["cat", "dog"], threshold=0.9)
    assert [r["file"] for r in rows] == ["img1.jpg", "img0.jpg", "img5.jpg", "img4.jpg"]  # .9 itself counts
    assert [r["confidence"] for r in rows] == pytest.approx([0.99, 0.95, 0.91, 0.9])
    assert all(r["label"] == "dog" and r["predicted"] == "cat" for r in rows)
    assert high_confidence_errors(probs, labels, files, ["cat", "dog"], threshold=0.999) == []


def test_selective_prediction_reaches_target():
    probs, labels = _calibrated(5000, 3, seed=1)
    record = selective_prediction(probs, labels, target_accuracy=0.9)
    target = record["target"]
    conf, correct = probs.max(axis=1), probs.argmax(axis=1) == labels
    accepted = conf >= target["threshold"]
    assert target["reason"] is None
    assert correct[accepted].mean() == pytest.approx(target["accuracy"]) and target["accuracy"] >= 0.9
    assert accepted.mean() == pytest.approx(target["coverage"]) and 0.05 < target["coverage"] < 0.9
    # the lowest such threshold: every lower one accepts a set below the target
    assert all(correct[conf >= t].mean() < 0.9 for t in np.unique(conf[~accepted]))
    curve = record["curve"]
    assert len(curve) <= 50 and curve[-1]["coverage"] == 1.0
    assert curve[-1]["accuracy"] == pytest.approx(correct.mean())
    assert [c["coverage"] for c in curve] == sorted(c["coverage"] for c in curve)
    assert 0 < record["aurc"] < 1 - correct.mean()  # confidence ranks errors late, so AURC beats the full-coverage risk


def test_selective_prediction_counts_whole_tie_groups():
    # three samples tied at .9, one of them wrong: a threshold of .9 accepts all three (3 of 4 right), never
    # "the first two of the tie"; so for 0.9 accuracy only the .95 threshold qualifies
    conf = [0.95, 0.9, 0.9, 0.9, 0.8]
    for wrong_at in (1, 3):  # the wrong tied sample first or last in input order
        right = [True] * 5
        right[wrong_at] = False
        probs, labels = _binary(conf, right)
        record = selective_prediction(probs, labels, target_accuracy=0.9)
        assert record["target"]["threshold"] == pytest.approx(0.95)
        assert record["target"]["coverage"] == pytest.approx(0.2) and record["target"]["accepted"] == 1
        assert [(c["accepted"], c["accuracy"]) for c in record["curve"]] == [(1, 1.0), (4, 0.75), (5, 0.8)]
        # risk at k=1..5: 0, then the tie's expected 1/3 error spread over k=2,3,4: (1/3)/2, (2/3)/3, 1/4, then 1/5
        assert record["aurc"] == pytest.approx((0 + 1 / 6 + 2 / 9 + 1 / 4 + 1 / 5) / 5)
    assert selective_prediction(probs, labels, target_accuracy=0.75)["target"]["coverage"] == pytest.approx(1.0)


def test_selective_prediction_unreachable_target():
    probs, labels = _binary([0.9, 0.8, 0.7], [False, True, True])
    target = selective_prediction(probs, labels, target_accuracy=1.0)["target"]
    assert target["threshold"] is None and target["coverage"] is None
    assert "no confidence threshold reaches accuracy 1" in target["reason"]


def test_selective_curve_thins_to_at_most_50_points():
    probs, labels = _calibrated(3000, 3, seed=2)
    curve = selective_prediction(probs, labels)["curve"]
    assert 40 <= len(curve) <= 50 and curve[-1]["accepted"] == 3000
    assert "target" not in selective_prediction(probs, labels)


# ---------------------------------------------------------------------------------------------------------------
# temperature scaling


def test_temperature_recovers_the_overconfidence_factor():
    rng = np.random.default_rng(3)
    n, c = 20_000, 5
    true_logits = rng.normal(0, 1.5, (n, c))
    p = softmax(true_logits)
    labels = (rng.random(n)[:, None] > np.cumsum(p, axis=1)).sum(axis=1)  # a draw from each row's distribution
    labels = np.minimum(labels, c - 1)
    logits = true_logits * 3  # three times too confident
    before = logits.copy()
    fit = fit_temperature(logits, labels)
    assert fit["temperature"] == pytest.approx(3.0, abs=0.25)
    assert fit["nll_after"] < fit["nll_before"] - 0.1
    np.testing.assert_array_equal(logits, before)
    assert fit_temperature(true_logits, labels)["temperature"] == pytest.approx(1.0, abs=0.1)


def test_temperature_never_worsens_nll():
    labels = np.array([0, 1, 2, 0])
    flat = fit_temperature(np.full((4, 3), 2.5), labels)  # NLL is log 3 for every T
    assert flat == {"temperature": 1.0, "nll_before": pytest.approx(np.log(3)), "nll_after": flat["nll_before"]}
    rng = np.random.default_rng(4)
    for _ in range(5):
        logits, labels = rng.normal(0, 4, (50, 4)), rng.integers(0, 4, 50)
        fit = fit_temperature(logits, labels)
        assert fit["nll_after"] <= fit["nll_before"]
        assert 0.05 <= fit["temperature"] <= 20


# ---------------------------------------------------------------------------------------------------------------
# SVG and the summary record


def test_reliability_svg_parses_and_shows_the_ece():
    probs, labels = _calibrated(500, 3, seed=5)
    record = expected_calibration_error(probs, labels, bins=10)
    svg = reliability_svg(record, 'resnet <int8> & "cpu"')
    root = ET.fromstring(svg)
    assert root.tag == f"{SVG}svg"
    texts = " ".join(t.text or "" for t in root.iter(f"{SVG}text"))
    assert f"ECE {record['ece']:.4f}" in texts and 'resnet <int8> & "cpu"' in texts
    bars = [r for r in root.iter(f"{SVG}rect") if r.get("class") == "accuracy"]
    assert len(bars) == sum(1 for b in record["bins"] if b["count"])
    with pytest.raises(TledgeError, match="expected_calibration_error"):
        reliability_svg({"bins": []}, "x")


def test_failure_summary_is_json_ready_and_keeps_raw_logits():
    probs, labels = _calibrated(2000, 3, seed=6)
    logits = np.log(probs) * 4  # overconfident
    before = logits.copy()
    files = [f"val/{i}.png" for i in range(len(labels))]
    summary = failure_summary(logits, labels, files, ["a", "b", "c"], target_accuracy=0.95, temperature=4.0)
    json.dumps(summary, allow_nan=False)
    np.testing.assert_array_equal(logits, before)
    assert summary["top1"] == pytest.approx(np.mean(logits.argmax(axis=1) == labels), abs=1e-5)
    assert summary["high_confidence_error_count"] == len(summary["high_confidence_errors"]) > 0
    assert summary["ece"] == pytest.approx(expected_calibration_error(softmax(logits), labels)["ece"], abs=1e-5)
    scaled = summary["temperature_scaled"]
    assert scaled["temperature"] == 4.0 and "dividing the logits by temperature 4" in scaled["note"]
    assert scaled["ece"] < 0.03 < summary["ece"]  # T=4 undoes the x4
    assert summary["selective_prediction"]["target"]["accuracy"] >= 0.95
    assert "temperature_scaled" not in failure_summary(logits, labels, files, ["a", "b", "c"])
    ET.fromstring(reliability_svg(summary, "summary"))  # the summary carries its bins

    def floats(obj, key=None):
        if isinstance(obj, dict):
            return [f for k, v in obj.items() for f in floats(v, k)]
        if isinstance(obj, list):
            return [f for v in obj for f in floats(v, key)]
        return [obj] if isinstance(obj, float) and key != "threshold" else []

    assert all(round(f, 5) == f for f in floats(summary))


# ---------------------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: softmax(np.zeros(3)), "shape"),
        (lambda: softmax(np.zeros((0, 3))), "empty"),
        (lambda: softmax([[0.0, np.nan]]), "NaN"),
        (lambda: fit_temperature(np.zeros((3, 2)), np.array([0, 1])), "labels has 2 entries"),
        (lambda: fit_temperature(np.zeros((2, 2)), np.array([0, 2])), "out of range"),
        (lambda: fit_temperature(np.zeros((2, 2)), np.array([0, -1])), "out of range"),
        (lambda: fit_temperature(np.zeros((2, 2)), np.array([0.0, 1.0])), "integer"),
        (lambda: fit_temperature(np.zeros((2, 2)), np.array([], dtype=int)), "empty"),
        (lambda: expected_calibration_error(np.array([[2.0, -1.0]]), np.array([0])), "softmax"),
        (lambda: expected_calibration_error(np.array([[0.5, 0.5]]), np.array([0]), bins=0), "bins"),
        (lambda: high_confidence_errors(np.array([[0.5, 0.5]]), np.array([0]), ["a", "b"], ["x", "y"]), "files has 2"),
        (lambda: high_confidence_errors(np.array([[0.5, 0.5]]), np.array([0]), ["a"], ["x"]), "classes has 1"),
        (lambda: selective_prediction(np.array([[0.5, 0.5]]), np.array([0]), target_accuracy=0), r"\(0, 1\]"),
        (lambda: selective_prediction(np.array([[0.5, 0.5]]), np.array([0]), target_accuracy=1.2), r"\(0, 1\]"),
        (lambda: failure_summary(np.zeros((2, 2)), np.array([0, 1]), ["a"], ["x", "y"]), "files has 1"),
        (lambda: failure_summary(np.zeros((2, 2)), np.array([0, 1]), ["a", "b"], ["x", "y"], temperature=0), "temperature"),
    ],
)
def test_bad_input_is_a_clear_tledge_error(call, message):
    with pytest.raises(TledgeError, match=message):
        call()
