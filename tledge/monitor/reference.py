"""The reference a deployed model is watched against: what its validation split looked like, in a few KB of JSON.

A reference holds, for the validation images, the distribution of a handful of per-image quantities that are cheap
to compute on the device from what the caller already has (the preprocessed input tensor, the penultimate features
and the logits): per-image channel means, brightness (the mean of those) and contrast (the RMS of the per-channel
standard deviations, so a colour cast does not read as contrast), the top-1 softmax confidence, the predicted class
and, for the embeddings, the Mahalanobis distance of a low-dimensional projection from the validation cloud.

Each distribution is a histogram with its bin edges stored: the edges are the reference's own deciles, so every bin
expects about a tenth of the images and the outer bins are open (new values beyond the validation range land in
them instead of falling off). Only the interior edges are stored, which keeps the JSON free of infinities.

The embedding projection is a seeded Gaussian matrix, orthonormalised. Storing it would cost ``D x k`` numbers
(about 120 KB for a 1280-wide EfficientNet embedding), so the reference stores its recipe and a fingerprint
instead: the generator is integer arithmetic (SplitMix64) followed by Box-Muller, so any numpy on any machine
rebuilds the same matrix to rounding error, and :func:`signals` refuses a matrix whose fingerprint does not match.

Only numpy and the standard library: this runs on the device, beside ONNX Runtime, without torch.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

from tledge.errors import TledgeError

REFERENCE_FORMAT = "tledge.monitor-reference/1"
PROJECTION_METHOD = "gaussian-qr/splitmix64-box-muller"
DEFAULT_BINS = 10
MIN_REFERENCE_IMAGES = 20
DISTANCE_QUANTILES = {"p50": 0.5, "p90": 0.9, "p95": 0.95, "p99": 0.99}
# Reference distances are cross-fitted: an image measured against a cloud fitted with it reads closer than a new
# image would, and the new images are always out of sample, so in-sample distances would bias every comparison.
_CROSS_FIT_FOLDS = 5
_FINGERPRINT_TOL = 1e-4  # relative; the fingerprint is rounded to 6 digits, platform differences are ~1e-15

InputsLike = Union[np.ndarray, Mapping[str, np.ndarray]]


def _sig(x: float) -> float:
    """Round to 6 significant digits: the JSON stays small and its text stable across runs."""
    return float(f"{float(x):.6g}")


def _sig_list(values: Any) -> List[float]:
    return [_sig(v) for v in np.asarray(values, dtype=np.float64).ravel()]


def _finite_array(x: Any, name: str, ndim: int) -> np.ndarray:
    """An ``ndim``-D float64 array with no NaN or inf, or a TledgeError that says what is wrong with it."""
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TledgeError(f"{name} must be a numeric array ({exc})") from exc
    if arr.ndim != ndim:
        raise TledgeError(f"{name} must be {ndim}-D, got shape {arr.shape}")
    bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
    if bad:
        raise TledgeError(f"{name} holds {bad} NaN or infinite value(s): check the preprocessing and the model run")
    return arr


def image_stats(inputs: InputsLike) -> Dict[str, np.ndarray]:
    """Per-image channel means and standard deviations, ``{"channel_mean": (N, C), "channel_std": (N, C)}``.

    ``inputs`` is an (N, C, H, W) batch or such a mapping already (checked and passed through). A device that
    cannot hold all images at once computes this per batch and concatenates: every signal derives from it.
    """
    if isinstance(inputs, Mapping):
        missing = {"channel_mean", "channel_std"} - set(inputs)
        if missing:
            raise TledgeError(f"precomputed inputs need the keys channel_mean and channel_std; missing {sorted(missing)}")
        mean = _finite_array(inputs["channel_mean"], "inputs['channel_mean']", 2)
        std = _finite_array(inputs["channel_std"], "inputs['channel_std']", 2)
        if mean.shape != std.shape:
            raise TledgeError(f"channel_mean {mean.shape} and channel_std {std.shape} must have the same (N, C) shape")
        if np.any(std < 0):
            raise TledgeError("channel_std holds negative values: pass standard deviations, not something else")
        return {"channel_mean": mean, "channel_std": std}
    arr = np.asarray(inputs)
    if arr.ndim != 4:
        raise TledgeError(f"inputs must be (N, C, H, W) model inputs or a channel_mean/channel_std mapping, "
                          f"got shape {arr.shape}")
    if arr.shape[2] * arr.shape[3] == 0 and arr.shape[0]:
        raise TledgeError(f"inputs have no pixels (shape {arr.shape})")
    if not np.issubdtype(arr.dtype, np.number) or not np.all(np.isfinite(arr)):
        raise TledgeError("inputs hold NaN, infinite or non-numeric values: check the preprocessing")
    # float64 accumulation: a float32 sum over 50k pixels loses the digits the histograms are cut at.
    return {"channel_mean": arr.mean(axis=(2, 3), dtype=np.float64), "channel_std": arr.std(axis=(2, 3), dtype=np.float64)}


def _input_signals(stats: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    mean, std = stats["channel_mean"], stats["channel_std"]
    return {
        "channel_mean": mean,
        "channel_std": std,
        "brightness": mean.mean(axis=1),
        # Within-channel spread only: an image with a colour cast but the same texture keeps its contrast.
        "contrast": np.sqrt((std ** 2).mean(axis=1)),
    }


def _logit_signals(logits: np.ndarray) -> Dict[str, np.ndarray]:
    # The top-1 softmax probability is 1 / sum(exp(l - max)): no overflow, no full softmax needed.
    shifted = logits - logits.max(axis=1, keepdims=True)
    return {"confidence": 1.0 / np.exp(shifted).sum(axis=1), "predicted": logits.argmax(axis=1)}


def bin_counts(values: np.ndarray, edges: Sequence[float]) -> np.ndarray:
    """Counts of ``values`` in the ``len(edges) + 1`` bins cut at the interior ``edges`` (outer bins open)."""
    idx = np.searchsorted(np.asarray(edges, dtype=np.float64), np.asarray(values, dtype=np.float64), side="right")
    return np.bincount(idx, minlength=len(edges) + 1)


def _histogram(values: np.ndarray, bins: int) -> Dict[str, Any]:
    """Decile-cut histogram: every bin expects the same share, which is where PSI is most even-handed."""
    cuts = np.quantile(values, np.arange(1, bins) / bins)
    # Rounded first, then counted with the rounded edges, so the device bins exactly as the reference did;
    # ties (a saturated confidence, a constant channel) merge bins rather than leave empty ones.
    edges = sorted({_sig(c) for c in cuts})
    return {"edges": edges, "counts": [int(c) for c in bin_counts(values, edges)],
            "mean": _sig(values.mean()), "std": _sig(values.std())}


def _splitmix64(seed: int, count: int) -> np.ndarray:
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
    words = _splitmix64(int(seed), 2 * dim * k)
    u = (words >> np.uint64(11)).astype(np.float64) * 2.0 ** -53  # 53 random bits -> [0, 1)
    gauss = np.sqrt(-2.0 * np.log(1.0 - u[0::2])) * np.cos(2.0 * math.pi * u[1::2])  # Box-Muller; 1 - u is in (0, 1]
    q, r = np.linalg.qr(gauss.reshape(dim, k))
    # QR fixes each column only up to sign; making R's diagonal positive makes the result unique.
    return q * np.where(np.diag(r) < 0, -1.0, 1.0)


def _fingerprint(q: np.ndarray) -> np.ndarray:
    """Column sums, plain and position-weighted: a changed seed, generator or row order shows in both."""
    return np.concatenate([q.sum(axis=0), (np.arange(1, q.shape[0] + 1) / q.shape[0]) @ q])


def _fit_gaussian(z: np.ndarray) -> tuple:
    mean = z.mean(axis=0)
    cov = np.atleast_2d(np.cov(z, rowvar=False))
    # A whisker of ridge keeps the Cholesky factor defined when a projected direction is (nearly) constant.
    cov = cov + np.eye(len(mean)) * (1e-6 * max(float(np.trace(cov)) / len(mean), 1e-12))
    return mean, cov


def _mahalanobis(z: np.ndarray, mean: np.ndarray, cov: np.ndarray) -> np.ndarray:
    try:
        chol = np.linalg.cholesky(cov)
    except np.linalg.LinAlgError as exc:
        raise TledgeError("the reference's embedding covariance is not positive definite: rebuild the reference") from exc
    white = np.linalg.solve(chol, (z - mean).T)
    return np.sqrt((white ** 2).sum(axis=0))


def _count(parts: Mapping[str, Optional[int]]) -> int:
    """The one image count all given arrays share, or a TledgeError naming the ones that disagree."""
    given = {name: n for name, n in parts.items() if n is not None}
    if not given:
        raise TledgeError("no data: give inputs, embeddings or logits")
    if len(set(given.values())) > 1:
        raise TledgeError("the arrays disagree on the number of images: " + ", ".join(f"{k} {v}" for k, v in given.items()))
    return next(iter(given.values()))


def _check_classes(classes: Sequence[str]) -> List[str]:
    if isinstance(classes, str) or not classes or not all(isinstance(c, str) and c for c in classes):
        raise TledgeError(f"classes must be a non-empty list of class names, got {classes!r}")
    if len(set(classes)) != len(classes):
        raise TledgeError(f"classes hold duplicate names: {list(classes)}")
    return list(classes)


def _json_size(obj: Any) -> int:
    return len(json.dumps(obj, separators=(",", ":")).encode("utf-8"))


def build_reference(
    inputs: Optional[InputsLike],
    embeddings: Optional[np.ndarray],
    logits: Optional[np.ndarray],
    classes: Sequence[str],
    *,
    projection_dim: int = 8,
    seed: int = 0,
    bins: int = DEFAULT_BINS,
) -> Dict[str, Any]:
    """The monitoring reference of a validation split, JSON-ready (see the module docstring for what is in it).

    ``inputs``: (N, C, H, W) preprocessed model inputs or :func:`image_stats` of them; ``embeddings``: (N, D)
    penultimate features or None; ``logits``: (N, K) with K = len(classes). Any of the three may be None, but
    whatever the device will be compared on must be here.
    """
    classes = _check_classes(classes)
    if isinstance(bins, bool) or not isinstance(bins, int) or not 2 <= bins <= 50:
        raise TledgeError(f"bins must be an integer in [2, 50], got {bins!r}")
    stats = image_stats(inputs) if inputs is not None else None
    emb = _finite_array(embeddings, "embeddings", 2) if embeddings is not None else None
    lg = _finite_array(logits, "logits", 2) if logits is not None else None
    n = _count({"inputs": None if stats is None else len(stats["channel_mean"]),
                "embeddings": None if emb is None else len(emb), "logits": None if lg is None else len(lg)})
    if n < max(MIN_REFERENCE_IMAGES, bins):
        raise TledgeError(f"a reference needs at least {max(MIN_REFERENCE_IMAGES, bins)} images, got {n}")

    ref: Dict[str, Any] = {"format": REFERENCE_FORMAT, "images": n, "classes": classes, "bins": bins}
    hists: Dict[str, Any] = {}
    if stats is not None:
        sig = _input_signals(stats)
        mean = sig["channel_mean"].mean(axis=0)
        # Pooled over all pixels (each image has as many): E[x^2] - E[x]^2 from the per-image moments.
        var = np.maximum((sig["channel_std"] ** 2 + sig["channel_mean"] ** 2).mean(axis=0) - mean ** 2, 0.0)
        ref["input"] = {"channels": int(mean.size), "channel_mean": _sig_list(mean), "channel_std": _sig_list(np.sqrt(var))}
        hists["brightness"] = _histogram(sig["brightness"], bins)
        hists["contrast"] = _histogram(sig["contrast"], bins)
        for c in range(mean.size):
            hists[f"channel_mean_{c}"] = _histogram(sig["channel_mean"][:, c], bins)
    if lg is not None:
        if lg.shape[1] != len(classes):
            raise TledgeError(f"logits have {lg.shape[1]} columns but there are {len(classes)} classes")
        sig = _logit_signals(lg)
        hists["confidence"] = _histogram(sig["confidence"], bins)
        ref["class_mix"] = {"counts": [int(c) for c in np.bincount(sig["predicted"], minlength=len(classes))]}
    ref["histograms"] = hists
    ref["embedding"] = _embedding_reference(emb, projection_dim, seed, bins) if emb is not None else None
    # The size note counts itself, so settle it by iterating (two rounds at most: the digit count stabilises).
    ref["reference_size_bytes"] = 0
    for _ in range(4):
        size = _json_size(ref)
        if size == ref["reference_size_bytes"]:
            break
        ref["reference_size_bytes"] = size
    return ref


def _embedding_reference(emb: np.ndarray, projection_dim: int, seed: int, bins: int) -> Dict[str, Any]:
    n, dim = emb.shape
    if isinstance(projection_dim, bool) or not isinstance(projection_dim, int) or projection_dim < 1:
        raise TledgeError(f"projection_dim must be a positive integer, got {projection_dim!r}")
    k = min(projection_dim, dim)
    # Each cross-fit fold fits a k-D covariance on 4/5 of the images: ask for a few images per parameter.
    if n < 4 * (k + 2):
        raise TledgeError(f"{n} images are too few for a {k}-D embedding reference: need {4 * (k + 2)}, or lower projection_dim")
    q = projection_matrix(seed, dim, k)
    z = emb @ q
    mean, cov = _fit_gaussian(z)
    dist = np.empty(n)
    folds = np.arange(n) % _CROSS_FIT_FOLDS  # interleaved: a split sorted by class still spreads over the folds
    for f in range(_CROSS_FIT_FOLDS):
        fm, fc = _fit_gaussian(z[folds != f])
        dist[folds == f] = _mahalanobis(z[folds == f], fm, fc)
    hist = _histogram(dist, bins)
    hist["quantiles"] = {key: _sig(np.quantile(dist, p)) for key, p in DISTANCE_QUANTILES.items()}
    return {
        "dim": int(dim),
        "projection": {"method": PROJECTION_METHOD, "seed": int(seed), "shape": [int(dim), int(k)],
                       "fingerprint": _sig_list(_fingerprint(q))},
        "mean": _sig_list(mean),
        "covariance": [_sig_list(row) for row in cov],
        "distance": hist,
    }


def check_reference(reference: Any) -> Dict[str, Any]:
    """The reference itself if it is one this code reads (a dict, or a path to its JSON), else a TledgeError."""
    if isinstance(reference, (str, os.PathLike)):
        return load_reference(reference)
    if not isinstance(reference, Mapping):
        raise TledgeError(f"a monitor reference is a dict or the path of its JSON, got {type(reference).__name__}")
    if reference.get("format") != REFERENCE_FORMAT:
        raise TledgeError(f"not a monitor reference of format {REFERENCE_FORMAT} (format {reference.get('format')!r}): "
                          "build it with tledge.monitor.build_reference")
    for key in ("images", "classes", "histograms"):
        if key not in reference:
            raise TledgeError(f"the monitor reference has no {key!r}: it is truncated or hand-edited; rebuild it")
    return dict(reference)


def save_reference(reference: Mapping[str, Any], path: Union[str, os.PathLike]) -> Path:
    """Write the reference as compact JSON (the form ``reference_size_bytes`` measures)."""
    from tledge.artifacts import write_text  # atomic: a crash never leaves half a reference in a bundle

    ref = check_reference(reference)
    return write_text(Path(path), json.dumps(ref, separators=(",", ":")))


def load_reference(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """Read and check a reference written by :func:`save_reference` (or any JSON dump of one)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise TledgeError(f"no monitor reference at {path}") from exc
    except (OSError, ValueError) as exc:
        raise TledgeError(f"cannot read the monitor reference {path}: {exc}") from exc
    return check_reference(data)


def _projection_of(reference: Mapping[str, Any]) -> np.ndarray:
    """Rebuild the reference's projection and prove it is the same one (the fingerprint) before using it."""
    spec = reference["embedding"]["projection"]
    if spec.get("method") != PROJECTION_METHOD:
        raise TledgeError(f"the reference projects embeddings with {spec.get('method')!r}; this code knows {PROJECTION_METHOD}")
    dim, k = spec["shape"]
    q = projection_matrix(spec["seed"], dim, k)
    want = np.asarray(spec["fingerprint"], dtype=np.float64)
    got = _fingerprint(q)
    if want.shape != got.shape or not np.allclose(got, want, rtol=_FINGERPRINT_TOL, atol=1e-6):
        raise TledgeError("the embedding projection rebuilt here does not match the reference's fingerprint "
                          "(a different seed, shape or generator): rebuild the reference with this version")
    return q


def signals(
    inputs: Optional[InputsLike],
    embeddings: Optional[np.ndarray],
    logits: Optional[np.ndarray],
    reference: Mapping[str, Any],
) -> Dict[str, np.ndarray]:
    """Per-image quantities of new data, measured as the reference measured its own.

    Returns arrays for what was given: ``channel_mean``/``channel_std`` (N, C), ``brightness``, ``contrast``
    (inputs); ``distance`` (embeddings: Mahalanobis distance in the reference's projection); ``confidence``,
    ``predicted`` (logits). Shapes are checked against the reference.
    """
    ref = check_reference(reference)
    stats = image_stats(inputs) if inputs is not None else None
    emb = _finite_array(embeddings, "embeddings", 2) if embeddings is not None else None
    lg = _finite_array(logits, "logits", 2) if logits is not None else None
    n = _count({"inputs": None if stats is None else len(stats["channel_mean"]),
                "embeddings": None if emb is None else len(emb), "logits": None if lg is None else len(lg)})
    if n == 0:
        raise TledgeError("no images: the arrays are empty")
    out: Dict[str, np.ndarray] = {}
    if stats is not None:
        if ref.get("input") is None:
            raise TledgeError("the reference was built without inputs: it cannot judge input statistics")
        channels = ref["input"]["channels"]
        if stats["channel_mean"].shape[1] != channels:
            raise TledgeError(f"inputs have {stats['channel_mean'].shape[1]} channels, the reference {channels}")
        out.update(_input_signals(stats))
    if emb is not None:
        if ref.get("embedding") is None:
            raise TledgeError("the reference was built without embeddings: it cannot judge them")
        part = ref["embedding"]
        if emb.shape[1] != part["dim"]:
            raise TledgeError(f"embeddings are {emb.shape[1]}-D, the reference's are {part['dim']}-D (another model?)")
        z = emb @ _projection_of(ref)
        out["distance"] = _mahalanobis(z, np.asarray(part["mean"]), np.asarray(part["covariance"]))
    if lg is not None:
        if lg.shape[1] != len(ref["classes"]):
            raise TledgeError(f"logits have {lg.shape[1]} columns, the reference has {len(ref['classes'])} classes")
        out.update(_logit_signals(lg))
    return out
