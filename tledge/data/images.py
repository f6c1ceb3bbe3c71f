"""Image folders in, normalized NCHW float32 batches out.

Preprocessing is plain PIL + numpy (no torchvision) so the exact same code runs for training, calibration,
benchmarking and on a device that has no torch. The resulting arrays are what the ONNX model's ``input`` takes.
"""

from __future__ import annotations

import contextlib
import functools
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from tledge.errors import TledgeError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp"})
VAL_FOLDER_NAMES = ("val", "validation", "valid")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes the network input: RGB, shorter side to ``resize``, center crop ``size``, normalize.

    ``(pixel / 255 - mean) / std`` per channel, laid out as (3, size, size) float32.
    """

    size: int = 224
    resize: int = 256
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"

    def __post_init__(self):
        if self.size < 8:
            raise TledgeError(f"input size must be at least 8 pixels, got {self.size}")
        if self.resize < self.size:
            raise TledgeError(f"resize ({self.resize}) must be at least the input size ({self.size})")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise TledgeError(f"mean and std need 3 values each, std positive; got {self.mean} / {self.std}")
        if self.interpolation not in _PIL_FILTERS:
            raise TledgeError(f"interpolation must be one of {sorted(_PIL_FILTERS)}, got {self.interpolation!r}")
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()})

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (3, self.size, self.size)

    def describe(self) -> dict:
        """Everything a device needs to reimplement :func:`load_image` exactly (copied whole into the manifest)."""
        return {
            "decode": "Pillow, converted to RGB: 8 bits a channel (16-bit gray scaled by 255/65535, rounded; float gray as 0..1), "
                      "grayscale and palette expanded, alpha dropped",
            "channel_order": "RGB",
            "resize": {"shorter_side": self.resize, "other_side": f"round(other * {self.resize} / shorter), at least {self.size}",
                       "interpolation": f"{self.interpolation} (Pillow Image.resize, which filters over the whole footprint when shrinking)"},
            "center_crop": {"size": self.size, "offset": f"floor((side - {self.size}) / 2) on each axis"},
            "scale": "pixel / 255, float32",
            "normalize": {"mean": list(self.mean), "std": list(self.std), "formula": "(x - mean) / std, per channel"},
            "layout": "CHW per image, batched NCHW, float32",
            "parameters": {**self.to_dict(), "mean": list(self.mean), "std": list(self.std)},
        }


_PIL_FILTERS = {"bilinear": 2, "bicubic": 3, "nearest": 0}  # PIL.Image.Resampling values


# A resized image's long side may reach this many times ``resize``: beyond it (a 1 x 5000 strip) the resize alone
# would need gigabytes, and no photo is shaped so.
MAX_ASPECT_RATIO = 50


@functools.lru_cache(maxsize=None)
def _quiet_pillow() -> None:
    """Pillow's own warnings (bomb-size hints, odd EXIF, palette transparency) would break tledge's one-line output."""
    import warnings

    from PIL import Image

    warnings.filterwarnings("ignore", module="PIL")
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


@contextlib.contextmanager
def open_image(path: str | Path):
    """``PIL.Image.open`` with user errors: a missing, empty, unreadable, oversized (decompression bomb) or absurdly
    shaped file is a TledgeError naming it. Reads the header only; pixels are decoded on first use."""
    from PIL import Image, UnidentifiedImageError

    _quiet_pillow()
    path = Path(path)
    try:
        img = Image.open(path)
    except FileNotFoundError:
        raise TledgeError(f"image {path} does not exist") from None
    except Image.DecompressionBombError as exc:
        raise TledgeError(f"image {path} is too large to decode safely ({exc}). Downscale it") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        empty = " (an empty file)" if path.is_file() and path.stat().st_size == 0 else ""
        raise TledgeError(f"cannot read image {path}{empty}: {exc}. Remove or replace the file.") from None
    with img:
        w, h = img.size
        if min(w, h) < 1:
            raise TledgeError(f"image {path} has no pixels ({w} x {h})")
        if max(w, h) > MAX_ASPECT_RATIO * min(w, h):
            raise TledgeError(f"image {path} is {w} x {h} pixels: more than {MAX_ASPECT_RATIO}:1 is not a picture to classify. Crop or remove it")
        yield img


def to_rgb(img, path: str | Path = "image"):
    """An 8-bit RGB copy of a PIL image of any mode: 16- and 32-bit integer gray is scaled to 8 bits (never clipped:
    Pillow's ``convert`` clips them), float gray taken as 0..1 (or 0..255 when it exceeds 1), palette and
    grayscale expanded, alpha dropped."""
    from PIL import Image

    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        # 16-bit samples (PNG, TIFF, PGM); a 32-bit "I" image is read as 16-bit data, Pillow's own convention for them
        a = np.asarray(img).astype(np.float64)
        a = np.clip(a, 0, 65535) * (255.0 / 65535.0)
        return Image.fromarray(np.round(a).astype(np.uint8), mode="L").convert("RGB")
    if mode == "F":
        a = np.asarray(img, dtype=np.float64)
        if not np.isfinite(a).all():
            raise TledgeError(f"image {path} holds NaN or infinite pixel values")
        if a.min() < 0 or a.max() > 255:
            raise TledgeError(f"image {path} is a float image with values in [{a.min():.3g}, {a.max():.3g}]; tledge reads float images as 0..1 (or 0..255)")
        a = a * 255.0 if a.max() <= 1.0 else a
        return Image.fromarray(np.round(a).astype(np.uint8), mode="L").convert("RGB")
    if mode in ("P", "PA"):
        return img.convert("RGBA").convert("RGB")  # via RGBA: the palette's colours, without Pillow's transparency warning
    if mode in ("La", "RGBa"):  # premultiplied alpha
        img = img.convert("LA" if mode == "La" else "RGBA")
    return img.convert("RGB")


def resized_uint8(path: str | Path, pre: Preprocess) -> np.ndarray:
    """Decode one image file (any mode and bit depth, :func:`to_rgb`) and resize its shorter side to
    ``pre.resize``: an HWC uint8 array before the center crop. Training's augmentations start from it; a file PIL
    cannot decode is a TledgeError."""
    try:
        with open_image(path) as img:
            img.load()
            img = to_rgb(img, path)
    except TledgeError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError) as exc:  # truncated or corrupt pixel data
        raise TledgeError(f"cannot read image {path}: {exc}. Remove or replace the file.") from None
    w, h = img.size
    scale = pre.resize / min(w, h)
    new_w, new_h = max(pre.size, round(w * scale)), max(pre.size, round(h * scale))
    return np.asarray(img.resize((new_w, new_h), _PIL_FILTERS[pre.interpolation]))


def to_input(img: np.ndarray, pre: Preprocess) -> np.ndarray:
    """The network's input from :func:`resized_uint8`'s array: center crop, scale to 0..1, normalize, CHW float32."""
    h, w = img.shape[:2]
    top, left = (h - pre.size) // 2, (w - pre.size) // 2
    x = img[top : top + pre.size, left : left + pre.size].astype(np.float32) / 255.0
    x = (x - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def load_image(path: str | Path, pre: Preprocess) -> np.ndarray:
    """Read one image file into a (3, size, size) float32 array; a file PIL cannot decode is a TledgeError."""
    return to_input(resized_uint8(path, pre), pre)


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int


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


def iter_batches(
    samples: Sequence[Sample], pre: Preprocess, batch_size: int, workers: int = 4
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(images [B,3,H,W] float32, labels [B] int64)`` in order; decoding runs in a few threads."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            images = list(pool.map(lambda s: load_image(s.path, pre), chunk))
            yield np.stack(images), np.asarray([s.label for s in chunk], dtype=np.int64)


def load_array(samples: Sequence[Sample], pre: Preprocess, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """All of ``samples`` as one array (for small sets: calibration, parity checks)."""
    xs, ys = [], []
    for x, y in iter_batches(samples, pre, batch_size):
        xs.append(x)
        ys.append(y)
    if not xs:
        return np.zeros((0, *pre.input_shape), np.float32), np.zeros((0,), np.int64)
    return np.concatenate(xs), np.concatenate(ys)


SPLITS_FILE = "splits.json"
SPLITS_FORMAT = "tledge.splits/1"


def write_splits(splits: Splits, path: Path, seed: int, val_fraction: float, test_fraction: float) -> str:
    """Write the split as file lists with sha256 (``splits.json``); returns the file's own sha256, the split's id."""
    from tledge.artifacts import sha256_file, write_json

    def entries(samples):
        return [[s.path.relative_to(splits.root).as_posix(), sha256_file(s.path), s.label] for s in samples]

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
