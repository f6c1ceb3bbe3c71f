"""Calibrate once: run the calibration images through the FP32 model one time and keep per-tensor statistics.

:func:`calibrate` streams the images in chunks and keeps, for every float activation tensor, its exact minimum
and maximum, a signed histogram of fixed size and the per-channel means of convolution inputs. Memory is bounded
by the histogram size (``BINS`` counts per tensor) whatever the number of images: a histogram whose range must
grow doubles it by merging neighbouring bins, which is exact. The statistics are saved to
``calibration.stats.npz`` in the build folder (plain arrays, loaded without pickle) and keyed by the model's and
the calibration images' hashes, so a later ``quantize`` with another method reuses them without running the
model again.

Every calibration method is a choice of range over those statistics (:meth:`CalibrationStats.ranges`):

* ``minmax``: the extremes seen;
* ``percentile``: 99.999% of the values inside (two-sided for asymmetric ranges, of |x| for symmetric ones);
* ``entropy``: the |x| threshold whose 128-level quantized distribution has the least KL divergence from the
  observed one (TensorRT's entropy calibrator);
* ``mse``: the range, scaled down from the extremes, with the least expected squared error (rounding inside,
  clipping outside) for the int8 grid it will use.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tledge.errors import TledgeError

STATS_FILE = "calibration.stats.npz"
FORMAT = 1
BINS = 8192  # signed bins over [-bound, bound]; |x| has at least 2048 of them below its maximum
METHODS = ("minmax", "percentile", "entropy", "mse")
PERCENTILE = 99.999
CHUNK_BYTES = 256 << 20  # intermediate tensors held at once while streaming


@dataclass
class CalibrationStats:
    """Per-tensor statistics of one model over one calibration set (see the module docstring)."""

    names: list[str]
    lo: np.ndarray  # exact minimum per tensor
    hi: np.ndarray  # exact maximum per tensor
    bound: np.ndarray  # the histogram of tensor i covers [-bound[i], bound[i]] in BINS equal bins
    hist: np.ndarray  # (tensors, BINS) counts
    channel_mean: dict[str, np.ndarray] = field(default_factory=dict)  # per-channel means of Conv/Gemm inputs
    key: dict = field(default_factory=dict)  # what the statistics were computed from
    # A Conv output read only by its ReLU/ReLU6 takes that activation's range: quantizing it to the activation's
    # range is the activation (quantizers fuse them so), and it saves a histogram of the largest tensors.
    alias: dict[str, str] = field(default_factory=dict)

    def ranges(self, method: str, symmetric: bool) -> dict[str, tuple[float, float]]:
        """``{tensor: (low, high)}`` for ``method``; ``symmetric`` for int8 activations centred on zero (TensorRT),
        else for uint8 activations with a zero point (ONNX Runtime on CPUs)."""
        if method not in METHODS:
            raise TledgeError(f"calibration method must be one of {METHODS}, got {method!r}")
        choose = {"minmax": _minmax, "percentile": _percentile, "entropy": _entropy, "mse": _mse}[method]
        out = {}
        for i, name in enumerate(self.names):
            lo, hi = choose(float(self.lo[i]), float(self.hi[i]), float(self.bound[i]), self.hist[i], symmetric)
            if symmetric:
                amax = max(abs(lo), abs(hi))
                lo, hi = -amax, amax
            out[name] = (float(lo), float(hi))
        out.update({name: out[target] for name, target in self.alias.items()})
        return out

    def save(self, path: Path) -> Path:
        from tledge.artifacts import atomic_path

        arrays = {"names": np.array(self.names, dtype=str), "lo": self.lo, "hi": self.hi, "bound": self.bound, "hist": self.hist,
                  "key": np.array(json.dumps({"format": FORMAT, "bins": BINS, **self.key}))}
        mean_names = sorted(self.channel_mean)
        arrays["mean_names"] = np.array(mean_names, dtype=str)
        arrays["alias"] = np.array(sorted(self.alias.items()), dtype=str).reshape(-1, 2)
        arrays.update({f"mean_{i}": self.channel_mean[n] for i, n in enumerate(mean_names)})
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to the temporary name
                np.savez_compressed(f, **arrays)
        return path

    @classmethod
    def load(cls, path: Path) -> "CalibrationStats":
        try:
            with np.load(path, allow_pickle=False) as z:
                key = json.loads(str(z["key"]))
                means = {str(n): z[f"mean_{i}"] for i, n in enumerate(z["mean_names"])}
                alias = {str(a): str(b) for a, b in z["alias"]}
                stats = cls([str(n) for n in z["names"]], z["lo"], z["hi"], z["bound"], z["hist"], means, key, alias)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:  # a truncated file is a bad zip
            raise TledgeError(f"{path} is not a tledge calibration statistics file ({type(exc).__name__}: {exc})") from None
        if key.get("format") != FORMAT or key.get("bins") != BINS or stats.hist.shape != (len(stats.names), BINS):
            raise TledgeError(f"{path} was written by another tledge version; delete it and calibrate again")
        return stats


def calibration_key(model: Path, image_hashes: list[str]) -> dict:
    """What statistics depend on: the model's bytes and the calibration images (by content, in any order)."""
    images = hashlib.sha256("\n".join(sorted(image_hashes)).encode()).hexdigest()
    return {"model_sha256": hashlib.sha256(Path(model).read_bytes()).hexdigest(), "images_sha256": images, "images": len(image_hashes)}


def calibrate(model: Path, x: np.ndarray, key: dict, stats_path: Path | None = None) -> tuple[CalibrationStats, bool]:
    """Statistics of ``model`` over the preprocessed calibration images ``x``; ``(stats, reused)``.

    With ``stats_path``, a file there computed from the same model and images is reused, and fresh statistics are
    saved there (atomically).
    """
    if stats_path is not None and stats_path.is_file():
        try:
            stats = CalibrationStats.load(stats_path)
        except TledgeError:
            stats = None  # stale or foreign: recompute and replace it
        if stats is not None and all(stats.key.get(k) == v for k, v in key.items()):
            return stats, True
    stats = _collect(model, x)
    stats.key = dict(key)
    if stats_path is not None:
        stats.save(stats_path)
    return stats, False


class _Collector:
    """Running statistics of one tensor."""

    __slots__ = ("lo", "hi", "bound", "hist", "channel_sum", "channel_count")

    def __init__(self, channel_mean: bool):
        self.lo, self.hi, self.bound = np.inf, -np.inf, 0.0
        self.hist = np.zeros(BINS, dtype=np.int64)
        self.channel_sum = 0.0 if channel_mean else None
        self.channel_count = 0

    def update(self, a: np.ndarray) -> None:
        lo, hi = float(a.min()), float(a.max())
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise TledgeError("the FP32 model produced non-finite activations on a calibration image; check the model and the images")
        self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)
        peak = max(abs(lo), abs(hi))
        if self.bound == 0.0:
            self.bound = peak if peak > 0 else 1e-30
        while peak > self.bound:  # double the range: bin i of [-b, b] lands in bin BINS/4 + i//2 of [-2b, 2b]
            merged = self.hist.reshape(BINS // 2, 2).sum(axis=1)
            self.hist[:] = 0
            self.hist[BINS // 4 : 3 * BINS // 4] = merged
            self.bound *= 2
        # Bin index floor((x + bound) * BINS / (2 bound)), never negative; the scale is a hair under BINS / (2 bound)
        # so that x == bound lands in the last bin without a clipping pass (bin edges move by < 3e-6 of a bin).
        scaled = np.multiply(a.ravel(), np.float32((BINS / 2 - 0.01) / self.bound), dtype=np.float32)
        scaled += np.float32(BINS / 2)
        self.hist += np.bincount(scaled.astype(np.intp), minlength=BINS)
        if self.channel_sum is not None and a.ndim >= 2:
            axes = tuple(i for i in range(a.ndim) if i != 1)
            self.channel_sum = self.channel_sum + a.sum(axis=axes, dtype=np.float64)
            self.channel_count += a.size // a.shape[1]


def _collect(model: Path, x: np.ndarray) -> CalibrationStats:
    import os
    from concurrent.futures import ThreadPoolExecutor

    import onnx

    from tledge.runners.ort_runner import OrtRunner

    if len(x) == 0:
        raise TledgeError("calibration needs at least one image")
    proto = onnx.load(str(model))
    graph = proto.graph
    inits = {i.name for i in graph.initializer}
    input_name = graph.input[0].name
    graph_outputs = {o.name for o in graph.output}
    # Every float activation: the input and every node output (quantize_static wants a range for each).
    names = list(dict.fromkeys([input_name] + [o for n in graph.node if n.op_type != "Constant" for o in n.output if o and o not in inits]))
    consumers: dict[str, list] = {}
    for node in graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    producer = {o: n for n in graph.node for o in n.output}
    alias = {}
    for name in names:
        readers = consumers.get(name, [])
        if (name not in graph_outputs and len(readers) == 1 and readers[0].op_type in ("Relu", "Clip")
                and name in producer and producer[name].op_type in ("Conv", "Gemm")):
            alias[name] = readers[0].output[0]
    names = [n for n in names if n not in alias]
    for name in names[1:]:
        if name not in graph_outputs:
            graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    wants_mean = {n.input[0] for n in graph.node if n.op_type in ("Conv", "Gemm")}
    runner = OrtRunner(proto)
    outputs = [o.name for o in runner.session.get_outputs()]
    collectors = {n: _Collector(n in wants_mean) for n in names}
    first = runner.session.run(outputs, {input_name: np.ascontiguousarray(x[:1], dtype=np.float32)})
    per_image = sum(a.nbytes for a in first)
    chunk = int(max(1, min(64, CHUNK_BYTES // max(per_image, 1))))
    # numpy releases the GIL in the histogram passes: the tensors of one chunk are counted on every core.
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))) as pool:
        for start in range(0, len(x), chunk):
            batch = np.ascontiguousarray(x[start : start + chunk], dtype=np.float32)
            values = dict(zip(outputs, runner.session.run(outputs, {input_name: batch})))
            values[input_name] = batch
            list(pool.map(lambda name, values=values: collectors[name].update(values[name]), names))
            del values
    return CalibrationStats(
        names=names,
        lo=np.array([collectors[n].lo for n in names]),
        hi=np.array([collectors[n].hi for n in names]),
        bound=np.array([collectors[n].bound for n in names]),
        hist=np.stack([collectors[n].hist for n in names]),
        channel_mean={n: (c.channel_sum / max(c.channel_count, 1)).astype(np.float32) for n, c in collectors.items()
                      if c.channel_sum is not None and np.ndim(c.channel_sum) == 1},
        alias=alias,
    )


# ---- methods: each picks (low, high) from one tensor's statistics ----

def _centers(bound: float) -> np.ndarray:
    width = 2 * bound / BINS
    return -bound + width * (np.arange(BINS) + 0.5)


def _abs_hist(hist: np.ndarray) -> np.ndarray:
    """Counts of |x| in BINS/2 bins over [0, bound]."""
    half = BINS // 2
    return hist[half:] + hist[:half][::-1]


def _minmax(lo, hi, bound, hist, symmetric):
    return lo, hi


def _percentile(lo, hi, bound, hist, symmetric, p: float = PERCENTILE):
    total = hist.sum()
    if total == 0:
        return lo, hi
    width = 2 * bound / BINS
    if symmetric:
        cdf = np.cumsum(_abs_hist(hist)) / total
        t = (np.searchsorted(cdf, p / 100) + 1) * width
        amax = max(abs(lo), abs(hi))
        return -min(t, amax), min(t, amax)
    cut = (100 - p) / 200
    cdf = np.cumsum(hist) / total
    left = -bound + np.searchsorted(cdf, cut) * width
    right = -bound + (np.searchsorted(cdf, 1 - cut) + 1) * width
    return max(lo, left), min(hi, right)


def _entropy(lo, hi, bound, hist, symmetric, levels: int = 128, candidates: int = 256):
    """TensorRT's entropy calibration: the threshold (in bins of |x|) whose quantization to ``levels`` levels loses
    the least information (KL divergence), outliers folded into the last kept bin.

    As TensorRT's, the search runs over 2048 bins of |x| from ``levels`` bins up, and the bin at zero counts as its
    neighbour: after a ReLU most values are exactly zero, and that spike would otherwise make every short range
    look lossless (it clipped EfficientNet-Lite's ReLU6 outputs to 6% of their range).
    """
    h = _abs_hist(hist).astype(np.float64).reshape(-1, 2).sum(axis=1)  # 2048 bins over [0, bound]
    width = 2 * bound / len(h)
    h[0] = h[1]
    nonzero = np.flatnonzero(h)
    amax = max(abs(lo), abs(hi))
    if len(nonzero) == 0 or nonzero[-1] + 1 <= levels:
        return (-amax, amax) if symmetric else (lo, hi)
    last = nonzero[-1] + 1
    best, best_kl = last, np.inf
    for i in np.unique(np.linspace(levels, last, min(candidates, last - levels + 1)).astype(int)):
        p = h[:i].copy()
        p[-1] += h[i:].sum()
        edges = np.linspace(0, i, levels + 1).astype(int)
        sums = np.add.reduceat(h[:i], edges[:-1])
        mask = h[:i] > 0
        used = np.add.reduceat(mask.astype(np.float64), edges[:-1])
        group = np.repeat(np.arange(levels), np.diff(edges))
        q = np.where(mask, (sums / np.maximum(used, 1))[group], 0.0)
        keep = p > 0
        if not np.all(q[keep] > 0):  # a bin P has that Q lost: infinite divergence
            continue
        pn, qn = p[keep] / p.sum(), q[keep] / q.sum()
        kl = float(np.sum(pn * np.log(pn / qn)))
        if kl <= best_kl:  # ties go to the wider range
            best, best_kl = i, kl
    t = min(best * width, amax)
    return (-t, t) if symmetric else (max(lo, -t), min(hi, t))


def _mse(lo, hi, bound, hist, symmetric, steps: int = 100):
    """The range ``alpha * (lo, hi)`` (alpha in (0, 1]) with the least expected squared quantization error."""
    c = _centers(bound)
    h = hist.astype(np.float64)
    keep = h > 0
    c, h = c[keep], h[keep]
    if len(c) == 0:
        return lo, hi
    alphas = np.arange(1, steps + 1) / steps
    if symmetric:
        amax = max(abs(lo), abs(hi))
        los, his, levels = -alphas * amax, alphas * amax, 254
    else:
        los, his, levels = alphas * min(lo, 0.0), alphas * max(hi, 0.0), 255
    step = (his - los) / levels
    inside = step[:, None] ** 2 / 12
    below = (c[None, :] - los[:, None]) ** 2
    above = (c[None, :] - his[:, None]) ** 2
    err = np.where(c[None, :] < los[:, None], below, np.where(c[None, :] > his[:, None], above, inside))
    k = int(np.argmin(err @ h))
    if symmetric:
        return float(los[k]), float(his[k])
    return max(lo, float(los[k])), min(hi, float(his[k]))
