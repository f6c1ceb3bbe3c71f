"""The embedding's reference: its projection's mean and covariance, and the Mahalanobis distance of validation images
to them, cross-fitted (each fold measured against a fit without it) so new images are judged against honest spread."""

from __future__ import annotations

from typing import Any, Dict

import numpy as np

from tledge.errors import TledgeError
from tledge.monitor.histogram import histogram, sig6_digits, sig_list
from tledge.monitor.projection import PROJECTION_METHOD, fingerprint, projection_matrix

DISTANCE_QUANTILES = {"p50": 0.5, "p90": 0.9, "p95": 0.95, "p99": 0.99}


# Reference distances are cross-fitted: an image measured against a cloud fitted with it reads closer than a new
# image would, and the new images are always out of sample, so in-sample distances would bias every comparison.
_CROSS_FIT_FOLDS = 5


def fit_gaussian(z: np.ndarray) -> tuple:
    mean = z.mean(axis=0)
    cov = np.atleast_2d(np.cov(z, rowvar=False))
    # A whisker of ridge keeps the Cholesky factor defined when a projected direction is (nearly) constant.
    cov = cov + np.eye(len(mean)) * (1e-6 * max(float(np.trace(cov)) / len(mean), 1e-12))
    return mean, cov


def mahalanobis(z: np.ndarray, mean: np.ndarray, cov: np.ndarray) -> np.ndarray:
    try:
        chol = np.linalg.cholesky(cov)
    except np.linalg.LinAlgError as exc:
        raise TledgeError("the reference's embedding covariance is not positive definite: rebuild the reference") from exc
    white = np.linalg.solve(chol, (z - mean).T)
    return np.sqrt((white ** 2).sum(axis=0))


def embedding_reference(emb: np.ndarray, projection_dim: int, seed: int, bins: int) -> Dict[str, Any]:
    n, dim = emb.shape
    if isinstance(projection_dim, bool) or not isinstance(projection_dim, int) or projection_dim < 1:
        raise TledgeError(f"projection_dim must be a positive integer, got {projection_dim!r}")
    k = min(projection_dim, dim)
    # Each cross-fit fold fits a k-D covariance on 4/5 of the images: ask for a few images per parameter.
    if n < 4 * (k + 2):
        raise TledgeError(f"{n} images are too few for a {k}-D embedding reference: need {4 * (k + 2)}, or lower projection_dim")
    q = projection_matrix(seed, dim, k)
    z = emb @ q
    mean, cov = fit_gaussian(z)
    dist = np.empty(n)
    folds = np.arange(n) % _CROSS_FIT_FOLDS  # interleaved: a split sorted by class still spreads over the folds
    for f in range(_CROSS_FIT_FOLDS):
        fm, fc = fit_gaussian(z[folds != f])
        dist[folds == f] = mahalanobis(z[folds == f], fm, fc)
    hist = histogram(dist, bins)
    hist["quantiles"] = {key: sig6_digits(np.quantile(dist, p)) for key, p in DISTANCE_QUANTILES.items()}
    return {
        "dim": int(dim),
        "projection": {"method": PROJECTION_METHOD, "seed": int(seed), "shape": [int(dim), int(k)],
                       "fingerprint": sig_list(fingerprint(q))},
        "mean": sig_list(mean),
        "covariance": [sig_list(row) for row in cov],
        "distance": hist,
    }
