"""Does the deployed model still see what it was validated on? New images (or a service's prediction log) against
the reference of :mod:`tledge.monitor.reference`, one signal per quantity, and a verdict.

Every signal is a population stability index (PSI) of a histogram against the reference's, with the reference's
bin edges: brightness, contrast, each channel's mean, top-1 confidence, the predicted-class mix (one bin per class)
and the embedding's Mahalanobis distance from the validation cloud (bins at its reference deciles, so a cloud that
moved away puts its mass in the open top bin). The thresholds are the customary PSI ones (:data:`DEFAULT_THRESHOLDS`).

PSI measures a difference of two samples, so it is never zero: an unchanged stream of ``n`` images shows about
``(bins - 1) * (1 / n_reference + 1 / n)`` on average (the ``noise_floor`` in each signal's detail). With 200 new
images and 10 bins that is ~0.07, well under "watch"; with 20 it is ~0.5, over "drift", hence the warning the
record carries below :data:`MIN_IMAGES`.
"""

from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

from tledge.errors import TledgeError
from tledge.monitor.histogram import bin_counts
from tledge.monitor.reference import check_reference
from tledge.monitor.reference import signals as per_image_signals

DRIFT_FORMAT = "tledge.monitor-drift/1"
# PSI below 0.1: no meaningful change; 0.1 to 0.25: "watch" (a change worth a look, no verdict); 0.25 and up:
# "drift", the verdict flips. A caller overrides them with ``compare(thresholds=...)``: {"watch": w, "drift": d}
# for every signal, and per signal {"brightness": d} or {"brightness": {"watch": w, "drift": d}}; the key
# "channel_mean" covers every channel_mean_<c>.
DEFAULT_THRESHOLDS: Dict[str, float] = {"watch": 0.1, "drift": 0.25}
SIGNAL_NAMES = ("brightness", "contrast", "sharpness", "channel_mean", "confidence", "class_mix", "embedding")
MIN_IMAGES = 30  # below this, PSI on 10 bins is mostly sampling noise (see the module docstring)
EXIT_OK = 0
EXIT_DRIFT = 3  # as tledge gate's failed release: 1 stays a user error

PathLike = Union[str, "os.PathLike[str]"]


def population_stability_index(expected_counts: Sequence[float], actual_counts: Sequence[float],
                               eps: Optional[float] = None) -> float:
    """PSI = sum((a - e) * ln(a / e)) over the bins' shares, each share floored at ``eps``.

    The floor keeps an empty bin finite. By default it is half an image on each side (0.5 / total): a fixed tiny
    floor would let one empty bin of a small sample read as drift on its own (ln(1e-4 / 0.1) is -6.9).
    """
    e = np.asarray(expected_counts, dtype=np.float64)
    a = np.asarray(actual_counts, dtype=np.float64)
    if e.ndim != 1 or e.shape != a.shape or e.size == 0:
        raise TledgeError(f"PSI needs two count vectors of one length, got shapes {e.shape} and {a.shape}")
    if not (np.all(np.isfinite(e)) and np.all(np.isfinite(a))) or np.any(e < 0) or np.any(a < 0):
        raise TledgeError("PSI counts must be finite and non-negative")
    if e.sum() <= 0 or a.sum() <= 0:
        raise TledgeError("PSI needs at least one count on each side")
    if eps is not None and not (0 < eps < 1):
        raise TledgeError(f"the PSI floor eps must be in (0, 1), got {eps!r}")
    pe = np.maximum(e / e.sum(), eps if eps is not None else 0.5 / e.sum())
    pa = np.maximum(a / a.sum(), eps if eps is not None else 0.5 / a.sum())
    return float(np.sum((pa - pe) * np.log(pa / pe)))


def _noise_floor(bins: int, n_ref: int, n: int) -> float:
    return (max(bins, 1) - 1) * (1.0 / n_ref + 1.0 / n)


# Per signal, the chance that sampling noise alone reaches the drift (watch) threshold: the thresholds rise above
# the customary PSI ones where the samples are too small for those (bench/RESULTS.md: at 100 images against 270 the
# customary 0.25 alone raised a false alarm in 22% of the trials on NEU).
FALSE_ALARM_PER_SIGNAL = {"drift": 0.001, "watch": 0.05}
_Z = {0.001: 3.0902, 0.05: 1.6449}  # standard normal upper quantiles


def _chi2_quantile(df: int, alpha: float) -> float:
    """Upper ``alpha`` quantile of chi-square with ``df`` degrees of freedom (Wilson-Hilferty; within 1% for df >= 3)."""
    k = max(int(df), 1)
    return k * (1 - 2 / (9 * k) + _Z[alpha] * math.sqrt(2 / (9 * k))) ** 3


def sampling_floor(bins: int, n_ref: int, n: int, alpha: float) -> float:
    """The PSI that two samples of one distribution exceed with probability ``alpha``: PSI times n*m/(n+m) is about
    chi-square with bins-1 degrees of freedom (it is Jeffreys' divergence, twice the Kullback-Leibler in the limit)."""
    return _chi2_quantile(max(bins, 2) - 1, alpha) * (1.0 / n_ref + 1.0 / n)


def _chi2_sf(x: float, df: int) -> float:
    """Upper tail of chi-square by the Wilson-Hilferty cube-root approximation (good to ~1e-3 here; no scipy)."""
    if df <= 0 or x <= 0:
        return 1.0
    h = 2.0 / (9.0 * df)
    z = ((x / df) ** (1.0 / 3.0) - (1.0 - h)) / math.sqrt(h)
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def sig6(x: float) -> float:
    return float(f"{float(x):.6g}")


def _resolve_thresholds(overrides: Optional[Mapping[str, Any]], channels: int) -> Dict[str, Dict[str, float]]:
    """Effective {"watch", "drift"} per signal name, from the defaults and the caller's overrides (checked)."""
    over = dict(overrides or {})

    def pair(spec: Any, base: Dict[str, float], where: str) -> Dict[str, float]:
        if isinstance(spec, Mapping):
            unknown = set(spec) - {"watch", "drift"}
            if unknown:
                raise TledgeError(f"thresholds[{where!r}] takes 'watch' and 'drift', not {sorted(unknown)}")
            out = {**base, **spec}
        else:
            out = {**base, "drift": spec}
        for key, value in out.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
                raise TledgeError(f"threshold {where}.{key} must be a positive number, got {value!r}")
        if out["watch"] > out["drift"]:
            # An override of drift alone below the default watch pulls watch down with it rather than failing.
            if not isinstance(spec, Mapping) or "watch" not in spec:
                out["watch"] = out["drift"]
            else:
                raise TledgeError(f"threshold {where}: watch {out['watch']} is above drift {out['drift']}")
        return {k: float(v) for k, v in out.items()}

    base = pair({k: over.pop(k) for k in ("watch", "drift") if k in over}, dict(DEFAULT_THRESHOLDS), "all")
    names = [n for n in SIGNAL_NAMES if n != "channel_mean"] + [f"channel_mean_{c}" for c in range(channels)]
    unknown = set(over) - set(names) - {"channel_mean"}
    if unknown:
        raise TledgeError(f"unknown threshold key(s) {sorted(unknown)}: use watch, drift or a signal name {sorted(names)}")
    group = pair(over["channel_mean"], base, "channel_mean") if "channel_mean" in over else base
    return {name: pair(over[name], group if name.startswith("channel_mean_") else base, name) if name in over
            else (group if name.startswith("channel_mean_") else base) for name in names}


def _status(value: float, thr: Mapping[str, float]) -> str:
    return "drift" if value >= thr["drift"] else "watch" if value >= thr["watch"] else "ok"


def _entry(value: float, thr: Mapping[str, float], detail: Dict[str, Any], bins: int, n_ref: int, n: int) -> Dict[str, Any]:
    """One signal's record: its thresholds are the configured PSI ones, raised to what sampling noise alone reaches
    with probability FALSE_ALARM_PER_SIGNAL at these sample sizes."""
    used = {level: max(thr[level], sampling_floor(bins, n_ref, n, FALSE_ALARM_PER_SIGNAL[level])) for level in ("watch", "drift")}
    detail["psi_thresholds"] = {level: thr[level] for level in ("watch", "drift")}
    return {"value": sig6(value), "threshold": sig6(used["drift"]), "watch": sig6(used["watch"]), "status": _status(value, used),
            "detail": detail}


def _histogram_signal(hist: Mapping[str, Any], values: np.ndarray, n_ref: int, thr: Mapping[str, float]) -> Dict[str, Any]:
    counts = bin_counts(values, hist["edges"])
    psi = population_stability_index(hist["counts"], counts)
    mean = float(values.mean())
    sd = float(hist["std"])
    detail = {
        "reference_mean": hist["mean"], "mean": sig6(mean),
        # How far the mean moved in reference standard deviations: says "brighter" or "flatter" at a glance.
        "shift_in_reference_sd": sig6((mean - hist["mean"]) / sd) if sd > 0 else None,
        "bins": len(counts), "counts": [int(c) for c in counts],
        "noise_floor": sig6(_noise_floor(len(counts), n_ref, len(values))),
    }
    return _entry(psi, thr, detail, len(counts), n_ref, len(values))


def _class_mix_signal(ref_counts: Sequence[int], predicted: np.ndarray, classes: Sequence[str], n_ref: int,
                      thr: Mapping[str, float]) -> Dict[str, Any]:
    ref = np.asarray(ref_counts, dtype=np.float64)
    new = np.bincount(predicted, minlength=len(classes)).astype(np.float64)
    psi = population_stability_index(ref, new)
    # A chi-square test of homogeneity beside the PSI: it knows the sample sizes, so it says whether the change
    # could be chance; classes neither side predicted carry no information and are left out of it.
    obs = np.vstack([ref, new])[:, (ref + new) > 0]
    expected = obs.sum(axis=1, keepdims=True) * obs.sum(axis=0, keepdims=True) / obs.sum()
    chi2 = float(((obs - expected) ** 2 / expected).sum())
    df = obs.shape[1] - 1
    ref_share, new_share = ref / ref.sum(), new / new.sum()
    order = np.argsort(-np.abs(new_share - ref_share), kind="stable")[:5]
    detail = {
        "largest_changes": [{"class": classes[i], "reference_share": sig6(ref_share[i]), "share": sig6(new_share[i])}
                            for i in order if new_share[i] != ref_share[i]],
        "classes_predicted": int(np.count_nonzero(new)), "classes": len(classes),
        "chi2": sig6(chi2), "df": df, "p_value": sig6(_chi2_sf(chi2, df)),
        "noise_floor": sig6(_noise_floor(int(np.count_nonzero(ref)), n_ref, int(new.sum()))),
    }
    return _entry(psi, thr, detail, int(np.count_nonzero(ref)), n_ref, int(new.sum()))


def _embedding_signal(part: Mapping[str, Any], distance: np.ndarray, n_ref: int, thr: Mapping[str, float]) -> Dict[str, Any]:
    hist = part["distance"]
    entry = _histogram_signal(hist, distance, n_ref, thr)
    q = hist["quantiles"]
    entry["detail"].update({
        "reference_mean_distance": hist["mean"], "mean_distance": sig6(distance.mean()),
        # Out-of-distribution share: beyond the reference's 95th / 99th percentile (5% and 1% if unchanged).
        "share_beyond_reference_p95": sig6(np.mean(distance > q["p95"])),
        "share_beyond_reference_p99": sig6(np.mean(distance > q["p99"])),
    })
    return entry


def _class_indices(predictions: Sequence[Any], classes: Sequence[str]) -> np.ndarray:
    """Class names or indices -> indices into the reference's classes."""
    lookup = {name: i for i, name in enumerate(classes)}
    out = np.empty(len(predictions), dtype=np.int64)
    for i, p in enumerate(predictions):
        if isinstance(p, str):
            if p not in lookup:
                raise TledgeError(f"prediction {i}: class {p!r} is not one of the reference's classes {list(classes)}")
            out[i] = lookup[p]
        elif isinstance(p, (int, np.integer)) and not isinstance(p, (bool, np.bool_)):
            if not 0 <= int(p) < len(classes):
                raise TledgeError(f"prediction {i}: class index {p} is out of range for {len(classes)} classes")
            out[i] = int(p)
        else:
            raise TledgeError(f"prediction {i}: {p!r} is neither a class name nor a class index")
    return out


def _confidences(values: Sequence[float]) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TledgeError(f"confidences must be numbers ({exc})") from exc
    if arr.ndim != 1:
        raise TledgeError(f"confidences must be 1-D, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0) or np.any(arr > 1):
        raise TledgeError("confidences must be probabilities in [0, 1] (the top-1 softmax), not logits")
    return arr


def compare(
    reference: Union[Mapping[str, Any], PathLike],
    inputs: Any = None,
    embeddings: Optional[np.ndarray] = None,
    logits: Optional[np.ndarray] = None,
    *,
    predictions: Optional[Sequence[Any]] = None,
    confidences: Optional[Sequence[float]] = None,
    thresholds: Optional[Mapping[str, Any]] = None,
) -> Dict[str, Any]:
    """Compare new images with the reference; every signal the data allows, and a verdict.

    Give any of ``inputs`` (N, C, H, W) or their :func:`~tledge.monitor.reference.image_stats`, ``embeddings``
    (N, D), ``logits`` (N, K); or, log-only (a running service's JSONL, see :func:`read_prediction_log`),
    ``predictions`` (class names or indices) and/or ``confidences`` (top-1 probabilities) instead of logits.
    Returns ``{"format", "verdict": "ok"|"drift", "signals": {name: {"value", "threshold", "watch", "status",
    "detail"}}, "moved": [drift names], "watching": [watch names], "images", "reference_images", "warnings"}``.
    """
    ref = check_reference(reference)
    classes = ref["classes"]
    warnings: List[str] = []
    if logits is not None and (predictions is not None or confidences is not None):
        raise TledgeError("give logits, or predictions/confidences from a log, not both: they would be counted twice")
    # Data the reference cannot judge is set aside with a note rather than failing a monitoring run.
    if inputs is not None and ref.get("input") is None:
        warnings.append("inputs were given but the reference was built without them: input signals skipped")
        inputs = None
    if embeddings is not None and ref.get("embedding") is None:
        warnings.append("embeddings were given but the reference was built without them: embedding signal skipped")
        embeddings = None
    pred = _class_indices(predictions, classes) if predictions is not None else None
    conf = _confidences(confidences) if confidences is not None else None
    if inputs is None and embeddings is None and logits is None and pred is None and conf is None:
        raise TledgeError("nothing to compare: give inputs, embeddings, logits, or predictions/confidences")

    sig: Dict[str, np.ndarray] = {}
    if inputs is not None or embeddings is not None or logits is not None:
        sig = per_image_signals(inputs, embeddings, logits, ref)
    if pred is not None:
        sig["predicted"] = pred
    if conf is not None:
        sig["confidence"] = conf
    counts = {k: len(v) for k, v in sig.items()}
    if len(set(counts.values())) > 1:
        raise TledgeError("the data disagree on the number of images: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    n = next(iter(counts.values()))
    if n == 0:
        raise TledgeError("no images to compare: the data are empty")

    n_ref = int(ref["images"])
    channels = int(ref["input"]["channels"]) if ref.get("input") else 0
    thr = _resolve_thresholds(thresholds, channels)
    hists = ref["histograms"]
    out: Dict[str, Dict[str, Any]] = {}
    if "brightness" in sig:
        out["brightness"] = _histogram_signal(hists["brightness"], sig["brightness"], n_ref, thr["brightness"])
        out["contrast"] = _histogram_signal(hists["contrast"], sig["contrast"], n_ref, thr["contrast"])
        if "sharpness" in sig and "sharpness" in hists:
            out["sharpness"] = _histogram_signal(hists["sharpness"], sig["sharpness"], n_ref, thr["sharpness"])
        for c in range(channels):
            name = f"channel_mean_{c}"
            out[name] = _histogram_signal(hists[name], sig["channel_mean"][:, c], n_ref, thr[name])
    if "confidence" in sig:
        if "confidence" in hists:
            out["confidence"] = _histogram_signal(hists["confidence"], sig["confidence"], n_ref, thr["confidence"])
        else:
            warnings.append("the reference has no confidence histogram (built without logits): confidence skipped")
    if "predicted" in sig:
        if ref.get("class_mix"):
            out["class_mix"] = _class_mix_signal(ref["class_mix"]["counts"], sig["predicted"], classes, n_ref,
                                                 thr["class_mix"])
        else:
            warnings.append("the reference has no class mix (built without logits): class mix skipped")
    if "distance" in sig:
        out["embedding"] = _embedding_signal(ref["embedding"], sig["distance"], n_ref, thr["embedding"])

    if n < MIN_IMAGES:
        warnings.insert(0, f"only {n} images: PSI is noisy below {MIN_IMAGES} (an unchanged stream this small can read "
                           "as drift); treat the verdict as a hint and compare a larger sample")
    else:
        noisy = [name for name, e in out.items() if e["detail"]["noise_floor"] >= e["watch"]]
        if noisy:
            warnings.append(f"with {n} images, PSI of an unchanged stream already reaches the watch threshold for "
                            f"{', '.join(noisy)} (see noise_floor): compare more images")
    moved = [name for name, e in out.items() if e["status"] == "drift"]
    return {
        "format": DRIFT_FORMAT,
        "verdict": "drift" if moved else "ok",
        "signals": out,
        "moved": moved,
        "watching": [name for name, e in out.items() if e["status"] == "watch"],
        "images": int(n),
        "reference_images": n_ref,
        "warnings": warnings,
    }


def verdict_exit_code(record: Mapping[str, Any]) -> int:
    """0 for "ok", 3 for "drift" (as a failed `tledge gate`; 1 stays a user error): a CI step or cron job can act on
    the monitor's exit status alone."""
    verdict = record.get("verdict") if isinstance(record, Mapping) else None
    if verdict == "ok":
        return EXIT_OK
    if verdict == "drift":
        return EXIT_DRIFT
    raise TledgeError(f"not a drift record (verdict {verdict!r}): pass what tledge.monitor.compare returned")
