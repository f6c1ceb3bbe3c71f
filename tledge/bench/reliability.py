"""Calibration and failure analysis of a classifier's outputs: how far its confidence can be trusted.

Pure functions over numpy arrays of logits ``(N, C)`` and integer labels ``(N,)``: expected calibration error with
its reliability bins, the confidently wrong predictions, selective prediction (accuracy vs coverage, AURC and the
confidence threshold that reaches a target accuracy), temperature scaling, an SVG reliability diagram and one
JSON-ready record per model variant and split.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from tledge.errors import TledgeError

CURVE_POINTS = 50  # enough to draw the accuracy-coverage curve, small enough for report.json
T_BOUNDS = (0.05, 20.0)  # temperatures outside this range mean something other than miscalibration is wrong
ROUND = 5


# ---------------------------------------------------------------------------------------------------------------
# input checks: every public function validates here so the messages are the same wherever the data comes from


def as_logits(logits: Any, name: str = "logits") -> np.ndarray:
    """A float64 (N, C) copy, so nothing downstream can touch the caller's array."""
    try:
        arr = np.array(logits, dtype=np.float64)  # np.array copies
    except (TypeError, ValueError) as exc:
        raise TledgeError(f"{name} must be a numeric array of shape (N, C): {exc}") from exc
    if arr.ndim != 2:
        raise TledgeError(f"{name} must have shape (N, C), got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise TledgeError(f"{name} is empty (shape {arr.shape}); need at least one sample and one class")
    if not np.all(np.isfinite(arr)):
        raise TledgeError(f"{name} contains NaN or infinite values ({int(np.sum(~np.isfinite(arr)))} of them)")
    return arr


def as_probs(probs: Any) -> np.ndarray:
    """(N, C) probabilities; rows must sum to 1 so that logits passed by mistake are caught rather than binned."""
    arr = as_logits(probs, "probs")
    if arr.min() < -1e-6 or arr.max() > 1 + 1e-6:
        raise TledgeError(f"probs must lie in [0, 1] (found {arr.min():.4g}..{arr.max():.4g}); pass softmax(logits), not logits")
    worst = float(np.max(np.abs(arr.sum(axis=1) - 1.0)))
    if worst > 1e-4:
        raise TledgeError(f"each row of probs must sum to 1 (worst row is off by {worst:.3g}); pass softmax(logits)")
    return arr


def as_labels(labels: Any, n: int, num_classes: int) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise TledgeError(f"labels must have shape (N,), got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise TledgeError("labels is empty; need at least one sample")
    if arr.shape[0] != n:
        raise TledgeError(f"labels has {arr.shape[0]} entries but there are {n} rows of scores; they must match")
    if not np.issubdtype(arr.dtype, np.integer):
        raise TledgeError(f"labels must be integer class indices, got dtype {arr.dtype}")
    bad = (arr < 0) | (arr >= num_classes)
    if np.any(bad):
        raise TledgeError(
            f"labels out of range: {int(bad.sum())} not in [0, {num_classes - 1}] (first bad value {int(arr[bad][0])})"
        )
    return arr.astype(np.int64)


def _check_names(values: Sequence[Any], expected: int, what: str, against: str) -> list[str]:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise TledgeError(f"{what} must be a sequence with one entry per {against}")
    if len(values) != expected:
        raise TledgeError(f"{what} has {len(values)} entries but there are {expected} {against}s; they must match")
    return [str(v) for v in values]


def _check_unit(value: Any, name: str, *, low_open: bool) -> float:
    """A number in (0, 1] (low_open) or [0, 1]; bools are refused because True would silently mean 1.0."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TledgeError(f"{name} must be a number, got {value!r}")
    v = float(value)
    ok = (0.0 < v <= 1.0) if low_open else (0.0 <= v <= 1.0)
    if not ok:
        raise TledgeError(f"{name} must be in {'(0, 1]' if low_open else '[0, 1]'}, got {value!r}")
    return v


def _top1(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Predicted class, its confidence and whether it is right."""
    pred = np.argmax(probs, axis=1)
    conf = probs[np.arange(probs.shape[0]), pred]
    return pred, conf, pred == labels


# ---------------------------------------------------------------------------------------------------------------
# the measures


def softmax(logits: Any) -> np.ndarray:
    """Row-wise softmax in float64; subtracting the row maximum keeps exp() from overflowing."""
    z = as_logits(logits)
    z -= z.max(axis=1, keepdims=True)  # z is our own copy
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of softmax(logits / T), via a stable log-sum-exp."""
    z = logits / temperature
    m = z.max(axis=1)
    lse = m + np.log(np.exp(z - m[:, None]).sum(axis=1))
    return float(np.mean(lse - z[np.arange(z.shape[0]), labels]))


def expected_calibration_error(probs: Any, labels: Any, bins: int = 15) -> dict:
    """ECE and MCE over ``bins`` equal-width bins of top-1 confidence, with every bin's count, confidence and accuracy.

    Bins are right-closed, (lo, hi], so a confidence of exactly 0.5 falls in the bin that ends at 0.5; the first bin
    also takes 0. Empty bins are listed with count 0 and confidence/accuracy None so a diagram has all the bins.
    """
    if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins < 1:
        raise TledgeError(f"bins must be a positive integer, got {bins!r}")
    p = as_probs(probs)
    y = as_labels(labels, p.shape[0], p.shape[1])
    _, conf, correct = _top1(p, y)
    n = conf.shape[0]
    edges = np.arange(bins + 1) / bins  # i/B is correctly rounded, unlike repeated addition of 1/B
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, bins - 1)
    counts = np.bincount(idx, minlength=bins)
    conf_sum = np.bincount(idx, weights=conf, minlength=bins)
    right_sum = np.bincount(idx, weights=correct.astype(np.float64), minlength=bins)
    records, ece, mce = [], 0.0, 0.0
    for b in range(bins):
        count = int(counts[b])
        record = {"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": count, "confidence": None, "accuracy": None}
        if count:
            c, a = conf_sum[b] / count, right_sum[b] / count
            record["confidence"], record["accuracy"] = float(c), float(a)
            ece += count / n * abs(a - c)
            mce = max(mce, abs(a - c))
        records.append(record)
    return {"ece": float(ece), "mce": float(mce), "n": int(n), "bins": records}


def high_confidence_errors(
    probs: Any, labels: Any, files: Sequence[Any], classes: Sequence[Any], threshold: float = 0.9
) -> list[dict]:
    """Every wrong prediction made with top-1 confidence >= threshold, most confident first (ties by file name).

    These are the samples worth looking at by hand: mislabelled data or a blind spot the model is sure about.
    """
    p = as_probs(probs)
    y = as_labels(labels, p.shape[0], p.shape[1])
    names = _check_names(files, p.shape[0], "files", "sample")
    class_names = _check_names(classes, p.shape[1], "classes", "score column")
    t = _check_unit(threshold, "threshold", low_open=False)
    pred, conf, correct = _top1(p, y)
    hits = np.flatnonzero(~correct & (conf >= t))
    rows = [
        {"file": names[i], "label": class_names[y[i]], "predicted": class_names[pred[i]], "confidence": float(conf[i])}
        for i in hits
    ]
    rows.sort(key=lambda r: (-r["confidence"], r["file"]))
    return rows


def selective_prediction(probs: Any, labels: Any, target_accuracy: float | None = None) -> dict:
    """Accuracy vs coverage when only predictions with confidence >= a threshold are accepted.

    Only thresholds at observed confidences change the accepted set, and a threshold accepts *all* samples tied at
    it, so every point here is a whole tie group: no point pretends to accept half of a tie. ``curve`` holds at
    most CURVE_POINTS of them and always full coverage. ``aurc`` is the mean selective risk over k = 1..N accepted
    samples, where inside a tie group the risk is its expectation over the order of the tied samples (so the
    value does not depend on how the input happened to be ordered). ``target`` (when target_accuracy is given)
    is the lowest threshold whose accepted set reaches the target, i.e. the largest coverage that does.
    """
    p = as_probs(probs)
    y = as_labels(labels, p.shape[0], p.shape[1])
    target = None if target_accuracy is None else _check_unit(target_accuracy, "target_accuracy", low_open=True)
    _, conf, correct = _top1(p, y)
    n = conf.shape[0]
    order = np.argsort(-conf, kind="stable")
    sc, right = conf[order], correct[order].astype(np.float64)

    # tie groups of the sorted confidences: ends[g] is the last index of group g
    ends = np.flatnonzero(np.r_[sc[1:] != sc[:-1], True])
    starts = np.r_[0, ends[:-1] + 1]
    accepted = ends + 1
    right_cum = np.cumsum(right)[ends]
    acc = right_cum / accepted
    thresholds = sc[ends]

    # AURC: expected errors among the first k sorted samples, spreading each group's errors evenly over the group
    sizes = ends - starts + 1
    wrong_group = sizes - (right_cum - np.r_[0.0, right_cum[:-1]])
    wrong_before = np.r_[0.0, np.cumsum(wrong_group)[:-1]]
    group_of = np.repeat(np.arange(len(ends)), sizes)
    k = np.arange(1, n + 1)
    expected_wrong = wrong_before[group_of] + (k - starts[group_of]) * (wrong_group / sizes)[group_of]
    aurc = float(np.mean(expected_wrong / k))

    if len(ends) <= CURVE_POINTS:
        picks = np.arange(len(ends))
    else:
        # the first group reaching each coverage step; the last step (N) is always the last group
        steps = np.arange(1, CURVE_POINTS + 1) * n / CURVE_POINTS
        picks = np.unique(np.searchsorted(accepted, steps - 1e-9, side="left"))
    curve = [
        {"threshold": float(thresholds[g]), "accepted": int(accepted[g]), "coverage": float(accepted[g] / n),
         "accuracy": float(acc[g])}
        for g in picks
    ]
    result: dict[str, Any] = {"n": int(n), "accuracy": float(acc[-1]), "aurc": aurc, "curve": curve}
    if target is not None:
        reach = np.flatnonzero(acc >= target - 1e-12)  # tolerance: k/n vs a decimal target in binary floating point
        if reach.size:
            g = int(reach[-1])  # largest accepted set = lowest threshold
            result["target"] = {"target_accuracy": target, "threshold": float(thresholds[g]), "accepted": int(accepted[g]),
                                "coverage": float(accepted[g] / n), "accuracy": float(acc[g]), "reason": None}
        else:
            best = int(np.argmax(acc))
            result["target"] = {
                "target_accuracy": target, "threshold": None, "accepted": 0, "coverage": None, "accuracy": None,
                "reason": f"no confidence threshold reaches accuracy {target:g}: the best is {acc[best]:.4f} "
                          f"(threshold {thresholds[best]:.6g}, coverage {accepted[best] / n:.4f})",
            }
    return result


# ---------------------------------------------------------------------------------------------------------------
# presentation


def _json_ready(obj: Any, key: str | None = None) -> Any:
    """Plain Python types with floats rounded to ROUND decimals, except thresholds: a rounded threshold could
    accept a different set of samples than the one its coverage and accuracy describe."""
    if isinstance(obj, dict):
        return {k: _json_ready(v, k) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_ready(v, key) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if key == "threshold" else round(float(obj), ROUND)
    return obj


def failure_summary(
    logits: Any,
    labels: Any,
    files: Sequence[Any],
    classes: Sequence[Any],
    *,
    threshold: float = 0.9,
    target_accuracy: float | None = None,
    temperature: float | None = None,
) -> dict:
    """The JSON-ready reliability record of one model variant on one split.

    top1, NLL, ECE/MCE with bins (so the record itself can go to reliability_svg), the confidently wrong samples,
    selective prediction, and with ``temperature`` the same calibration measures after dividing the logits by it,
    under "temperature_scaled" (the raw logits and the raw measures are unchanged).
    """
    z = as_logits(logits)
    y = as_labels(labels, z.shape[0], z.shape[1])
    _check_names(files, z.shape[0], "files", "sample")
    _check_names(classes, z.shape[1], "classes", "score column")
    number = isinstance(temperature, (int, float, np.integer, np.floating)) and not isinstance(temperature, bool)
    if temperature is not None and not (number and math.isfinite(float(temperature)) and float(temperature) > 0):
        raise TledgeError(f"temperature must be a finite number > 0, got {temperature!r}")
    probs = softmax(z)
    _, _, correct = _top1(probs, y)
    calibration = expected_calibration_error(probs, y)
    errors = high_confidence_errors(probs, y, files, classes, threshold=threshold)
    record: dict[str, Any] = {
        "n": int(z.shape[0]),
        "num_classes": int(z.shape[1]),
        "top1": float(np.mean(correct)),
        "nll": nll(z, y),
        "ece": calibration["ece"],
        "mce": calibration["mce"],
        "bins": calibration["bins"],
        "high_confidence_threshold": float(threshold),
        "high_confidence_error_count": len(errors),
        "high_confidence_errors": errors,
        "selective_prediction": selective_prediction(probs, y, target_accuracy),
    }
    if temperature is not None:
        t = float(temperature)
        scaled = expected_calibration_error(softmax(z / t), y)
        record["temperature_scaled"] = {
            "note": f"calibration after dividing the logits by temperature {t:g}; top1 and the raw record are unchanged",
            "temperature": t,
            "nll": nll(z, y, t),
            "ece": scaled["ece"],
            "mce": scaled["mce"],
            "bins": scaled["bins"],
            # the threshold differs: dividing by t reorders top-1 confidences between images with other margins
            "selective_prediction": selective_prediction(softmax(z / t), y, target_accuracy),
        }
    return _json_ready(record)
