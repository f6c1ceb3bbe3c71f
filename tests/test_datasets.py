"""The offline default dataset (scikit-learn's handwritten digits written as an ImageFolder tree)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tledge.data.datasets import DIGITS_SPLITS, digits_dataset
from tledge.data.splits import load_splits
from tledge.quant.calibration import load_calibration_set, sample_calibration_set

REPO = Path(__file__).resolve().parent.parent
# package data, so a wheel install pins the same images (tledge.pipeline.build.PINNED_CALIBRATION_DIR)
PINNED_CALIBRATION = REPO / "tledge" / "calibration_sets" / "digits-efficientnet_lite0-128.json"
DIGIT_CLASSES = [str(d) for d in range(10)]
# images per digit in sklearn's load_digits (UCI optdigits test set)
PER_CLASS = {0: 178, 1: 182, 2: 177, 3: 183, 4: 181, 5: 182, 6: 181, 7: 179, 8: 174, 9: 180}


def _tree_hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    return digits_dataset(tmp_path_factory.mktemp("digits") / "d")


def test_layout_and_counts(digits):
    assert (digits / ".complete").is_file()
    assert sorted(p.name for p in digits.iterdir() if p.is_dir()) == ["test", "train", "val"]
    assert set(DIGITS_SPLITS) == {"train", "val", "test"} and sum(DIGITS_SPLITS.values()) == pytest.approx(1.0)
    total = 0
    for label, n in PER_CLASS.items():
        counts = {split: len(list((digits / split / str(label)).glob("*.bmp"))) for split in ("train", "val", "test")}
        assert sum(counts.values()) == n
        for split in ("train", "val"):
            assert abs(counts[split] - n * DIGITS_SPLITS[split]) <= 0.5, (label, split, counts)
        assert abs(counts["test"] - n * DIGITS_SPLITS["test"]) <= 1.0, (label, counts)
        total += n
    assert total == 1797
    assert len(list(digits.rglob("*.bmp"))) == 1797
    # no sklearn index in two splits
    names = [p.name for p in digits.rglob("*.bmp")]
    assert len(set(names)) == 1797


def test_images_are_the_sklearn_digits(digits):
    from sklearn.datasets import load_digits

    ds = load_digits()
    for path in list(digits.rglob("*.bmp"))[::97]:
        index = int(path.stem)
        assert int(path.parent.name) == ds.target[index]
        with Image.open(path) as img:
            assert img.mode == "L" and img.size == (8, 8)
            pixels = np.asarray(img)
        np.testing.assert_array_equal(pixels, np.round(ds.images[index] * 255 / 16).astype(np.uint8))


def test_load_splits_reads_it(digits):
    splits = load_splits(digits)
    assert splits.layout == "folders"
    assert splits.classes == DIGIT_CLASSES
    assert len(splits.train) + len(splits.val) + len(splits.test) == 1797
    assert len(splits.test) > 0 and splits.evaluation_name == "test"


def test_materialization_is_deterministic(digits, tmp_path):
    again = digits_dataset(tmp_path / "again")
    first, second = _tree_hashes(digits), _tree_hashes(again)
    assert len(first) == 1797 + 2  # images, README.txt, .complete
    assert first == second


def test_second_call_does_not_rewrite(tmp_path):
    root = digits_dataset(tmp_path / "d")
    victim = next(root.rglob("*.bmp"))
    victim.unlink()
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    assert digits_dataset(tmp_path / "d") == root
    assert not victim.exists()  # returned at once: the .complete marker says the tree is there
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == before
    assert not [p for p in tmp_path.iterdir() if p.name != "d"]  # no staging folder left behind


def test_incomplete_tree_is_replaced(tmp_path):
    root = tmp_path / "d"
    (root / "train" / "0").mkdir(parents=True)
    (root / "train" / "0" / "junk.bmp").write_bytes(b"half-written")
    digits_dataset(root)
    assert (root / ".complete").is_file()
    assert not (root / "train" / "0" / "junk.bmp").exists()
    assert len(list(root.rglob("*.bmp"))) == 1797
    assert [p.name for p in tmp_path.iterdir()] == ["d"]


def test_pinned_calibration_matches_the_dataset(digits):
    from tledge.pipeline.build import DEFAULT_CALIBRATION, PINNED_CALIBRATION_DIR

    assert PINNED_CALIBRATION_DIR / DEFAULT_CALIBRATION == PINNED_CALIBRATION and PINNED_CALIBRATION.is_file()
    calib = load_calibration_set(PINNED_CALIBRATION, digits, DIGIT_CLASSES, (3, 128, 128))
    assert len(calib.images) == 256
    assert all(rel.startswith("train/") for rel, _ in calib.images)
    # and it is what tledge's own sampling draws from the dataset with the recorded settings
    sampling = calib.sampling
    assert sampling["method"] == "stratified-round-robin"
    redrawn = sample_calibration_set(load_splits(digits), sampling["requested"], sampling["seed"])
    assert redrawn.images == calib.images
