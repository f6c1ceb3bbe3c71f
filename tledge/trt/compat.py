"""Whether an engine can run on this machine: TensorRT builds an engine for one TensorRT version, GPU model and compute
capability (and JetPack, DLA core), and says little when it is handed another's. Checked before deserializing."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional


@dataclass(frozen=True)
class Here:
    """What decides whether an engine runs on this machine."""

    tensorrt: Optional[str]  # None: TensorRT not installed
    gpu: Optional[str]  # None: no NVIDIA GPU visible
    compute_capability: Optional[str]
    jetson: Optional[dict] = None


def this_machine() -> Here:
    from tledge.cuda import device_info

    version = None
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None:
        try:
            import tensorrt

            version = str(tensorrt.__version__)
        except Exception:  # a broken install (e.g. missing libnvinfer) counts as no TensorRT, with its reason below
            version = None
    info = device_info() or {}
    return Here(version, info.get("gpu"), info.get("compute_capability"), info.get("jetson"))


def _same_version(a: str, b: str) -> bool:
    """TensorRT engines are tied to major.minor.patch (the build number after it does not matter)."""
    return a.split(".")[:3] == b.split(".")[:3]


def engine_mismatch(record: dict, here: Here) -> Optional[str]:
    """Why this machine cannot run the engine ``record`` describes (None when it can)."""
    from tledge.trt.plan import TrtVersion

    built = record.get("tensorrt")
    if here.tensorrt is None:
        return "TensorRT is not installed here"
    if here.gpu is None:
        return "no NVIDIA GPU is visible here"
    reasons = []
    if record.get("version_compatible"):
        b, h = TrtVersion.parse(built), TrtVersion.parse(here.tensorrt)
        if not (h.major == b.major and h >= b):
            reasons.append(f"it is version-compatible from TensorRT {built} within {b.major}.x, this device has {here.tensorrt}")
    elif not _same_version(built, here.tensorrt):
        reasons.append(f"it was built with TensorRT {built}, this device has {here.tensorrt}")
    if record.get("hardware_compatibility"):
        if here.jetson is not None or float(here.compute_capability) < 8.0:
            reasons.append(f"it is hardware-compatible for Ampere and newer datacenter GPUs, this is {here.gpu} (compute capability {here.compute_capability})")
    elif record.get("gpu") != here.gpu or record.get("compute_capability") != here.compute_capability:
        reasons.append(f"it was built for {record.get('gpu')} (compute capability {record.get('compute_capability')}), "
                       f"this is {here.gpu} ({here.compute_capability})")
    else:
        built_on = (record.get("jetson") or {}).get("model")
        this = (here.jetson or {}).get("model")
        if built_on and this and built_on != this:
            reasons.append(f"it was built on a {built_on}, this is a {this} (same GPU architecture, other SM count and memory)")
    return "; ".join(reasons) or None


def rebuild_command(bundle: Path, record: dict) -> str:
    p = record.get("profile") or {}
    batch = ",".join(str(p[k][0]) for k in ("min", "opt", "max")) if all(k in p for k in ("min", "opt", "max")) else None
    parts = [f"tledge engine {bundle}", f"--precision {record.get('precision', 'int8')}"]
    if batch:
        parts.append(f"--batch {batch}")
    if record.get("int8_path") == "implicit":
        parts.append("--int8-path implicit")
    if record.get("dla_core") is not None:
        parts.append(f"--dla {record['dla_core']}")
    return " ".join(parts)
