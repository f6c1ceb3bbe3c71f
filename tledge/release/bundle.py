"""``manifest.json``: every artifact of a build with its sha256 and size, and what a device needs to run it."""

from __future__ import annotations

from pathlib import Path

from tledge.artifacts import ARTIFACTS, FORMATS, STAGE_RECORDS, describe_file, read_json, write_json
from tledge.errors import TledgeError
from tledge.release.check import check_artifact

MANIFEST = "manifest.json"
MANIFEST_FORMAT = FORMATS["manifest"]


def _cpu_target_entry(path: Path, out_dir: Path) -> dict:
    """Which CPUs the CPU INT8 model is right on (from the file's own metadata) and where that was checked."""
    from tledge.artifacts import read_json
    from tledge.cpu_isa import CPU_TARGETS
    from tledge.export.onnx_io import read_metadata

    name = read_metadata(path).get("cpu_target")
    target = CPU_TARGETS.get(name)
    entry = {"name": name or "unrecorded", "valid_on": sorted(target.classes) if target else None}
    record = out_dir / "quantize.json"
    cpu = read_json(record).get("models", {}).get("cpu", {}) if record.is_file() else {}
    if cpu.get("path") == path.name and "validation" in cpu:
        v = cpu["validation"]
        entry["validated_on"] = {k: v[k] for k in ("cpu", "cpu_class", "int8_flags", "inside_target", "images", "top1_agreement") if k in v}
    return entry


def _previous_versions(out_dir: Path) -> dict | None:
    """The versions an earlier manifest recorded, if it signed the same FP32 model (so the same build made it)."""
    import json

    from tledge.artifacts import sha256_file

    try:
        old = json.loads((out_dir / MANIFEST).read_text(encoding="utf-8"))
        fp32 = next(a for a in old["artifacts"] if a["path"] == "model.fp32.onnx")
        same = fp32["sha256"] == sha256_file(out_dir / "model.fp32.onnx")
    except (OSError, ValueError, KeyError, TypeError, StopIteration):
        return None
    return old.get("versions") if same and isinstance(old.get("versions"), dict) else None


# What a device must match to run an engine (tledge verify compares them), from the record tledge engine wrote.
ENGINE_FIELDS = ("tensorrt", "gpu", "compute_capability", "jetson", "dla_core", "precision", "int8_path", "profile",
                 "hardware_compatibility", "version_compatible", "from", "versions")


def _engine_entry(path: Path) -> dict:
    from tledge.trt.engine import engine_record

    record = engine_record(path)
    if record is None:
        raise TledgeError(f"{path.name} is not in engine.json beside it; rebuild it with `tledge engine`")
    return {k: record.get(k) for k in ENGINE_FIELDS}


def declared_artifacts(out_dir: Path) -> dict[str, str]:
    """``{artifact: stage}`` for every file the stage records in ``out_dir`` say they wrote (records included)."""
    found = {}
    for stage, record_name in STAGE_RECORDS.items():
        record_path = out_dir / record_name
        if not record_path.is_file():
            continue
        record = read_json(record_path)
        names = record.get("artifacts") if isinstance(record, dict) else None
        if not isinstance(names, list):
            raise TledgeError(f"{record_path} does not say which artifacts it wrote (made by an older tledge?); re-run the {stage} stage")
        for name in names + [record_name]:
            if Path(name).is_absolute() or ".." in Path(name).parts:
                raise TledgeError(f"{record_path} names {name!r}, which is outside the build folder")
            found[name] = stage
    return found


def _recorded_digests(out_dir: Path) -> dict[str, str]:
    """``{artifact: sha256}`` as the stage records noted them when they wrote the files (records made since tledge
    recorded digests; older ones simply have none)."""
    found = {}
    for record_name in STAGE_RECORDS.values():
        if (out_dir / record_name).is_file():
            record = read_json(out_dir / record_name)
            digests = record.get("sha256") if isinstance(record, dict) else None
            if isinstance(digests, dict):
                found.update({k: v for k, v in digests.items() if isinstance(k, str) and isinstance(v, str)})
    return found


def bundle(out_dir: str | Path) -> dict:
    """Sign every artifact the stage records in ``out_dir`` declare, and write ``manifest.json`` last.

    The old manifest goes first, so a failure leaves no manifest rather than one that vouches for other files.
    A declared artifact that is missing is an error; a file no record declares (a leftover) is never signed.
    Input spec, preprocessing and labels come from the FP32 ONNX model's tledge metadata.
    """
    from tledge import validate
    from tledge.data.images import Preprocess
    from tledge.export.onnx_io import read_metadata
    from tledge.machine import machine_info

    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise TledgeError(f"{out_dir} is not a folder (give the build folder)")
    previous = _previous_versions(out_dir)
    (out_dir / MANIFEST).unlink(missing_ok=True)
    validate.output_file(out_dir / MANIFEST, "the manifest")
    fp32 = out_dir / "model.fp32.onnx"
    if not fp32.is_file():
        raise TledgeError(f"{out_dir} has no model.fp32.onnx; nothing to bundle")
    declared = declared_artifacts(out_dir)
    if fp32.name not in declared:  # a leftover of an earlier build must not describe this one's input and classes
        raise TledgeError(f"no stage record in {out_dir} declares {fp32.name} (export.json is missing: an interrupted build?); "
                          "re-run the export stage or the build")
    meta = read_metadata(fp32)
    missing = sorted(name for name in declared if not (out_dir / name).is_file())
    if missing:
        raise TledgeError(f"{out_dir} lacks artifacts its stage records say they wrote: {', '.join(missing)}; re-run those stages")
    recorded = _recorded_digests(out_dir)
    artifacts = []
    for name in sorted(declared):
        path = out_dir / name
        # A manifest vouches only for files that pass their own checks and are what their stage wrote.
        check_artifact(path)
        entry = describe_file(path, out_dir)
        if name in recorded and recorded[name] != entry["sha256"]:
            raise TledgeError(f"{path} changed after the {declared[name]} stage wrote it (its sha256 differs from the stage record's); "
                              f"re-run the {declared[name]} stage. No manifest was written")
        entry["stage"] = declared[name]
        entry["kind"] = ARTIFACTS.get(name, (None, "stage record" if path.suffix == ".json" else "file"))[1]
        if name == "model.int8.cpu.onnx":
            entry["cpu_target"] = _cpu_target_entry(path, out_dir)
        if path.suffix == ".engine":
            entry["kind"], entry["engine"] = "tensorrt engine", _engine_entry(path)
        artifacts.append(entry)
    leftovers = sorted(p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*")
                       if p.is_file() and p.relative_to(out_dir).as_posix() not in declared and p.name != MANIFEST
                       and not any(part.startswith(".") for part in p.relative_to(out_dir).parts))
    pre = Preprocess.from_dict(meta["preprocess"])
    manifest = {
        "format": MANIFEST_FORMAT,
        "arch": meta["arch"],
        "input": {"name": meta["input"], "shape": ["batch", *pre.input_shape], "dtype": "float32", "layout": "NCHW", "max_batch": meta.get("max_batch")},
        "output": {"name": meta["output"], "shape": ["batch", len(meta["classes"])], "dtype": "float32", "meaning": "logits"},
        "preprocessing": pre.describe(),
        "classes": meta["classes"],
        "artifacts": artifacts,
        "not_signed": leftovers,
        **_abstain_entry(out_dir),
        # The versions that made the models: re-signing the same build on a device (after `tledge engine`) keeps them.
        "versions": previous or machine_info()["versions"],
        **({"signed_on": {"versions": machine_info()["versions"]}} if previous else {}),
    }
    write_json(out_dir / MANIFEST, manifest)
    return manifest


def _abstain_entry(out_dir: Path) -> dict:
    """Per model file, the top-1 confidence below which a device should abstain to reach bench's target accuracy
    (measured on the test split; absent when no target was set)."""
    path = out_dir / "bench.json"
    if not path.is_file():
        return {}
    thresholds = {}
    for v in (read_json(path).get("variants") or {}).values():
        target = (v.get("failure") or {}).get("selective_prediction", {}).get("target")
        if target and target.get("threshold") is not None:
            thresholds[v["path"]] = {"min_confidence": target["threshold"], "target_accuracy": target["target_accuracy"],
                                     "coverage": target["coverage"], "measured_on": "test split (bench.json)"}
            scaled = (v["failure"].get("temperature_scaled") or {})
            scaled_target = scaled.get("selective_prediction", {}).get("target") or {}
            if scaled_target.get("threshold") is not None:  # for a device that divides its logits by the temperature
                thresholds[v["path"]]["temperature_scaled"] = {"temperature": scaled["temperature"],
                                                               "min_confidence": scaled_target["threshold"],
                                                               "coverage": scaled_target["coverage"]}
    return {"abstain_below": thresholds} if thresholds else {}
