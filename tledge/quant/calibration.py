"""Calibration sets: which real training images INT8 ranges are computed from, pinned by sha256.

A definition file (JSON, ``format: tledge.calibration/1``) lists image paths relative to the dataset root with
their hashes, plus how they were sampled. Release builds keep definitions in the repository's ``calibration/``
folder so that the same images calibrate every build; a changed or missing image is an error, not a silent drift.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from tledge.artifacts import read_json, sha256_file
from tledge.data.splits import Splits
from tledge.errors import TledgeError

CALIBRATION_FORMAT = "tledge.calibration/1"


@dataclass(frozen=True)
class CalibrationSet:
    root: Path
    images: list[tuple[str, str]]  # (path relative to root, sha256)
    sampling: dict

    @property
    def paths(self) -> list[Path]:
        return [self.root / rel for rel, _ in self.images]

    def to_dict(self, classes: list[str], input_shape: tuple[int, ...]) -> dict:
        return {
            "format": CALIBRATION_FORMAT,
            "sampling": self.sampling,
            "classes": classes,
            "input_shape": list(input_shape),
            "count": len(self.images),
            "images": [{"path": rel, "sha256": digest} for rel, digest in self.images],
        }


def sample_calibration_set(splits: Splits, num_images: int, seed: int) -> CalibrationSet:
    """Draw ``num_images`` training images, spread evenly over classes (seeded), and hash them."""
    if num_images < 1:
        raise TledgeError("the calibration set needs at least one image")
    by_class: dict[int, list] = {}
    for sample in splits.train:
        by_class.setdefault(sample.label, []).append(sample.path)
    rng = random.Random(seed)
    for paths in by_class.values():
        rng.shuffle(paths)
    picked: list[Path] = []
    # Round-robin over classes so a large class cannot crowd out a small one.
    while len(picked) < num_images and any(by_class.values()):
        for label in sorted(by_class):
            if by_class[label] and len(picked) < num_images:
                picked.append(by_class[label].pop())
    picked.sort()
    images = [(p.relative_to(splits.root).as_posix(), sha256_file(p)) for p in picked]
    sampling = {"method": "stratified-round-robin", "split": "train", "requested": num_images, "seed": seed}
    return CalibrationSet(splits.root, images, sampling)


def load_calibration_set(definition: str | Path, root: str | Path, classes: list[str], input_shape: tuple[int, ...]) -> CalibrationSet:
    """Read a definition file and check it against the dataset on disk and against the model."""
    definition = Path(definition)
    spec = read_json(definition)
    if not isinstance(spec, dict) or spec.get("format") != CALIBRATION_FORMAT:
        raise TledgeError(f"{definition} is not a tledge calibration definition (format {CALIBRATION_FORMAT})")
    _check_schema(spec, definition)
    if spec.get("classes") and list(spec["classes"]) != list(classes):
        raise TledgeError(f"calibration set {definition} was made for classes {spec['classes']}, the model has {classes}")
    if spec.get("input_shape") and tuple(spec["input_shape"]) != tuple(input_shape):
        raise TledgeError(
            f"calibration set {definition} was made for input {tuple(spec['input_shape'])}, the model takes {tuple(input_shape)}; "
            "make a new one for this model (tledge quantize --num-calib N writes calibration.json)"
        )
    root = Path(root)
    images, problems = [], []
    for entry in spec["images"]:
        rel, digest = entry["path"], entry["sha256"]
        path = root / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            problems.append(f"{rel}: paths must stay inside the dataset folder")
        elif not path.is_file():
            problems.append(f"{rel}: missing")
        elif sha256_file(path) != digest:
            problems.append(f"{rel}: sha256 differs from the definition")
        images.append((rel, digest))
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise TledgeError(f"calibration set {definition} does not match {root}: {shown}")
    if not images:
        raise TledgeError(f"calibration set {definition} lists no images")
    return CalibrationSet(root, images, {**spec.get("sampling", {}), "definition": definition.name})


def _check_schema(spec: dict, definition: Path) -> None:
    """The definition's shape: a list of ``{"path": str, "sha256": 64 hex digits}``, unique paths; optional classes and
    input_shape of the right types. A malformed file is one clear error, not a KeyError halfway through."""
    from tledge.validate import is_sha256

    def bad(why: str):
        raise TledgeError(f"calibration definition {definition} is malformed: {why}")

    images = spec.get("images")
    if not isinstance(images, list):
        bad('"images" must be a list of {"path", "sha256"} entries')
    for i, entry in enumerate(images):
        if not isinstance(entry, dict):
            bad(f"images[{i}] is {type(entry).__name__}, not an object with path and sha256")
        if not isinstance(entry.get("path"), str) or not entry["path"].strip():
            bad(f"images[{i}] has no path")
        if "sha256" not in entry:
            bad(f"images[{i}] ({entry['path']}) has no sha256; every image must be pinned by its hash")
        if not is_sha256(entry["sha256"]):
            bad(f"images[{i}] ({entry['path']}) has sha256 {entry['sha256']!r}, not 64 lowercase hex digits")
    paths = [e["path"] for e in images]
    if len(set(paths)) != len(paths):
        bad(f"an image is listed twice ({next(p for p in paths if paths.count(p) > 1)})")
    if "classes" in spec and not (isinstance(spec["classes"], list) and all(isinstance(c, str) for c in spec["classes"])):
        bad('"classes" must be a list of class names')
    shape = spec.get("input_shape")
    if shape is not None and not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) for d in shape)):
        bad('"input_shape" must be a list of integers')
    if "sampling" in spec and not isinstance(spec["sampling"], dict):
        bad('"sampling" must be an object')


# Fewer images than this leave activation ranges to chance (TensorRT's samples calibrate on about 500).
RECOMMENDED_MIN_IMAGES = 128


def calibration_warnings(calib: CalibrationSet, classes: list[str]) -> list[str]:
    """What makes a calibration set unrepresentative: too few images, or classes it never shows."""
    warnings = []
    if len(calib.images) < RECOMMENDED_MIN_IMAGES:
        warnings.append(f"calibration uses {len(calib.images)} images; {RECOMMENDED_MIN_IMAGES} or more give steadier INT8 ranges")
    seen = {Path(rel).parent.name for rel, _ in calib.images}
    missing = [c for c in classes if c not in seen]
    if missing:
        warnings.append(f"the calibration images show no example of {len(missing)} class(es): {', '.join(missing[:10])}")
    return warnings
