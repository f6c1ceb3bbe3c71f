"""The offline default dataset: the 1,797 real handwritten digits that scikit-learn ships (UCI optdigits test set).

Each is an 8x8 grayscale scan (17 gray levels) of one of 43 writers. tledge writes them once into an ImageFolder
tree (train/val/test, stratified, seeded) under the cache folder, so the default run goes through exactly the same
file-based path as a user's own images. BMP is uncompressed, so the files, and the sha256 values that calibration
lists record, are the same on every machine.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from tledge.errors import TledgeError

DIGITS_NAME = "digits-v1"
DIGITS_SPLITS = {"train": 0.6, "val": 0.2, "test": 0.2}
DIGITS_SEED = 0


def cache_dir() -> Path:
    """``$TLEDGE_CACHE``, else ``$XDG_CACHE_HOME/tledge``, else ``~/.cache/tledge``."""
    if os.environ.get("TLEDGE_CACHE"):
        return Path(os.environ["TLEDGE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tledge"


def digits_dataset(root: str | Path | None = None) -> Path:
    """Write (once) and return the digits ImageFolder tree: ``train/``, ``val/``, ``test/``, each ``<digit>/<index>.bmp``."""
    root = Path(root) if root is not None else cache_dir() / "datasets" / DIGITS_NAME
    if (root / ".complete").exists():
        return root
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise TledgeError(f"the default dataset comes from scikit-learn, which is not importable ({exc}): pip install scikit-learn") from None
    from PIL import Image

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 ink levels -> 0..255
    rng = np.random.default_rng(DIGITS_SEED)
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        for label in range(10):
            index = np.flatnonzero(digits.target == label)
            index = index[rng.permutation(len(index))]
            n_train = round(len(index) * DIGITS_SPLITS["train"])
            n_val = round(len(index) * DIGITS_SPLITS["val"])
            cuts = {"train": index[:n_train], "val": index[n_train : n_train + n_val], "test": index[n_train + n_val :]}
            for split, members in cuts.items():
                folder = staging / split / str(label)
                folder.mkdir(parents=True)
                for i in sorted(members):
                    Image.fromarray(images[i], mode="L").save(folder / f"{i:04d}.bmp")
        (staging / "README.txt").write_text(
            "Handwritten digits from scikit-learn (sklearn.datasets.load_digits; UCI ML optdigits, 43 writers),\n"
            f"written by tledge as 8x8 BMP. Split {DIGITS_SPLITS}, stratified, seed {DIGITS_SEED}.\n"
        )
        (staging / ".complete").write_text("ok\n")
        if (root / ".complete").exists():  # another process finished first
            shutil.rmtree(staging)
            return root
        if root.exists():
            shutil.rmtree(root)  # an incomplete earlier attempt
        os.replace(staging, root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return root
