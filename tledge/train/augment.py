"""Train-time augmentation for small sets, on decoded uint8 images (Pillow + numpy, like the eval path).

Every random choice comes from a generator seeded by (seed, epoch, image index), so a run is reproducible
whatever the number of loader workers, and a resumed run sees exactly the augmentations it would have seen.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from tledge.data.images import PIL_FILTERS, Preprocess, to_input
from tledge.errors import TledgeError


@dataclass(frozen=True)
class Augment:
    """One augmentation preset. ``crop_scale`` is the range of the image area a random resized crop keeps."""

    name: str
    crop_scale: tuple[float, float] = (1.0, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    jitter: float = 0.0  # brightness, contrast and saturation each scaled by a factor in [1 - j, 1 + j]
    hflip: bool = False

    @property
    def identity(self) -> bool:
        return self.crop_scale == (1.0, 1.0) and self.jitter == 0 and not self.hflip

    def to_dict(self) -> dict:
        return asdict(self)


# Small sets overfit quickly, yet strong crops cut away what tells the classes apart (a digit, a defect):
# "light" keeps most of the frame, "strong" is the ImageNet-style crop for photos of whole objects.
PRESETS = {
    "none": Augment("none"),
    "light": Augment("light", crop_scale=(0.7, 1.0), jitter=0.15),
    "strong": Augment("strong", crop_scale=(0.35, 1.0), jitter=0.3),
}


def preset(name: str, hflip: bool = False) -> Augment:
    """The preset ``name`` (none, light, strong); ``hflip`` adds horizontal flips, for classes a mirror keeps."""
    if name not in PRESETS:
        raise TledgeError(f"augment must be one of {', '.join(PRESETS)}, got {name!r}")
    p = PRESETS[name]
    return Augment(p.name, p.crop_scale, p.crop_ratio, p.jitter, hflip)


def _normalize(x: np.ndarray, pre: Preprocess) -> np.ndarray:
    x = (x - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def augmented_input(img: np.ndarray, pre: Preprocess, aug: Augment, rng: np.random.Generator) -> np.ndarray:
    """A random view of ``img`` (random resized crop, flip, colour jitter), as a normalized (3, size, size) array."""
    from PIL import Image

    if aug.identity:
        return to_input(img, pre)
    h, w = img.shape[:2]
    # Random resized crop (as torchvision's): area share and aspect ratio drawn, retried until the box fits.
    box = None
    for _ in range(10):
        area = h * w * rng.uniform(*aug.crop_scale)
        ratio = np.exp(rng.uniform(np.log(aug.crop_ratio[0]), np.log(aug.crop_ratio[1])))
        cw, ch = int(round(np.sqrt(area * ratio))), int(round(np.sqrt(area / ratio)))
        if 0 < cw <= w and 0 < ch <= h:
            top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            box = (left, top, left + cw, top + ch)
            break
    if box is None:  # fall back to the largest centered square
        side = min(h, w)
        box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
    pil = Image.fromarray(img).resize((pre.size, pre.size), PIL_FILTERS[pre.interpolation], box=box)
    x = np.asarray(pil, dtype=np.float32) / 255.0
    if aug.hflip and rng.random() < 0.5:
        x = x[:, ::-1]
    if aug.jitter > 0:
        b, c, s = rng.uniform(1 - aug.jitter, 1 + aug.jitter, 3)
        x = x * b
        gray = x @ np.asarray([0.299, 0.587, 0.114], np.float32)
        x = (x - gray.mean()) * c + gray.mean()
        gray = (x @ np.asarray([0.299, 0.587, 0.114], np.float32))[..., None]
        x = np.clip(gray + (x - gray) * s, 0.0, 1.0).astype(np.float32)
    return _normalize(x, pre)
