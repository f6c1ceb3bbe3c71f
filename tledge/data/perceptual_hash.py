"""A 64-bit perceptual hash (DCT of a 32x32 gray image, low frequencies against their median) that survives re-encoding,
resizing and small brightness changes, and the search for hash pairs within a Hamming distance (band buckets)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Sequence

import numpy as np

from tledge.data.images import open_image, to_rgb
from tledge.errors import TledgeError

HASH_BITS = 64


HASH_GRID = 32  # images are reduced to HASH_GRID x HASH_GRID gray before the DCT


@functools.lru_cache(maxsize=None)
def _dct_matrix(n: int) -> np.ndarray:
    """The orthonormal DCT-II matrix: ``C @ x`` is the DCT of a column ``x``; ``C @ X @ C.T`` the 2-D DCT."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    c = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * i + 1) * k / (2 * n))
    c[0, :] = np.sqrt(1.0 / n)
    return c


@functools.lru_cache(maxsize=None)
def _low_frequencies(count: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column indices of the ``count`` lowest-frequency AC coefficients, growing squares from the origin:
    for 64, the top-left 8 x 8 block less the DC term, plus (0, 8) for the 64th bit.

    The DC term is left out: it is only the mean brightness, which a brightened copy changes. The square block
    told apart shapes drawn at one spot (a ring and a square) far better than taking diagonals (u + v) in order.
    """
    cells = sorted(((u, v) for u in range(HASH_GRID) for v in range(HASH_GRID) if (u, v) != (0, 0)),
                   key=lambda uv: (max(uv), uv))[:count]
    return np.asarray([u for u, _ in cells]), np.asarray([v for _, v in cells])


def _gray_grid(path: str | Path) -> np.ndarray:
    """The image at ``path`` as a HASH_GRID x HASH_GRID float64 gray array; unreadable files are a TledgeError."""
    from PIL import Image

    try:
        with open_image(path) as img:
            # JPEG only (a no-op otherwise): decode luminance at a reduced DCT scale, several times faster on
            # photos and still at least twice the grid, so the later resize does the real filtering.
            img.draft("L", (2 * HASH_GRID, 2 * HASH_GRID))
            img.load()
            gray = to_rgb(img, path).convert("L")
    except TledgeError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError) as exc:  # truncated or corrupt pixel data
        raise TledgeError(f"cannot read image {path}: {exc}. Remove or replace the file.") from None
    # Aspect ratio is ignored on purpose: a copy cropped or padded differently is not what this looks for, and a
    # stretched copy should still match.
    return np.asarray(gray.resize((HASH_GRID, HASH_GRID), Image.Resampling.BILINEAR), dtype=np.float64)


def perceptual_hash(path: str | Path) -> int:
    """A 64-bit DCT hash of the image at ``path``: close (small :func:`hamming` distance) for copies of one
    picture re-encoded, resized or slightly brightened; about 32 bits apart for unrelated pictures.

    Gray, resized to 32 x 32, 2-D DCT; each bit says whether one of the 64 lowest AC coefficients is above their
    median. Comparing with the median (not zero) makes the bits balanced and a contrast change harmless.
    """
    grid = _gray_grid(path)
    c = _dct_matrix(HASH_GRID)
    coeffs = c @ grid @ c.T
    rows, cols = _low_frequencies(HASH_BITS)
    ac = np.round(coeffs[rows, cols], 6)  # rounding: a flat image's float noise must not become random bits
    bits = ac > np.median(ac)
    return int(sum(1 << i for i, b in enumerate(bits) if b))


def hamming(a: int, b: int) -> int:
    """Number of bits in which ``a`` and ``b`` differ."""
    return bin(int(a) ^ int(b)).count("1")  # (int.bit_count is Python 3.10+; the device install runs 3.8)


def _bands(max_distance: int) -> list[tuple[int, int]]:
    """``(shift, width)`` of ``max_distance + 1`` bands cutting the 64 bits into near-equal contiguous pieces.

    Pigeonhole: two hashes differing in at most d bits cannot have a differing bit in each of d + 1 disjoint
    bands, so they agree exactly on at least one band. Bucketing by each band's value therefore finds every pair
    within d, while comparing only hashes that share a bucket. For d >= 64 every pair qualifies and there are not
    d + 1 bits to cut, so one band of width 0 puts everything in one bucket: a brute-force search.
    """
    count = max_distance + 1
    if count > HASH_BITS:
        return [(0, 0)]
    base, extra = divmod(HASH_BITS, count)
    bands, shift = [], 0
    for i in range(count):
        width = base + (1 if i < extra else 0)
        bands.append((shift, width))
        shift += width
    return bands


def find_near_pairs(hashes: Sequence[int], max_distance: int, chunk: int = 1024) -> list[tuple[int, int, int]]:
    """Every ``(i, j, distance)`` with ``i < j`` and ``hamming(hashes[i], hashes[j]) <= max_distance``, sorted.

    Banded bucketing (see :func:`_bands`) keeps this near-linear for distinct hashes: 10,000 random hashes at
    distance 4 give 5 bands of 13 bits, ~1.2 hashes a bucket. Buckets are compared with numpy, in row chunks so a
    huge bucket (many blank images) stays within memory.
    """
    if max_distance < 0:
        raise TledgeError(f"near-duplicate distance must be at least 0, got {max_distance}")
    h = np.asarray([int(x) for x in hashes], dtype=np.uint64)
    n = len(h)
    if n < 2:
        return []
    found = []  # encoded i * n + j; a pair agreeing on several bands is found several times, hence np.unique
    for shift, width in _bands(max_distance):
        keys = (h >> np.uint64(shift)) & np.uint64((1 << width) - 1)
        order = np.argsort(keys, kind="stable")  # stable: indices ascend inside a bucket, so row < col means i < j
        sorted_keys = keys[order]
        starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
        ends = np.r_[starts[1:], n]
        for s, e in zip(starts[ends - starts > 1], ends[ends - starts > 1]):
            idx = order[s:e]
            vals = h[idx]
            for r0 in range(0, len(idx), chunk):
                dist = np.bitwise_count(vals[r0 : r0 + chunk, None] ^ vals[None, :])
                rows, cols = np.nonzero(dist <= max_distance)
                rows = rows + r0
                upper = rows < cols
                found.append(idx[rows[upper]].astype(np.int64) * n + idx[cols[upper]])
    if not found:
        return []
    codes = np.unique(np.concatenate(found))
    return [(int(c // n), int(c % n), hamming(int(h[c // n]), int(h[c % n]))) for c in codes]
