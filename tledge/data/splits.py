"""The train/val/test split of an ImageFolder tree: scanning class folders, a stratified split, and splits.json
(written once by the fine-tune, read back file by file with sha256 by every later stage)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from tledge.data.images import IMAGE_EXTENSIONS, Sample
from tledge.errors import TledgeError

VAL_FOLDER_NAMES = ("val", "validation", "valid")


@dataclass
class Splits:
    """A labelled dataset cut into train / val / test. ``evaluation`` is the held-out split reports use."""

    root: Path
    classes: list[str]
    train: list[Sample]
    val: list[Sample]
    test: list[Sample] = field(default_factory=list)
    layout: str = "folders"  # "folders": train/ val/ [test/] given; "split": one folder split by tledge

    @property
    def evaluation(self) -> list[Sample]:
        """The test split when there is one (val then only steers early stopping), else val."""
        return self.test or self.val

    @property
    def evaluation_name(self) -> str:
        return "test" if self.test else "val"

    def summary(self) -> dict:
        return {
            "root": str(self.root),
            "layout": self.layout,
            "classes": self.classes,
            "counts": {"train": len(self.train), "val": len(self.val), "test": len(self.test)},
            "evaluation_split": self.evaluation_name,
        }


def _images_in(folder: Path) -> list[Path]:
    named = [p for p in folder.iterdir() if not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS]
    broken = [p for p in named if p.is_symlink() and not p.exists()]
    if broken:  # skipping it silently would train on fewer images than the user gave
        raise TledgeError(f"{broken[0]} is a broken symbolic link" + (f" (and {len(broken) - 1} more)" if len(broken) > 1 else "")
                          + "; restore its target or remove it")
    return sorted(p for p in named if p.is_file())


def scan_class_folders(folder: Path) -> dict[str, list[Path]]:
    """``{class name: [image paths]}`` of an ImageFolder directory (one sub-folder per class)."""
    if not folder.is_dir():
        raise TledgeError(f"{folder} is not a directory")
    class_dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        loose = _images_in(folder)
        hint = f" It holds {len(loose)} images directly: put them in one sub-folder per class." if loose else ""
        raise TledgeError(f"{folder} has no class folders; expected {folder}/<class>/<image>.{hint}")
    classes = {}
    for d in class_dirs:
        images = _images_in(d)
        if not images:
            raise TledgeError(f"class folder {d} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        classes[d.name] = images
    return classes


def _stratified_split(
    by_class: dict[str, list[Path]], fractions: Sequence[float], seed: int
) -> tuple[dict[str, list[Path]], list[dict[str, list[Path]]]]:
    """Cut each class's file list with a seeded shuffle into ``(rest, [part per fraction])``.

    Every part and the rest get at least one image of every class, so no class silently vanishes from a split.
    """
    rng = random.Random(seed)
    rest: dict[str, list[Path]] = {}
    parts: list[dict[str, list[Path]]] = [{} for _ in fractions]
    needed = len(fractions) + 1
    for name in sorted(by_class):
        paths = sorted(by_class[name])
        if len(paths) < needed:
            raise TledgeError(
                f"class {name!r} has {len(paths)} image(s); splitting it {needed} ways needs at least {needed}. "
                "Add images or give separate train/ and val/ folders."
            )
        rng.shuffle(paths)
        counts = [max(1, round(len(paths) * f)) for f in fractions]
        while sum(counts) >= len(paths):  # leave the rest at least one image
            counts[counts.index(max(counts))] -= 1
        start = 0
        for part, count in zip(parts, counts):
            part[name] = sorted(paths[start : start + count])
            start += count
        rest[name] = sorted(paths[start:])
    return rest, parts


def _samples(by_class: dict[str, list[Path]], classes: list[str]) -> list[Sample]:
    index = {c: i for i, c in enumerate(classes)}
    return [Sample(p, index[c]) for c in sorted(by_class) for p in by_class[c]]


def load_splits(root: str | Path, val_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 0) -> Splits:
    """Find the images under ``root`` and their splits.

    Two layouts are accepted:
      * ``root/train/<class>/*`` with ``root/val/<class>/*`` (or ``validation/``) and optionally ``root/test/<class>/*``;
        without a val folder, ``val_fraction`` of train is held out (stratified, seeded);
      * ``root/<class>/*``: cut into train/val/test with the given fractions (stratified, seeded).
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise TledgeError(f"dataset folder {root} does not exist")
    if not root.is_dir():
        raise TledgeError(f"dataset path {root} is not a folder")
    if not (0 < val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise TledgeError(f"val/test fractions must be in (0, 1) and sum below 1, got {val_fraction} and {test_fraction}")

    if (root / "train").is_dir():
        train = scan_class_folders(root / "train")
        classes = sorted(train)
        val_dir = next((root / n for n in VAL_FOLDER_NAMES if (root / n).is_dir()), None)
        layout = "folders"
        if val_dir is not None:
            val = scan_class_folders(val_dir)
        else:
            train, (val,) = _stratified_split(train, [val_fraction], seed)
            layout = "folders+val-split"
        test = scan_class_folders(root / "test") if (root / "test").is_dir() else {}
        for split_name, split in (("val", val), ("test", test)):
            unknown = sorted(set(split) - set(classes))
            if unknown:
                raise TledgeError(f"{split_name} has classes that train does not: {unknown}; train has {classes}")
    else:
        by_class = scan_class_folders(root)
        classes = sorted(by_class)
        fractions = [val_fraction] + ([test_fraction] if test_fraction > 0 else [])
        train, parts = _stratified_split(by_class, fractions, seed)
        val = parts[0]
        test = parts[1] if len(parts) > 1 else {}
        layout = "split"

    if len(classes) < 2:
        raise TledgeError(f"{root} has one class ({classes[0]!r}); a classifier needs at least two class folders")
    return Splits(root, classes, _samples(train, classes), _samples(val, classes), _samples(test, classes), layout)


SPLITS_FILE = "splits.json"


SPLITS_FORMAT = "tledge.splits/1"


def write_splits(splits: Splits, path: Path, seed: int, val_fraction: float, test_fraction: float,
                 sha256: dict | None = None) -> str:
    """Write the split as file lists with sha256 (``splits.json``; ``sha256`` may give the digests already known,
    ``{path: hex}``); returns the file's own sha256, the split's id."""
    from tledge.artifacts import sha256_file, write_json

    known = sha256 or {}

    def entries(samples):
        return [[s.path.relative_to(splits.root).as_posix(), known.get(s.path) or sha256_file(s.path), s.label] for s in samples]

    write_json(path, {
        "format": SPLITS_FORMAT, "layout": splits.layout, "seed": seed, "val_fraction": val_fraction, "test_fraction": test_fraction,
        "classes": splits.classes, "train": entries(splits.train), "val": entries(splits.val), "test": entries(splits.test),
    })
    return sha256_file(path)


def read_splits(path: Path, root: str | Path) -> Splits:
    """The split recorded in ``path``, on the dataset at ``root``; refuses a dataset that no longer matches it
    (an image added, removed or changed), so no stage can score on images another stage trained on."""
    from tledge.artifacts import read_json, sha256_file

    root = Path(root).expanduser()
    record = read_json(path)
    if not isinstance(record, dict) or record.get("format") != SPLITS_FORMAT:
        raise TledgeError(f"{path} is not a tledge splits file")
    if not root.is_dir():
        raise TledgeError(f"dataset folder {root} does not exist")
    listed = {rel: digest for name in ("train", "val", "test") for rel, digest, _ in record[name]}
    fresh = load_splits(root, record["val_fraction"], record["test_fraction"], record["seed"])  # the images there now, by the same rules
    if fresh.classes != record["classes"]:
        raise TledgeError(f"{root} has classes {fresh.classes}, the split the model was trained on ({path}) has {record['classes']}")
    on_disk = {s.path.relative_to(root).as_posix() for s in fresh.train + fresh.val + fresh.test}
    added, removed = sorted(on_disk - set(listed)), sorted(set(listed) - on_disk)
    changed = sorted(rel for rel in set(listed) & on_disk if sha256_file(root / rel) != listed[rel])
    if added or removed or changed:
        what = [f"{len(x)} {kind} (e.g. {x[0]})" for kind, x in (("added", added), ("removed", removed), ("changed", changed)) if x]
        raise TledgeError(f"{root} no longer matches the split in {path}: {', '.join(what)}. Fine-tune again on this dataset, "
                          "or point --data at the one the model was trained on")

    def samples(name):
        return [Sample(root / rel, int(label)) for rel, _, label in record[name]]

    return Splits(root, list(record["classes"]), samples("train"), samples("val"), samples("test"), record["layout"])


def splits_for(root: str | Path, model_dir: Path, seed: int = 0, expected_sha256: str | None = None) -> Splits:
    """The split a stage works on: ``splits.json`` beside the model when the fine-tune wrote one (checked against
    the model's record of it), else the seeded split of ``root`` (models made before tledge wrote split files)."""
    from tledge.artifacts import sha256_file

    path = Path(model_dir) / SPLITS_FILE
    if path.is_file():
        if expected_sha256 and sha256_file(path) != expected_sha256:
            raise TledgeError(f"{path} is not the split the model was trained on (its sha256 differs from the model's record); "
                              "restore it, or fine-tune again")
        return read_splits(path, root)
    if expected_sha256:
        raise TledgeError(f"the model was trained on the split in a {SPLITS_FILE} that is not beside it in {model_dir}; copy it there")
    return load_splits(root, seed=seed)
