"""The artifacts of a build by name, writing them so that a crash never leaves a half-written file, and
describing them by hash.

``ARTIFACTS`` is the one place that names what each stage writes. Every stage's record (``<stage>.json``) lists
the artifacts it wrote under ``"artifacts"``; ``bundle`` signs exactly those, so a leftover from an earlier run is
never vouched for.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

FORMATS = {"report": "tledge.report/1", "manifest": "tledge.manifest/2", "stage": "tledge.stage/1"}

# name -> (stage that writes it, what it is)
ARTIFACTS: dict[str, tuple[str, str]] = {
    "splits.json": ("finetune", "train/val/test file lists with sha256 (every later stage checks the dataset against it)"),
    "model.pt": ("finetune", "checkpoint (PyTorch, plain tensors; loads with weights_only=True)"),
    "finetune.json": ("finetune", "stage record"),
    "model.fp32.onnx": ("export", "onnx-fp32"),
    "export.json": ("export", "stage record"),
    "model.int8.qdq.onnx": ("quantize", "onnx-int8-qdq (TensorRT explicit quantization)"),
    "model.int8.cpu.onnx": ("quantize", "onnx-int8 (ONNX Runtime CPU, U8S8; see cpu_target for the CPUs it is right on)"),
    "calibration.json": ("quantize", "calibration set (image list with sha256)"),
    "calibration.cache": ("quantize", "TensorRT calibration cache (implicit INT8, TensorRT 8.5-10.x; header names the version)"),
    "calibration.stats.npz": ("quantize", "calibration statistics (per-tensor histograms; reused by a later quantize)"),
    "model.qat.pt": ("quantize", "checkpoint after quantization-aware fine-tuning (the INT8 models' weights)"),
    "quantize.json": ("quantize", "stage record"),
    "bench.json": ("bench", "stage record"),
    "report.json": ("report", "report (machine-readable)"),
    "report.md": ("report", "report (human-readable)"),
    "report.html": ("report", "report (one self-contained page with charts)"),
    "latency.svg": ("report", "chart"),
    "accuracy.svg": ("report", "chart"),
    "reliability.svg": ("report", "chart: reliability diagram per variant"),
    "monitor.reference.json": ("monitor", "monitoring reference: the validation split's input, embedding, confidence and class statistics"),
    "monitor.json": ("monitor", "stage record"),
    "engine.json": ("engine", "stage record: every TensorRT engine in the bundle, with the device and version it runs on"),
    # engines are named model.<precision>.<gpu>-sm<cc>.trt<version>[.dla<N>].engine (tledge.trt.plan.engine_name)
}
# In the order data flows: a stage that rewrites a folder drops its own record and those after it.
STAGE_RECORDS = {"finetune": "finetune.json", "export": "export.json", "quantize": "quantize.json", "bench": "bench.json",
                 "monitor": "monitor.json", "report": "report.json", "engine": "engine.json"}


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` in one rename, else it is removed.

    >>> with atomic_path("model.onnx") as tmp:
    ...     onnx.save(model, tmp)  # doctest: +SKIP
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; artifacts get the usual permissions
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    from tledge.errors import TledgeError

    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TledgeError(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TledgeError(f"{path} is not valid JSON: {exc}") from None


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def describe_file(path: str | os.PathLike, root: str | os.PathLike | None = None) -> dict:
    """Name (relative to ``root``), size and sha256 of a file, as a manifest lists it."""
    path = Path(path)
    name = path.relative_to(root).as_posix() if root is not None else path.name
    return {"path": name, "bytes": path.stat().st_size, "sha256": sha256_file(path)}
