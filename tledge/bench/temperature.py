"""Temperature scaling: the one temperature that minimises the negative log-likelihood of held-out logits (a robust 1-D
search); reported beside the raw figures, never applied to a model's logits."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from tledge.bench.reliability import T_BOUNDS, as_labels, as_logits, nll


def fit_temperature(logits: Any, labels: Any) -> dict:
    """The temperature T minimising the NLL of softmax(logits / T), searched on log T within T_BOUNDS.

    NLL is convex in 1/T, hence unimodal in log T: a coarse grid finds the basin and golden-section search refines
    it. If the result does not beat T = 1 (flat NLL, e.g. constant logits) the answer is 1.0, so scaling can never
    make validation NLL worse.
    """
    z = as_logits(logits)  # a copy: the caller's logits are never changed
    y = as_labels(labels, z.shape[0], z.shape[1])
    nll_before = nll(z, y)

    def f(u: float) -> float:
        return nll(z, y, math.exp(u))

    lo, hi = math.log(T_BOUNDS[0]), math.log(T_BOUNDS[1])
    grid = np.linspace(lo, hi, 41)
    values = [f(u) for u in grid]
    i = int(np.argmin(values))
    a, b = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    inv_phi = (math.sqrt(5) - 1) / 2
    c, d = b - inv_phi * (b - a), a + inv_phi * (b - a)
    fc, fd = f(c), f(d)
    while b - a > 1e-7:
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - inv_phi * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + inv_phi * (b - a)
            fd = f(d)
    u_best, nll_best = (c, fc) if fc <= fd else (d, fd)
    if values[i] < nll_best:  # the grid point itself (e.g. a bound) can beat the refined interior point
        u_best, nll_best = float(grid[i]), values[i]
    # an "improvement" within rounding noise is no reason to report a temperature other than 1
    if not nll_best < nll_before - 1e-12 * max(1.0, abs(nll_before)):
        return {"temperature": 1.0, "nll_before": nll_before, "nll_after": nll_before}
    return {"temperature": float(math.exp(u_best)), "nll_before": nll_before, "nll_after": float(nll_best)}
