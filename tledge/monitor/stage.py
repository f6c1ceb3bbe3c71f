"""The monitoring stages: the reference a build ships (:func:`write_reference`, run by ``tledge build``) and the check
a device runs on production images or a service's prediction log (:func:`monitor`, ``tledge monitor``).

Both run the same ONNX model of the bundle, so the confidence and class-mix signals compare like with like.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from tledge.errors import TledgeError

REFERENCE_FILE = "monitor.reference.json"
RECORD_FILE = "monitor.json"
BATCH = 32


@dataclass(frozen=True)
class ReferenceConfig:
    """Settings for :func:`write_reference`: the build folder, the dataset it was trained on, the model to tap."""

    out_dir: Path
    data: Path
    model: str = "model.fp32.onnx"
    max_images: Optional[int] = None  # cap on validation images (None: all of them)
    seed: int = 0

    def __post_init__(self):
        from tledge import validate as V

        object.__setattr__(self, "out_dir", Path(self.out_dir))
        object.__setattr__(self, "data", Path(self.data))
        V.number("--max-images", self.max_images, minimum=1, optional=True)


def run_model(tap, samples, pre):
    """(input statistics, embeddings or None, logits) over ``samples``, a batch at a time."""
    from tqdm import tqdm

    from tledge.data.images import iter_batches
    from tledge.monitor.reference import image_stats

    stats, embeddings, logits = [], [], []
    batches = (len(samples) + BATCH - 1) // BATCH
    for x, _ in tqdm(iter_batches(samples, pre, BATCH), total=batches, desc="monitor", unit="batch", leave=False):
        z, e = tap(x)
        stats.append(image_stats(x))
        logits.append(z)
        if e is not None:
            embeddings.append(e)
    joined = {k: np.concatenate([s[k] for s in stats]) for k in stats[0]}
    z = np.concatenate(logits)
    return joined, (np.concatenate(embeddings) if embeddings else None), z


def write_reference(cfg: ReferenceConfig, required: bool = True) -> dict:
    """Condense the validation split as the model sees it into ``monitor.reference.json`` (a few KB, signed by
    ``tledge bundle`` like every artifact), with its stage record ``monitor.json``.

    A validation split too small to be a reference is an error, or with ``required=False`` (the build) a record
    that says why there is none, so that ``tledge monitor`` on the device can say it too."""
    from tledge import validate
    from tledge.artifacts import write_json
    from tledge.data.images import Preprocess
    from tledge.data.splits import splits_for
    from tledge.export.onnx_io import onnx_metadata
    from tledge.monitor.observe import ModelTap
    from tledge.monitor.reference import MIN_REFERENCE_IMAGES, build_reference, save_reference

    started = time.perf_counter()
    path = cfg.out_dir / cfg.model
    meta = onnx_metadata(path)
    validate.start_rewrite(cfg.out_dir, "monitor")
    pre = Preprocess.from_dict(meta["preprocess"])
    splits = splits_for(cfg.data, cfg.out_dir, cfg.seed, meta.get("splits_sha256"))
    samples = splits.val[: cfg.max_images] if cfg.max_images else splits.val
    if len(samples) < MIN_REFERENCE_IMAGES and not required:
        (cfg.out_dir / REFERENCE_FILE).unlink(missing_ok=True)
        why = (f"no monitoring reference: the validation split has {len(samples)} images, fewer than the {MIN_REFERENCE_IMAGES} "
               "a reference needs; `tledge monitor` cannot judge this build's inputs")
        record = {"stage": "monitor", "artifacts": [RECORD_FILE], "skipped": why, "warnings": [why]}
        write_json(cfg.out_dir / RECORD_FILE, record)
        return record
    tap = ModelTap(path)
    stats, embeddings, logits = run_model(tap, samples, pre)
    reference = build_reference(stats, embeddings, logits, meta["classes"],
                                meta={"model": cfg.model, "split": "val", "embedding_tensor": tap.embedding_name})
    save_reference(reference, cfg.out_dir / REFERENCE_FILE)
    record = {"stage": "monitor", "artifacts": [REFERENCE_FILE, RECORD_FILE], "model": cfg.model, "split": "val",
              "images": len(samples), "embedding_tensor": tap.embedding_name,
              "bytes": (cfg.out_dir / REFERENCE_FILE).stat().st_size, "seconds": round(time.perf_counter() - started, 2)}
    write_json(cfg.out_dir / RECORD_FILE, record)
    return record


@dataclass(frozen=True)
class MonitorConfig:
    """Settings for :func:`monitor`: a bundle (folder or archive) and production images or a prediction log."""

    bundle: Path
    images: Optional[Path] = None  # a folder of production images (searched recursively)
    log: Optional[Path] = None  # a service's JSONL log: {"predicted": ..., "confidence": ...} per line
    labels: Optional[Path] = None  # operators' labels (CSV file,label) of some of those images: human overrides
    out: Optional[Path] = None  # where the verdict JSON goes
    max_images: Optional[int] = None
    threads: Optional[int] = None

    def __post_init__(self):
        from tledge import validate as V

        for name in ("bundle", "images", "log", "labels", "out"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))
        if (self.images is None) == (self.log is None):
            raise TledgeError("give production images (--images DIR) or a prediction log (--log FILE.jsonl), one of the two")
        if self.labels is not None and self.images is None:
            raise TledgeError("--labels compares operators' labels with the model's answers on --images; give the images too")
        V.number("--max-images", self.max_images, minimum=1, optional=True)
        V.number("--threads", self.threads, minimum=1, optional=True)
        if self.out is not None:
            V.output_file(self.out, "--out")


def _production_images(folder: Path, cap: Optional[int]) -> list:
    from tledge.data.images import IMAGE_EXTENSIONS, Sample, scan_images

    if not folder.is_dir():
        raise TledgeError(f"--images {folder} is not a folder")
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
    if not paths:
        raise TledgeError(f"{folder} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    paths = paths[:cap] if cap else paths
    scan_images(paths)
    return [Sample(p, 0) for p in paths]


def monitor(cfg: MonitorConfig) -> dict:
    """Compare production inputs (or a prediction log) with the bundle's reference; returns the verdict record
    (``verdict`` ok/drift, each signal with its value, threshold and status) and writes it to ``cfg.out``."""
    from tledge.artifacts import read_json, write_json
    from tledge.data.images import Preprocess
    from tledge.export.onnx_io import onnx_metadata
    from tledge.monitor.drift import compare
    from tledge.monitor.logs import operator_overrides, read_prediction_log
    from tledge.monitor.observe import ModelTap
    from tledge.monitor.reference import load_reference
    from tledge.release.verify import verify

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tledge-monitor-") as scratch:
        # Only signed files: a reference or model changed since the build would judge against the wrong thing.
        checked = verify(cfg.bundle, check_device=False, extract_to=Path(scratch) / "bundle")
        folder = Path(checked["bundle"])
        skipped = read_json(folder / RECORD_FILE).get("skipped") if (folder / RECORD_FILE).is_file() else None
        if skipped:
            raise TledgeError(f"{cfg.bundle} has {skipped}")
        if not (folder / REFERENCE_FILE).is_file():
            raise TledgeError(f"{cfg.bundle} has no {REFERENCE_FILE}: build with a tledge that writes it (`tledge build` does), "
                              "or run `tledge monitor-reference BUILD --data DATA` on the build folder and bundle it again")
        reference = load_reference(folder / REFERENCE_FILE)
        classes = reference["classes"]
        record = {"bundle": str(cfg.bundle), "reference": {"model": reference.get("model"), "images": reference["images"],
                                                           "split": reference.get("split")}}
        if cfg.images is not None:
            model = folder / (reference.get("model") or "model.fp32.onnx")
            meta = onnx_metadata(model)
            if meta["classes"] != classes:
                raise TledgeError(f"{model.name} has classes {meta['classes']}, the monitoring reference {classes}: the bundle is inconsistent")
            pre = Preprocess.from_dict(meta["preprocess"])
            samples = _production_images(cfg.images, cfg.max_images)
            tap = ModelTap(model, threads=cfg.threads)
            stats, embeddings, logits = run_model(tap, samples, pre)
            verdict = compare(reference, stats, embeddings, logits)
            if cfg.labels is not None:
                predicted = logits.argmax(1)
                by_file = {p.path.relative_to(cfg.images).as_posix(): classes[int(k)] for p, k in zip(samples, predicted)}
                verdict["overrides"] = operator_overrides(cfg.labels, by_file, classes)
            record["source"] = {"images": str(cfg.images), "count": len(samples)}
        else:
            predictions, confidences = read_prediction_log(cfg.log, classes)
            if confidences is None:
                raise TledgeError(f"{cfg.log} logs no confidence; the monitor needs it on every line (top-1 probability)")
            verdict = compare(reference, predictions=predictions, confidences=confidences)
            record["source"] = {"log": str(cfg.log), "count": len(predictions)}
    record.update(verdict)
    record["seconds"] = round(time.perf_counter() - started, 2)
    if cfg.out is not None:
        write_json(cfg.out, record)
    return record

