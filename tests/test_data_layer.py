"""Image folders, splits, preprocessing and calibration sets, including every bad-input error a user can hit."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_image_folder
from PIL import Image

from tledge.calibration import load_calibration_set, sample_calibration_set
from tledge.data import Preprocess, iter_batches, load_image, load_splits
from tledge.errors import TledgeError


def test_folder_layout_with_test_split(tiny_dataset):
    splits = load_splits(tiny_dataset)
    assert splits.classes == ["circle", "square", "stripes"]
    assert (len(splits.train), len(splits.val), len(splits.test)) == (48, 18, 18)
    assert splits.evaluation is splits.test and splits.evaluation_name == "test"
    assert {s.label for s in splits.train} == {0, 1, 2}


def test_single_folder_is_split_stratified_and_seeded(tmp_path):
    root = make_image_folder(tmp_path, {"": 20})
    a, b = load_splits(root, seed=3), load_splits(root, seed=3)
    assert [s.path for s in a.train] == [s.path for s in b.train]
    parts = [set(s.path for s in part) for part in (a.train, a.val, a.test)]
    assert sum(map(len, parts)) == 60 and len(set.union(*parts)) == 60  # no image in two splits
    for part in (a.train, a.val, a.test):
        assert {s.label for s in part} == {0, 1, 2}  # every class in every split
    assert len(a.val) == len(a.test) == 9  # 15% of 20 per class, rounded
    c = load_splits(root, seed=4)
    assert [s.path for s in c.val] != [s.path for s in a.val]


def test_validation_folder_name_and_missing_val_is_carved_from_train(tmp_path):
    root = make_image_folder(tmp_path / "a", {"train": 10, "validation": 3})
    assert len(load_splits(root).val) == 9
    root = make_image_folder(tmp_path / "b", {"train": 10})
    splits = load_splits(root)
    assert splits.layout == "folders+val-split" and len(splits.val) > 0 and not splits.test
    assert not {s.path for s in splits.val} & {s.path for s in splits.train}
    assert splits.evaluation_name == "val"


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda p: p / "nope", "does not exist"),
        (lambda p: (p / "file.txt").write_text("x") and p / "file.txt", "not a folder"),
        (lambda p: make_image_folder(p, {"": 3}, classes=("only",)), "at least two"),
        (lambda p: (make_image_folder(p, {"": 3}), (p / "empty").mkdir(), p)[2], "holds no images"),
        (lambda p: (Image.new("RGB", (8, 8)).save(p / "loose.png"), p)[1], "one sub-folder per class"),
        (lambda p: make_image_folder(p, {"": 2}), "at least 3"),
        (lambda p: (make_image_folder(p, {"train": 4, "val": 2}), make_image_folder(p, {"val": 2}, classes=("alien",)), p)[2], "classes that train does not"),
    ],
    ids=["missing", "file", "one-class", "empty-class", "loose-images", "too-few-to-split", "unknown-val-class"],
)
def test_bad_layouts_are_clear_errors(tmp_path, build, message):
    with pytest.raises(TledgeError, match=message):
        load_splits(build(tmp_path))


def test_load_image_normalizes_exactly(tmp_path):
    path = tmp_path / "solid.png"
    Image.new("RGB", (50, 30), (255, 0, 51)).save(path)
    pre = Preprocess(size=16, resize=20, mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 0.5))
    x = load_image(path, pre)
    assert x.shape == (3, 16, 16) and x.dtype == np.float32
    np.testing.assert_allclose(x[:, 0, 0], [(1 - 0.5) / 0.25, (0 - 0.5) / 0.5, (0.2 - 0.5) / 0.5], atol=1e-6)


def test_load_image_center_crops_and_converts_modes(tmp_path):
    img = np.zeros((20, 40), np.uint8)
    img[:, 18:22] = 255  # a bright vertical bar in the middle of a wide grayscale image
    Image.fromarray(img, mode="L").save(tmp_path / "gray.png")
    pre = Preprocess(size=20, resize=20, mean=(0, 0, 0), std=(1, 1, 1))
    x = load_image(tmp_path / "gray.png", pre)
    assert x.shape == (3, 20, 20) and np.allclose(x[0], x[1])
    assert x[0, 10, 9:11].min() > 0.9 and x[0, 10, 0] == 0 and x[0, 10, 19] == 0  # the crop is centred
    Image.new("RGBA", (10, 10), (0, 0, 255, 0)).save(tmp_path / "rgba.png")
    assert load_image(tmp_path / "rgba.png", pre).shape == (3, 20, 20)


def test_corrupt_image_names_the_file(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 this is not a jpeg " * 10)
    with pytest.raises(TledgeError, match="broken.jpg"):
        load_image(bad, Preprocess(size=16, resize=16))


@pytest.mark.parametrize("kwargs", [dict(size=4, resize=4), dict(size=32, resize=16), dict(std=(1, 0, 1)), dict(interpolation="lanczos9")])
def test_preprocess_rejects_nonsense(kwargs):
    with pytest.raises(TledgeError):
        Preprocess(**kwargs)


def test_iter_batches_keeps_order_and_labels(tiny_dataset):
    splits = load_splits(tiny_dataset)
    pre = Preprocess(size=16, resize=16)
    batches = list(iter_batches(splits.val, pre, 5))
    assert [len(y) for _, y in batches] == [5, 5, 5, 3]
    assert np.concatenate([y for _, y in batches]).tolist() == [s.label for s in splits.val]
    np.testing.assert_array_equal(batches[1][0][0], load_image(splits.val[5].path, pre))


# --- calibration sets ----------------------------------------------------------------------------------------

def test_calibration_sampling_is_stratified_seeded_and_hashed(tiny_dataset):
    from tledge.artifacts import sha256_file

    splits = load_splits(tiny_dataset)
    a = sample_calibration_set(splits, 9, seed=1)
    assert a.images == sample_calibration_set(splits, 9, seed=1).images
    assert a.images != sample_calibration_set(splits, 9, seed=2).images
    per_class = [sum(rel.startswith(f"train/{c}/") for rel, _ in a.images) for c in splits.classes]
    assert per_class == [3, 3, 3]
    assert all(sha256_file(tiny_dataset / rel) == digest for rel, digest in a.images)
    assert len(sample_calibration_set(splits, 1000, seed=0).images) == 48  # capped by the training set


def _definition(tmp_path, tiny_dataset, **changes):
    import json

    splits = load_splits(tiny_dataset)
    spec = sample_calibration_set(splits, 6, seed=0).to_dict(splits.classes, (3, 32, 32))
    spec.update(changes)
    path = tmp_path / "calib.json"
    path.write_text(json.dumps(spec))
    return path, splits


def test_calibration_definition_round_trip(tmp_path, tiny_dataset):
    path, splits = _definition(tmp_path, tiny_dataset)
    calib = load_calibration_set(path, tiny_dataset, splits.classes, (3, 32, 32))
    assert len(calib.paths) == 6 and all(p.is_file() for p in calib.paths)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda spec: spec.update(classes=["a", "b", "c"]), "made for classes"),
        (lambda spec: spec.update(input_shape=[3, 224, 224]), "made for input"),
        (lambda spec: spec["images"][0].update(sha256="0" * 64), "sha256 differs"),
        (lambda spec: spec["images"][0].update(path="train/circle/missing.png"), "missing"),
        (lambda spec: spec["images"][0].update(path="../outside.png"), "inside the dataset folder"),
        (lambda spec: spec.update(format="something/else"), "not a tledge calibration definition"),
        (lambda spec: spec.update(images=[]), "lists no images"),
    ],
    ids=["classes", "input-shape", "changed-image", "missing-image", "escaping-path", "format", "empty"],
)
def test_calibration_definition_mismatches_are_errors(tmp_path, tiny_dataset, mutate, message):
    import json

    path, splits = _definition(tmp_path, tiny_dataset)
    spec = json.loads(path.read_text())
    mutate(spec)
    path.write_text(json.dumps(spec))
    with pytest.raises(TledgeError, match=message):
        load_calibration_set(path, tiny_dataset, splits.classes, (3, 32, 32))


def test_default_dataset_matches_the_pinned_calibration_set(tmp_path):
    """The offline default is reproducible: a fresh materialization has exactly the pinned images and hashes."""
    from pathlib import Path

    from tledge.build import DEFAULT_CALIBRATION, REPO_CALIBRATION_DIR
    from tledge.datasets import digits_dataset

    root = digits_dataset(tmp_path / "digits")
    splits = load_splits(root)
    assert splits.classes == [str(d) for d in range(10)]
    assert (len(splits.train), len(splits.val), len(splits.test)) == (1078, 359, 360)
    definition = Path(REPO_CALIBRATION_DIR) / DEFAULT_CALIBRATION
    calib = load_calibration_set(definition, root, splits.classes, (3, 128, 128))
    assert len(calib.images) == 256
    assert digits_dataset(tmp_path / "digits") == root  # second call reuses the tree
