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
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

from tledge.errors import TledgeError
from tledge.monitor.embedding import embedding_reference, mahalanobis
from tledge.monitor.histogram import histogram, sig_list
from tledge.monitor.projection import PROJECTION_METHOD, fingerprint, projection_matrix

REFERENCE_FORMAT = "tledge.monitor-reference/1"
DEFAULT_BINS = 10
MIN_REFERENCE_IMAGES = 20
_FINGERPRINT_TOL = 1e-4  # relative; the fingerprint is rounded to 6 digits, platform differences are ~1e-15

InputsLike = Union[np.ndarray, Mapping[str, np.ndarray]]


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
        out = {"channel_mean": mean, "channel_std": std}
        if "sharpness" in inputs:
            out["sharpness"] = _finite_array(inputs["sharpness"], "inputs['sharpness']", 1)
        return out
    arr = np.asarray(inputs)
    if arr.ndim != 4:
        raise TledgeError(f"inputs must be (N, C, H, W) model inputs or a channel_mean/channel_std mapping, "
                          f"got shape {arr.shape}")
    if arr.shape[2] * arr.shape[3] == 0 and arr.shape[0]:
        raise TledgeError(f"inputs have no pixels (shape {arr.shape})")
    if not np.issubdtype(arr.dtype, np.number) or not np.all(np.isfinite(arr)):
        raise TledgeError("inputs hold NaN, infinite or non-numeric values: check the preprocessing")
    # float64 accumulation: a float32 sum over 50k pixels loses the digits the histograms are cut at.
    mean, std = arr.mean(axis=(2, 3), dtype=np.float64), arr.std(axis=(2, 3), dtype=np.float64)
    return {"channel_mean": mean, "channel_std": std, "sharpness": _sharpness(arr, std)}


def _sharpness(arr: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Per image, the mean absolute step between neighbouring pixels over the image's own spread: blur and defocus
    lower it a lot while they barely move the global contrast (an image's spread is mostly its low frequencies)."""
    steps = (np.abs(np.diff(arr, axis=3)).mean(axis=(1, 2, 3), dtype=np.float64)
             + np.abs(np.diff(arr, axis=2)).mean(axis=(1, 2, 3), dtype=np.float64)) / 2
    spread = np.sqrt((std ** 2).mean(axis=1))
    return steps / np.maximum(spread, 1e-6)


def _input_signals(stats: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    mean, std = stats["channel_mean"], stats["channel_std"]
    return {
        "channel_mean": mean,
        "channel_std": std,
        "brightness": mean.mean(axis=1),
        # Within-channel spread only: an image with a colour cast but the same texture keeps its contrast.
        "contrast": np.sqrt((std ** 2).mean(axis=1)),
        **({"sharpness": stats["sharpness"]} if "sharpness" in stats else {}),
    }


def _logit_signals(logits: np.ndarray) -> Dict[str, np.ndarray]:
    # The top-1 softmax probability is 1 / sum(exp(l - max)): no overflow, no full softmax needed.
    shifted = logits - logits.max(axis=1, keepdims=True)
    return {"confidence": 1.0 / np.exp(shifted).sum(axis=1), "predicted": logits.argmax(axis=1)}


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
    meta: Optional[Mapping[str, Any]] = None,
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
        ref["input"] = {"channels": int(mean.size), "channel_mean": sig_list(mean), "channel_std": sig_list(np.sqrt(var))}
        hists["brightness"] = histogram(sig["brightness"], bins)
        hists["contrast"] = histogram(sig["contrast"], bins)
        if "sharpness" in sig:
            hists["sharpness"] = histogram(sig["sharpness"], bins)
        for c in range(mean.size):
            hists[f"channel_mean_{c}"] = histogram(sig["channel_mean"][:, c], bins)
    if lg is not None:
        if lg.shape[1] != len(classes):
            raise TledgeError(f"logits have {lg.shape[1]} columns but there are {len(classes)} classes")
        sig = _logit_signals(lg)
        hists["confidence"] = histogram(sig["confidence"], bins)
        ref["class_mix"] = {"counts": [int(c) for c in np.bincount(sig["predicted"], minlength=len(classes))]}
    ref["histograms"] = hists
    ref["embedding"] = embedding_reference(emb, projection_dim, seed, bins) if emb is not None else None
    # The size note counts itself, so settle it by iterating (two rounds at most: the digit count stabilises).
    ref.update(meta or {})  # what the caller records beside it (the model, the split), counted in the size below
    ref["reference_size_bytes"] = 0
    for _ in range(4):
        size = _json_size(ref)
        if size == ref["reference_size_bytes"]:
            break
        ref["reference_size_bytes"] = size
    return ref


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
    got = fingerprint(q)
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
        out["distance"] = mahalanobis(z, np.asarray(part["mean"]), np.asarray(part["covariance"]))
    if lg is not None:
        if lg.shape[1] != len(ref["classes"]):
            raise TledgeError(f"logits have {lg.shape[1]} columns, the reference has {len(ref['classes'])} classes")
        out.update(_logit_signals(lg))
    return out
