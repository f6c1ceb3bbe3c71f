"""The data layer: dataset layouts and splits, image decoding and normalization, batching."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_CLASSES, make_image_folder
from PIL import Image

from tledge.data.images import Preprocess, Sample, iter_batches, load_array, load_image
from tledge.data.splits import load_splits
from tledge.errors import TledgeError


def _solid(path: Path, color, size=(12, 12), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


def _paths(samples) -> list[Path]:
    return [s.path for s in samples]


# --- load_splits: the train/val[/test] layout ------------------------------------------------------------------


def test_folders_layout_with_test(tiny_dataset):
    splits = load_splits(tiny_dataset)
    assert splits.layout == "folders"
    assert splits.classes == sorted(TINY_CLASSES)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (16 * 3, 6 * 3, 6 * 3)
    assert splits.evaluation is splits.test and splits.evaluation_name == "test"
    for split_name, samples in (("train", splits.train), ("val", splits.val), ("test", splits.test)):
        for s in samples:
            # every sample sits in <root>/<split>/<its class>/
            assert s.path.parent.parent == tiny_dataset / split_name
            assert s.path.parent.name == splits.classes[s.label]
    summary = splits.summary()
    assert summary["counts"] == {"train": 48, "val": 18, "test": 18}
    assert summary["evaluation_split"] == "test"


@pytest.mark.parametrize("val_name", ["validation", "valid"])
def test_other_val_folder_names(tmp_path, val_name):
    make_image_folder(tmp_path, {"train": 3, val_name: 2}, classes=("a", "b"))
    splits = load_splits(tmp_path)
    assert splits.layout == "folders"
    assert len(splits.val) == 4
    assert all(s.path.parent.parent.name == val_name for s in splits.val)
    assert splits.test == [] and splits.evaluation is splits.val and splits.evaluation_name == "val"


def test_val_labels_follow_train_classes_when_val_lacks_one(tmp_path):
    make_image_folder(tmp_path, {"train": 2}, classes=("a", "b", "c"))
    make_image_folder(tmp_path, {"val": 2}, classes=("a", "c"))
    splits = load_splits(tmp_path)
    assert splits.classes == ["a", "b", "c"]
    # class c is label 2 everywhere, even though val has only two class folders
    assert sorted({(s.path.parent.name, s.label) for s in splits.val}) == [("a", 0), ("c", 2)]


def test_train_only_holds_out_stratified_val(tmp_path):
    make_image_folder(tmp_path, {"train": 10}, classes=("a", "b"))
    splits = load_splits(tmp_path, val_fraction=0.2, seed=3)
    assert splits.layout == "folders+val-split"
    assert splits.test == []
    assert sorted(s.label for s in splits.val) == [0, 0, 1, 1]
    assert len(splits.train) == 16
    assert not set(_paths(splits.train)) & set(_paths(splits.val))


def test_val_with_class_train_lacks(tmp_path):
    make_image_folder(tmp_path, {"train": 2}, classes=("a", "b"))
    make_image_folder(tmp_path, {"val": 2}, classes=("a", "b", "zebra"))
    with pytest.raises(TledgeError, match=r"val has classes that train does not: \['zebra'\]"):
        load_splits(tmp_path)


def test_test_with_class_train_lacks(tmp_path):
    make_image_folder(tmp_path, {"train": 2, "val": 1}, classes=("a", "b"))
    make_image_folder(tmp_path, {"test": 1}, classes=("a", "c"))
    with pytest.raises(TledgeError, match=r"test has classes that train does not: \['c'\]"):
        load_splits(tmp_path)


# --- load_splits: one folder of class folders, split by tledge ------------------------------------------------


def test_single_folder_split_is_stratified_and_disjoint(tmp_path):
    classes = ("a", "b", "c", "d")
    make_image_folder(tmp_path, {"": 20}, classes=classes)
    splits = load_splits(tmp_path, val_fraction=0.15, test_fraction=0.15, seed=0)
    assert splits.layout == "split"
    assert splits.classes == list(classes)
    parts = {"train": splits.train, "val": splits.val, "test": splits.test}
    for name, samples in parts.items():
        assert sorted({s.label for s in samples}) == [0, 1, 2, 3], f"{name} lacks a class"
    for label in range(4):
        counts = {name: sum(s.label == label for s in samples) for name, samples in parts.items()}
        assert counts == {"train": 14, "val": 3, "test": 3}  # round(20 * 0.15) = 3
    all_paths = [p for samples in parts.values() for p in _paths(samples)]
    assert len(all_paths) == len(set(all_paths)) == 80  # no file in two splits, none lost
    for s in splits.train + splits.val + splits.test:
        assert s.path.parent.name == classes[s.label]


def test_single_folder_split_is_seeded(tmp_path):
    make_image_folder(tmp_path, {"": 20}, classes=("a", "b", "c"))
    first = load_splits(tmp_path, seed=5)
    again = load_splits(tmp_path, seed=5)
    for part in ("train", "val", "test"):
        assert getattr(first, part) == getattr(again, part)
    # another seed draws other images (the odds of 3 classes x 2 held-out parts all matching are negligible)
    other = load_splits(tmp_path, seed=6)
    assert (_paths(other.val), _paths(other.test)) != (_paths(first.val), _paths(first.test))


def test_single_folder_without_test_fraction(tmp_path):
    make_image_folder(tmp_path, {"": 5}, classes=("a", "b"))
    splits = load_splits(tmp_path, val_fraction=0.2, test_fraction=0)
    assert splits.test == [] and splits.evaluation_name == "val"
    assert (len(splits.train), len(splits.val)) == (8, 2)


def test_smallest_splittable_class_gets_one_image_per_split(tmp_path):
    make_image_folder(tmp_path, {"": 3}, classes=("a", "b"))
    splits = load_splits(tmp_path, val_fraction=0.45, test_fraction=0.45)
    for samples in (splits.train, splits.val, splits.test):
        assert sorted(s.label for s in samples) == [0, 1]


# --- load_splits: errors ---------------------------------------------------------------------------------------


def test_missing_folder(tmp_path):
    with pytest.raises(TledgeError, match="does not exist") as err:
        load_splits(tmp_path / "nope")
    assert "nope" in str(err.value)


def test_file_instead_of_folder(tmp_path):
    f = tmp_path / "data.zip"
    f.write_bytes(b"PK")
    with pytest.raises(TledgeError, match="is not a folder") as err:
        load_splits(f)
    assert "data.zip" in str(err.value)


def test_loose_images_ask_for_class_subfolders(tmp_path):
    for i in range(4):
        _solid(tmp_path / f"{i}.png", (i, i, i))
    with pytest.raises(TledgeError) as err:
        load_splits(tmp_path)
    msg = str(err.value)
    assert "no class folders" in msg
    assert "4 images" in msg and "sub-folder per class" in msg


def test_empty_folder(tmp_path):
    with pytest.raises(TledgeError, match="no class folders") as err:
        load_splits(tmp_path)
    assert "sub-folder" not in str(err.value)  # no loose images: no hint about them


def test_single_class(tmp_path):
    make_image_folder(tmp_path, {"": 5}, classes=("only",))
    with pytest.raises(TledgeError, match="at least two") as err:
        load_splits(tmp_path)
    assert "'only'" in str(err.value)


def test_single_class_folders_layout(tmp_path):
    make_image_folder(tmp_path, {"train": 2, "val": 1}, classes=("only",))
    with pytest.raises(TledgeError, match="at least two"):
        load_splits(tmp_path)


def test_empty_class_folder(tmp_path):
    make_image_folder(tmp_path, {"": 3}, classes=("a", "b"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    with pytest.raises(TledgeError, match="holds no images") as err:
        load_splits(tmp_path)
    assert "empty" in str(err.value)


def test_too_few_images_to_split(tmp_path):
    make_image_folder(tmp_path, {"": 3}, classes=("a",))
    make_image_folder(tmp_path, {"": 2}, classes=("b",))
    with pytest.raises(TledgeError) as err:
        load_splits(tmp_path)
    msg = str(err.value)
    assert "'b' has 2 image(s)" in msg and "at least 3" in msg
    assert "train/ and val/" in msg  # says how to get around it


def test_bad_fractions(tmp_path):
    make_image_folder(tmp_path, {"": 3}, classes=("a", "b"))
    for val, test in ((0, 0.1), (0.6, 0.5), (1.0, 0)):
        with pytest.raises(TledgeError, match="fractions"):
            load_splits(tmp_path, val_fraction=val, test_fraction=test)


def test_hidden_and_non_image_files_are_ignored(tmp_path):
    make_image_folder(tmp_path, {"train": 2, "val": 1}, classes=("a", "b"))
    (tmp_path / "train" / "a" / ".DS_Store").write_bytes(b"\0")
    (tmp_path / "train" / "a" / "labels.csv").write_text("x")
    (tmp_path / "train" / ".cache").mkdir()
    _solid(tmp_path / "train" / "a" / "UPPER.JPG", (1, 2, 3))
    splits = load_splits(tmp_path)
    assert splits.classes == ["a", "b"]
    assert sorted(p.name for p in _paths(splits.train)) == ["000.png", "000.png", "001.png", "001.png", "UPPER.JPG"]


# --- load_image --------------------------------------------------------------------------------------------------


def test_solid_color_normalization(tmp_path):
    path = _solid(tmp_path / "orange.png", (255, 128, 0), size=(50, 30))
    x = load_image(path, Preprocess(size=16, resize=20))
    assert x.shape == (3, 16, 16) and x.dtype == np.float32
    assert x.flags["C_CONTIGUOUS"]
    # (pixel / 255 - ImageNet mean) / ImageNet std, by hand
    expected = [(1.0 - 0.485) / 0.229, (128 / 255 - 0.456) / 0.224, (0.0 - 0.406) / 0.225]
    assert expected == pytest.approx([2.248908, 0.205182, -1.804444], abs=1e-6)
    for c in range(3):
        np.testing.assert_allclose(x[c], expected[c], atol=1e-5)


def test_custom_mean_std(tmp_path):
    path = _solid(tmp_path / "gray.png", (51, 102, 204))
    x = load_image(path, Preprocess(size=8, resize=8, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)))
    # 51/255 = 0.2 -> (0.2-0.5)/0.5 = -0.6; 102/255 = 0.4 -> -0.2; 204/255 = 0.8 -> 0.6
    np.testing.assert_allclose(x[:, 3, 3], [-0.6, -0.2, 0.6], atol=1e-5)


@pytest.mark.parametrize("wide", [True, False])
def test_resize_shorter_side_then_center_crop(tmp_path, wide):
    # 200x100 (or 100x200): white in the middle half of the long side, black outside it. Shorter side -> 32 gives
    # 64x32; the centered 32x32 crop is exactly the middle half, so it must be all white. A squash to 32x32 or an
    # off-center crop would show black.
    long_, short = 200, 100
    img = np.zeros((short, long_, 3), np.uint8)
    img[:, 50:150] = 255
    if not wide:
        img = np.ascontiguousarray(img.transpose(1, 0, 2))
    path = tmp_path / "bar.png"
    Image.fromarray(img).save(path)
    pre = Preprocess(size=32, resize=32, mean=(0, 0, 0), std=(1, 1, 1), interpolation="nearest")
    x = load_image(path, pre)
    assert x.shape == (3, 32, 32)
    np.testing.assert_array_equal(x, np.ones_like(x))
    # with a larger resize the crop keeps only the center: the black must stay outside of it too
    x = load_image(path, Preprocess(size=16, resize=32, mean=(0, 0, 0), std=(1, 1, 1), interpolation="nearest"))
    np.testing.assert_array_equal(x, np.ones_like(x))


def test_crop_is_centered_on_the_image(tmp_path):
    # left half red, right half blue: the center crop of a square image shows both, left red, right blue
    img = np.zeros((40, 40, 3), np.uint8)
    img[:, :20, 0] = 255
    img[:, 20:, 2] = 255
    path = tmp_path / "halves.png"
    Image.fromarray(img).save(path)
    x = load_image(path, Preprocess(size=10, resize=20, mean=(0, 0, 0), std=(1, 1, 1), interpolation="nearest"))
    assert x.shape == (3, 10, 10)
    np.testing.assert_array_equal(x[0, :, :5], 1.0)
    np.testing.assert_array_equal(x[2, :, :5], 0.0)
    np.testing.assert_array_equal(x[0, :, 5:], 0.0)
    np.testing.assert_array_equal(x[2, :, 5:], 1.0)


def test_grayscale_becomes_three_channels(tmp_path):
    path = _solid(tmp_path / "g.png", 102, mode="L")
    pre = Preprocess(size=8, resize=8)
    x = load_image(path, pre)
    assert x.shape == (3, 8, 8)
    expected = [(0.4 - m) / s for m, s in zip(pre.mean, pre.std)]
    np.testing.assert_allclose(x[:, 0, 0], expected, atol=1e-5)


def test_rgba_drops_alpha(tmp_path):
    rgba = _solid(tmp_path / "a.png", (10, 20, 30, 0), mode="RGBA")
    rgb = _solid(tmp_path / "b.png", (10, 20, 30))
    pre = Preprocess(size=8, resize=8)
    x = load_image(rgba, pre)
    assert x.shape == (3, 8, 8)
    np.testing.assert_array_equal(x, load_image(rgb, pre))


def test_corrupt_image_names_the_file(tmp_path):
    path = tmp_path / "broken_photo.jpg"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes())
    with pytest.raises(TledgeError, match="cannot read image") as err:
        load_image(path, Preprocess(size=8, resize=8))
    assert str(path) in str(err.value)


def test_truncated_image(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(good)
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[:300])
    with pytest.raises(TledgeError, match="cut.png"):
        load_image(cut, Preprocess(size=8, resize=8))


def test_missing_image(tmp_path):
    with pytest.raises(TledgeError, match="does not exist"):
        load_image(tmp_path / "gone.png", Preprocess(size=8, resize=8))


# --- Preprocess -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"size": 4, "resize": 8}, "at least 8"),
        ({"size": 32, "resize": 16}, "resize (16) must be at least the input size (32)"),
        ({"std": (0.5, 0.0, 0.5)}, "std positive"),
        ({"mean": (0.5, 0.5)}, "3 values"),
        ({"std": (1, 1, 1, 1)}, "3 values"),
        ({"interpolation": "lanczos"}, "interpolation must be one of"),
    ],
)
def test_preprocess_validation(kwargs, words):
    with pytest.raises(TledgeError) as err:
        Preprocess(**kwargs)
    assert words in str(err.value)


def test_preprocess_dict_round_trip():
    pre = Preprocess(size=96, resize=110, mean=(0.1, 0.2, 0.3), std=(1, 2, 3), interpolation="bicubic")
    d = pre.to_dict()
    assert d["std"] == (1.0, 2.0, 3.0)
    # JSON turns tuples into lists; from_dict must give back an equal (hashable) Preprocess
    back = Preprocess.from_dict({k: list(v) if isinstance(v, tuple) else v for k, v in d.items()})
    assert back == pre and hash(back) == hash(pre)
    assert back.input_shape == (3, 96, 96)


# --- iter_batches / load_array ------------------------------------------------------------------------------------


def test_iter_batches_keeps_order_and_labels(tmp_path):
    samples = [Sample(_solid(tmp_path / f"{i}.png", (i * 20, 0, 0)), label=i % 3) for i in range(10)]
    pre = Preprocess(size=8, resize=8, mean=(0, 0, 0), std=(1, 1, 1))
    batches = list(iter_batches(samples, pre, batch_size=4, workers=3))
    assert [x.shape for x, _ in batches] == [(4, 3, 8, 8), (4, 3, 8, 8), (2, 3, 8, 8)]
    assert all(x.dtype == np.float32 and y.dtype == np.int64 for x, y in batches)
    labels = np.concatenate([y for _, y in batches])
    np.testing.assert_array_equal(labels, [i % 3 for i in range(10)])
    red = np.concatenate([x[:, 0, 0, 0] for x, _ in batches])
    np.testing.assert_allclose(red, [i * 20 / 255 for i in range(10)], atol=1e-6)


def test_load_array(tmp_path):
    samples = [Sample(_solid(tmp_path / f"{i}.png", (0, i * 30, 0)), label=i) for i in range(5)]
    pre = Preprocess(size=8, resize=8, mean=(0, 0, 0), std=(1, 1, 1))
    x, y = load_array(samples, pre, batch_size=2)
    assert x.shape == (5, 3, 8, 8)
    np.testing.assert_array_equal(y, np.arange(5))
    np.testing.assert_allclose(x[:, 1, 4, 4], [i * 30 / 255 for i in range(5)], atol=1e-6)
    x0, y0 = load_array([], pre)
    assert x0.shape == (0, 3, 8, 8) and x0.dtype == np.float32 and y0.shape == (0,) and y0.dtype == np.int64


def test_iter_batches_reports_bad_file(tmp_path):
    good = _solid(tmp_path / "good.png", (1, 1, 1))
    bad = tmp_path / "bad.png"
    bad.write_bytes(os.urandom(64))
    with pytest.raises(TledgeError, match="bad.png"):
        list(iter_batches([Sample(good, 0), Sample(bad, 1)], Preprocess(size=8, resize=8), batch_size=2))
