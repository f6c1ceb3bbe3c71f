"""Latency of runners, measured so that comparisons are fair: percentiles of batch-1 calls, and interleaved rounds in
which every runner sees the same machine conditions."""

from __future__ import annotations

import time

import numpy as np


def percentiles(samples_ms: list[float]) -> dict:
    a = np.asarray(samples_ms)
    return {
        "p50": round(float(np.percentile(a, 50)), 4),
        "p90": round(float(np.percentile(a, 90)), 4),
        "p99": round(float(np.percentile(a, 99)), 4),
        "mean": round(float(a.mean()), 4),
        "stdev": round(float(a.std(ddof=1)) if len(a) > 1 else 0.0, 4),
        "min": round(float(a.min()), 4),
        "samples": len(a),
    }


def interleaved_p50(runners: dict, x: np.ndarray, rounds: int, per_round: int, warmup: int) -> dict[str, float]:
    """p50 latency in ms of each runner on ``x``, after ``warmup`` calls each, timed in interleaved rounds so that
    every runner sees the same machine conditions."""
    for runner in runners.values():
        time_calls(runner, x, warmup)
    times = {name: [] for name in runners}
    for _ in range(rounds):
        for name, runner in runners.items():
            times[name] += time_calls(runner, x, per_round)
    return {name: float(np.median(t)) for name, t in times.items()}


def time_calls(runner, x: np.ndarray, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        runner(x)
        times.append((time.perf_counter() - t0) * 1000.0)
    return times


BLOCK_MS = 50.0  # automatic calls per block fill about this much time


def timed_blocks(runners: dict, x: np.ndarray, blocks: int, calls: int, warmup: int) -> tuple[dict[str, list[float]], int]:
    """Per block, the median ms of each model over ``calls`` rounds in which every model runs once, the order
    alternating round by round (A B, B A, ...): a change of machine speed longer than one call hits both alike.

    ``calls=0`` picks the count from the warm-up: enough rounds to fill about ``BLOCK_MS`` per model.
    """
    names = list(runners)
    slowest = 0.0
    for runner in runners.values():
        for _ in range(max(warmup, 1)):
            t0 = time.perf_counter()
            runner(x)
            elapsed = (time.perf_counter() - t0) * 1000
        slowest = max(slowest, elapsed)
    if calls <= 0:
        calls = int(min(50, max(3, BLOCK_MS // max(slowest, 1e-3))))
    out: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(blocks):
        times: dict[str, list[float]] = {n: [] for n in names}
        for i in range(calls):
            for name in (names if i % 2 == 0 else names[::-1]):
                t0 = time.perf_counter()
                runners[name](x)
                times[name].append((time.perf_counter() - t0) * 1000)
        for name in names:
            out[name].append(float(np.median(times[name])))
    return out, calls
