"""The embedding's projection to a few dimensions: a seeded Gaussian matrix made orthonormal, rebuilt on the device from
its seed (SplitMix64 integers, the same on every machine and numpy version) and checked against a fingerprint, so a
reference stays a few KB instead of carrying a D x k matrix."""

from __future__ import annotations

import math

import numpy as np

from tledge.errors import TledgeError

PROJECTION_METHOD = "gaussian-qr/splitmix64-box-muller"


def splitmix64(seed: int, count: int) -> np.ndarray:
    """``count`` 64-bit words of SplitMix64: integer-only, so the same bits on every platform and numpy."""
    z = np.arange(1, count + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(seed)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def projection_matrix(seed: int, dim: int, k: int) -> np.ndarray:
    """The (dim, k) orthonormal projection of a reference: seeded Gaussian columns, QR-orthonormalised."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2 ** 64:
        raise TledgeError(f"the projection seed must be an integer in [0, 2**64), got {seed!r}")
    if k < 1 or dim < k:
        raise TledgeError(f"cannot project {dim}-D embeddings to {k} dimensions")
    words = splitmix64(int(seed), 2 * dim * k)
    u = (words >> np.uint64(11)).astype(np.float64) * 2.0 ** -53  # 53 random bits -> [0, 1)
    gauss = np.sqrt(-2.0 * np.log(1.0 - u[0::2])) * np.cos(2.0 * math.pi * u[1::2])  # Box-Muller; 1 - u is in (0, 1]
    q, r = np.linalg.qr(gauss.reshape(dim, k))
    # QR fixes each column only up to sign; making R's diagonal positive makes the result unique.
    return q * np.where(np.diag(r) < 0, -1.0, 1.0)


def fingerprint(q: np.ndarray) -> np.ndarray:
    """Column sums, plain and position-weighted: a changed seed, generator or row order shows in both."""
    return np.concatenate([q.sum(axis=0), (np.arange(1, q.shape[0] + 1) / q.shape[0]) @ q])
