"""Int16 saturation in x86 int8 kernels without VNNI: where it can happen, and int8 weights that cannot cause it.

ONNX Runtime's AVX2 / AVX-512BW u8s8 GEMM (MLAS) reduces over K with ``vpmaddubsw``: for each output channel it
multiplies the uint8 activations ``a[k]`` by the int8 weights ``w[k]`` and adds the products of each pair
``(k, k+1)``, k even, into a saturating int16. Activations reach 255, so a pair whose weights have the same sign
and ``|w[k]| + |w[k+1]| >= 129`` can exceed 32767 (255 * 129 = 32895) and is clipped; a pair of opposite signs
or with ``|w[k]| + |w[k+1]| <= 128`` cannot (255 * 128 = 32640).

K runs in the order of ONNX Runtime's NHWC im2col: kernel tap major, input channel minor (``K = tap * Cin + c``),
so the pairs are neighbouring input channels at one tap (and cross taps when ``Cin`` is odd). Gemm pairs
neighbouring input features. Depthwise convolutions use a kernel without the int16 step. Measured with
onnxruntime 1.32 on an AVX2 CPU by placing two weights of 127 at every pair of positions (a probe kept in
tests/test_saturation.py); the test that compares the fused kernels with the simulation on every machine is what
would catch a change of layout in a later onnxruntime.
"""

from __future__ import annotations

import numpy as np

PAIR_LIMIT = 128  # largest |w[k]| + |w[k+1]| of a same-sign pair that cannot saturate int16 with activations <= 255
INT8_MAX = 127
NARROWEST = PAIR_LIMIT // 2  # at 64 levels a side no pair can exceed the limit


def gemm_rows(op_type: str, weight: np.ndarray, group: int = 1, trans_b: bool = False) -> np.ndarray | None:
    """The weights as ``(output channels, K)`` in the order the u8s8 GEMM reduces over K.

    None for an op whose int8 kernel has no int16 pair step (depthwise convolution).
    """
    if op_type == "Conv":
        out_channels, channels_per_group = weight.shape[:2]
        if channels_per_group == 1 and group == out_channels and group > 1:
            return None  # depthwise: its own kernel, exact int32 arithmetic
        # (Cout, Cg, kh, kw) -> (Cout, kh, kw, Cg): tap major, input channel minor.
        return np.ascontiguousarray(np.moveaxis(weight, 1, -1)).reshape(out_channels, -1)
    if op_type == "Gemm":
        return weight if trans_b else weight.T  # rows: output features, K: input features
    if op_type == "MatMul":
        return weight.T
    raise ValueError(f"no u8s8 GEMM layout known for {op_type}")


def from_gemm_rows(op_type: str, rows: np.ndarray, shape: tuple[int, ...], trans_b: bool = False) -> np.ndarray:
    """The inverse of :func:`gemm_rows`: rows back to the weight's own layout ``shape``."""
    if op_type == "Conv":
        out_channels, channels_per_group, kh, kw = shape
        return np.ascontiguousarray(np.moveaxis(rows.reshape(out_channels, kh, kw, channels_per_group), -1, 1))
    if op_type == "Gemm" and trans_b:
        return rows.reshape(shape)
    return np.ascontiguousarray(rows.T).reshape(shape)


def _pairs(rows: np.ndarray) -> np.ndarray:
    """``(C, K)`` -> ``(C, ceil(K/2), 2)``, padding an odd K with a zero weight (as the kernel's packing does)."""
    if rows.shape[1] % 2:
        rows = np.concatenate([rows, np.zeros((rows.shape[0], 1), rows.dtype)], axis=1)
    return rows.reshape(rows.shape[0], -1, 2)


def saturating_pairs(q_rows: np.ndarray) -> np.ndarray:
    """Boolean ``(C, K/2)``: which int8 weight pairs can saturate an int16 accumulator with uint8 activations."""
    p = _pairs(np.asarray(q_rows, dtype=np.int32))
    same_sign = (p[..., 0] * p[..., 1]) > 0
    return same_sign & (np.abs(p).sum(-1) > PAIR_LIMIT)


def saturating_channels(q_rows: np.ndarray) -> np.ndarray:
    """Boolean ``(C,)``: output channels with at least one pair that can saturate."""
    return saturating_pairs(q_rows).any(axis=1)


def quantize_pair_safe(w_rows: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Symmetric int8 weights ``round(w / scale)`` with every saturating pair moved onto the limit.

    A pair of the same sign whose magnitudes add up to more than 128 is replaced by the closest pair (in the
    real-valued weights) whose magnitudes add up to exactly 128: each weight gives up half the excess.
    """
    real = w_rows / scale[:, None]
    q = np.clip(np.rint(real), -INT8_MAX, INT8_MAX)
    bad = saturating_pairs(q)
    if not bad.any():
        return q.astype(np.int8)
    qp, rp = _pairs(q), _pairs(real)
    ra, rb = np.abs(rp[..., 0]), np.abs(rp[..., 1])
    excess = np.maximum(ra + rb - PAIR_LIMIT, 0.0)
    a = np.clip(np.rint(ra - excess / 2), PAIR_LIMIT - INT8_MAX, INT8_MAX)  # both stay within +-127
    b = PAIR_LIMIT - a
    sign = np.sign(qp[..., 0])
    qp[..., 0] = np.where(bad, sign * a, qp[..., 0])
    qp[..., 1] = np.where(bad, sign * b, qp[..., 1])
    return qp.reshape(q.shape[0], -1)[:, : q.shape[1]].astype(np.int8)


def pair_safe_scales(w_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel scales for weights that cannot saturate, chosen for the least weight error; and the level used.

    A channel whose full-range (127 levels) weights have no saturating pair keeps them. For the others every
    range from 127 down to 64 levels is tried, with the remaining saturating pairs moved onto the limit
    (:func:`quantize_pair_safe`), and the one with the smallest squared error to the float weights wins. At 64
    levels no pair can saturate, so the result is never worse than ONNX Runtime's ``reduce_range`` for a channel.
    """
    w_rows = np.asarray(w_rows, dtype=np.float64)
    absmax = np.abs(w_rows).max(axis=1)
    absmax = np.where(absmax > 0, absmax, 1.0)
    levels = np.full(w_rows.shape[0], INT8_MAX)
    full = np.clip(np.rint(w_rows * (INT8_MAX / absmax)[:, None]), -INT8_MAX, INT8_MAX)
    todo = np.flatnonzero(saturating_channels(full))
    if todo.size:
        w, m = w_rows[todo], absmax[todo]
        best_err = np.full(todo.size, np.inf)
        best_levels = np.full(todo.size, NARROWEST)
        for lv in range(INT8_MAX, NARROWEST - 1, -1):
            scale = m / lv
            q = quantize_pair_safe(w, scale).astype(np.float64)
            err = ((q * scale[:, None] - w) ** 2).sum(axis=1)
            better = err < best_err
            best_err[better], best_levels[better] = err[better], lv
        levels[todo] = best_levels
    return (absmax / levels).astype(np.float32), levels
