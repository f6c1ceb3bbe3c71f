"""``manifest.json``: every artifact of a build with its sha256 and size, and what a device needs to run it."""

from __future__ import annotations

from pathlib import Path

from .artifacts import describe_file, write_json
from .errors import TledgeError

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "tledge.manifest/1"

KINDS = {
    "model.pt": "checkpoint (PyTorch, weights_only)",
    "model.fp32.onnx": "onnx-fp32",
    "model.int8.qdq.onnx": "onnx-int8-qdq (TensorRT explicit quantization)",
    "model.int8.cpu.onnx": "onnx-int8 (ONNX Runtime CPU, U8S8; see cpu_target for the CPUs it is right on)",
    "calibration.json": "calibration set (image list with sha256)",
    "calibration.cache": "TensorRT calibration cache (implicit INT8, TensorRT 8.5-10.x; header names the version)",
    "report.json": "report (machine-readable)",
    "report.md": "report (human-readable)",
}


def _cpu_target_entry(path: Path, out_dir: Path) -> dict:
    """Which CPUs the CPU INT8 model is right on (from the file's own metadata) and where that was checked."""
    from .artifacts import read_json
    from .cpu_isa import CPU_TARGETS
    from .export import read_metadata

    name = read_metadata(path).get("cpu_target")
    target = CPU_TARGETS.get(name)
    entry = {"name": name or "unrecorded", "valid_on": sorted(target.classes) if target else None}
    record = out_dir / "quantize.json"
    cpu = read_json(record).get("models", {}).get("cpu", {}) if record.is_file() else {}
    if cpu.get("path") == path.name and "validation" in cpu:
        v = cpu["validation"]
        entry["validated_on"] = {k: v[k] for k in ("cpu", "cpu_class", "int8_flags", "inside_target", "images", "top1_agreement") if k in v}
    return entry


def bundle(out_dir: str | Path) -> dict:
    """Describe every file in ``out_dir`` (except the manifest and hidden files) and write ``manifest.json`` last.

    Input spec, preprocessing and labels come from the FP32 ONNX model's tledge metadata.
    """
    from .export import read_metadata
    from .machine import machine_info

    out_dir = Path(out_dir)
    fp32 = out_dir / "model.fp32.onnx"
    if not fp32.is_file():
        raise TledgeError(f"{out_dir} has no model.fp32.onnx; nothing to bundle")
    meta = read_metadata(fp32)
    files = sorted(p for p in out_dir.rglob("*") if p.is_file() and p.name != MANIFEST and not any(part.startswith(".") for part in p.relative_to(out_dir).parts))
    artifacts = []
    for path in files:
        entry = describe_file(path, out_dir)
        entry["kind"] = KINDS.get(entry["path"], "stage record" if path.suffix == ".json" else "chart" if path.suffix == ".svg" else "file")
        if entry["path"] == "model.int8.cpu.onnx":
            entry["cpu_target"] = _cpu_target_entry(path, out_dir)
        artifacts.append(entry)
    pre = meta["preprocess"]
    manifest = {
        "format": MANIFEST_FORMAT,
        "arch": meta["arch"],
        "input": {"name": meta["input"], "shape": ["batch", 3, pre["size"], pre["size"]], "dtype": "float32", "layout": "NCHW", "max_batch": meta.get("max_batch")},
        "output": {"name": meta["output"], "shape": ["batch", len(meta["classes"])], "dtype": "float32", "meaning": "logits"},
        "preprocessing": {
            "color": "RGB",
            "resize_shorter_side": pre["resize"],
            "center_crop": pre["size"],
            "interpolation": pre["interpolation"],
            "scale": "pixel / 255",
            "mean": pre["mean"],
            "std": pre["std"],
        },
        "classes": meta["classes"],
        "artifacts": artifacts,
        "versions": machine_info()["versions"],
    }
    write_json(out_dir / MANIFEST, manifest)
    return manifest
