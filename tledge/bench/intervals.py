"""The gate's statistics: a bootstrap interval of the candidate's latency ratio to the baseline's (paired blocks when both
run here, unpaired samples against a stored run), and the checks a verdict is made of."""

from __future__ import annotations

import numpy as np

from tledge.errors import TledgeError


def paired_ratio_interval(baseline_blocks, candidate_blocks, confidence: float = 0.95, resamples: int = 2000, seed: int = 0) -> dict:
    """Candidate / baseline latency from paired blocks: the median of per-block ratios and its bootstrap interval."""
    b, c = np.asarray(baseline_blocks, float), np.asarray(candidate_blocks, float)
    if b.shape != c.shape or b.ndim != 1 or len(b) < 2 or np.any(b <= 0) or np.any(c <= 0):
        raise TledgeError("paired timings need two equally long lists of positive block times")
    logs = np.log(c / b)
    rng = np.random.default_rng(seed)
    boot = _trimmed_mean(logs[rng.integers(0, len(logs), (resamples, len(logs)))])
    alpha = (1 - confidence) / 2
    return {"ratio": float(np.exp(_trimmed_mean(logs[None])[0])), "low": float(np.exp(np.quantile(boot, alpha))),
            "high": float(np.exp(np.quantile(boot, 1 - alpha))),
            "method": f"paired blocks, bootstrap of the 20%-trimmed mean log ratio ({len(b)} pairs)"}


def _trimmed_mean(rows: np.ndarray, cut: float = 0.1) -> np.ndarray:
    """Mean of each row without its lowest and highest ``cut`` share: robust to a stalled block, and more
    efficient than the median on the near-normal log ratios."""
    rows = np.sort(rows, axis=-1)
    k = int(rows.shape[-1] * cut)
    return rows[..., k : rows.shape[-1] - k].mean(axis=-1)


def unpaired_ratio_interval(baseline_samples, candidate_samples, confidence: float = 0.95, resamples: int = 2000, seed: int = 0) -> dict:
    """Candidate / baseline latency from independent samples (a stored baseline): ratio of medians, bootstrapped."""
    b, c = np.asarray(baseline_samples, float), np.asarray(candidate_samples, float)
    if min(len(b), len(c)) < 2 or np.any(b <= 0) or np.any(c <= 0):
        raise TledgeError("latency samples must hold at least two positive times each")
    rng = np.random.default_rng(seed)
    boot_b = np.median(b[rng.integers(0, len(b), (resamples, len(b)))], axis=1)
    boot_c = np.median(c[rng.integers(0, len(c), (resamples, len(c)))], axis=1)
    ratios = boot_c / boot_b
    alpha = (1 - confidence) / 2
    return {"ratio": float(np.median(c) / np.median(b)), "low": float(np.quantile(ratios, alpha)),
            "high": float(np.quantile(ratios, 1 - alpha)), "method": f"stored baseline: ratio of medians, both bootstrapped ({len(b)} and {len(c)} samples)"}


def latency_check(interval: dict, max_regression_pct: float) -> dict:
    limit = 1 + max_regression_pct / 100
    if interval["low"] > limit:
        status, passed = "regression", False
        why = f"the candidate is slower by {interval['low'] - 1:+.1%} to {interval['high'] - 1:+.1%}, beyond the {max_regression_pct:g}% allowed"
    elif interval["high"] <= limit:
        status, passed = "within", True
        why = f"at most {interval['high'] - 1:+.1%} slower, within the {max_regression_pct:g}% allowed"
    else:
        status, passed = "inconclusive", True
        why = (f"the interval {interval['low'] - 1:+.1%} .. {interval['high'] - 1:+.1%} straddles the {max_regression_pct:g}% allowed: "
               "not a proven regression (more --blocks narrow it)")
    return {"check": "latency", **interval, "limit": limit, "status": status, "passed": passed, "why": why}


def accuracy_checks(candidate_top1: float, baseline_top1: float, agreement: float | None, max_drop_pp: float, min_agreement: float) -> list[dict]:
    drop = (baseline_top1 - candidate_top1) * 100
    checks = [{"check": "top1", "candidate": round(candidate_top1, 5), "baseline": round(baseline_top1, 5), "drop_pp": round(drop, 3),
               "limit_pp": max_drop_pp, "passed": drop <= max_drop_pp + 1e-9,
               "why": f"top-1 {candidate_top1:.4f} vs {baseline_top1:.4f} ({-drop:+.2f} pt; at most -{max_drop_pp:g} allowed)"}]
    if agreement is not None:
        checks.append({"check": "agreement", "value": round(agreement, 5), "limit": min_agreement, "passed": agreement >= min_agreement - 1e-9,
                       "why": f"{agreement:.2%} of the predictions equal the baseline's (at least {min_agreement:.2%} required)"})
    return checks
