"""Image folders in, normalized NCHW float32 batches out.

Preprocessing is plain PIL + numpy (no torchvision) so the exact same code runs for training, calibration,
benchmarking and on a device that has no torch. The resulting arrays are what the ONNX model's ``input`` takes.
"""

from __future__ import annotations

import contextlib
import functools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from tledge.errors import TledgeError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp"})

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
        if self.interpolation not in PIL_FILTERS:
            raise TledgeError(f"interpolation must be one of {sorted(PIL_FILTERS)}, got {self.interpolation!r}")
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


PIL_FILTERS = {"bilinear": 2, "bicubic": 3, "nearest": 0}  # PIL.Image.Resampling values


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
    return np.asarray(img.resize((new_w, new_h), PIL_FILTERS[pre.interpolation]))


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


def scan_images(paths: Iterable[Path], shown: int = 3) -> int:
    """Open every image's header (cheap: no pixels are decoded): unreadable, empty, zero-sized or oversized files are
    one error that names them, before any training. Returns the number checked. Truncated pixel data is only seen
    when decoded (:func:`tledge.data.images.load_image` reports it, still before any file is written)."""
    problems, count = [], 0
    for path in paths:
        count += 1
        try:
            with open_image(path):
                pass
        except TledgeError as exc:
            problems.append(str(exc))
    if problems:
        more = f" (and {len(problems) - shown} more)" if len(problems) > shown else ""
        raise TledgeError(f"{len(problems)} of {count} images cannot be used: {'; '.join(problems[:shown])}{more}")
    return count


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int
