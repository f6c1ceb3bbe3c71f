"""Shared fixtures: a tiny generated image dataset and one tiny model carried through every stage once."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

# Keep tests off the user's cache and quick on two cores.
os.environ.setdefault("TLEDGE_CACHE", tempfile.mkdtemp(prefix="tledge-test-cache-"))
os.environ.setdefault("OMP_NUM_THREADS", "2")

TINY_CLASSES = ("circle", "square", "stripes")
TINY_SIZE = 32  # the input size of the registry's test_efficientnet_lite


def _draw(kind: str, rng: np.random.Generator, size: int = 40) -> np.ndarray:
    """A noisy RGB picture of one of three patterns: separable but not trivially (noise, random placement)."""
    img = rng.normal(110, 30, (size, size, 3))
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.integers(12, size - 12, 2)
    r = rng.integers(6, 11)
    color = rng.uniform(170, 255, 3)
    if kind == "circle":
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    elif kind == "square":
        mask = (abs(yy - cy) <= r) & (abs(xx - cx) <= r)
    else:
        mask = ((xx + rng.integers(0, 6)) // 3) % 2 == 0
    img[mask] = color
    return np.clip(img, 0, 255).astype(np.uint8)


def make_image_folder(root: Path, per_class: dict[str, int], classes=TINY_CLASSES, seed: int = 0, ext: str = ".png") -> Path:
    """Write ``root/<split>/<class>/<i>.png`` for each split in ``per_class`` (split '' = class folders at root)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in per_class.items():
        for name in classes:
            folder = root / split / name if split else root / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.fromarray(_draw(name, rng)).save(folder / f"{i:03d}{ext}")
    return root


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """3 classes; train 16, val 6, test 6 images per class, 40x40 PNG."""
    return make_image_folder(tmp_path_factory.mktemp("tiny_data"), {"train": 16, "val": 6, "test": 6})


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    """A state dict of the tiny Lite's original architecture standing in for pretrained weights.

    He-init convolutions keep the signal alive through the frozen trunk; random (non 0/1) running statistics make
    any reset or update of them visible to the tests that check batch norm stays frozen.
    """
    import torch

    from tledge.models import get_spec

    torch.manual_seed(5)
    original = get_spec("test_efficientnet_lite").build()
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for module in original.modules():
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu", generator=g)
        for name, t in original.state_dict().items():
            if name.endswith("running_mean"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
            elif name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
    path = tmp_path_factory.mktemp("weights") / "tiny_lite.pt"
    torch.save(original.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_dataset, tiny_weights, tmp_path_factory) -> Path:
    """finetune -> export -> quantize of the tiny registry model, run once for every test that needs artifacts."""
    from tledge.export.onnx_export import ExportConfig, export_onnx
    from tledge.quant.quantize import QuantizeConfig, quantize
    from tledge.train.finetune import FinetuneConfig, finetune

    out = tmp_path_factory.mktemp("tiny_pipeline")
    finetune(FinetuneConfig(data=tiny_dataset, out=out, model="test_efficientnet_lite", weights=str(tiny_weights), strategy="staged", unfreeze=(2,), epochs=4, patience=2, batch_size=16, lr=1e-2))
    export_onnx(ExportConfig(checkpoint=out / "model.pt", out=out / "model.fp32.onnx", data=tiny_dataset))
    # fallback_layers=0: the budget is checked and recorded, but every layer stays quantized for the structure tests
    quantize(QuantizeConfig(model=out / "model.fp32.onnx", data=tiny_dataset, out_dir=out, num_images=24, fallback_layers=0))
    return out


@pytest.fixture
def release(tiny_pipeline, tmp_path) -> Path:
    """A copy of the tiny build folder, signed by `tledge bundle` as it would be shipped to a device."""
    from _bundles import copy_build

    return copy_build(tiny_pipeline, tmp_path / "release")
