"""Calibration sets: stratified seeded sampling, sha256 pinning and the checks on reuse."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from conftest import make_image_folder

from tledge.data.splits import load_splits
from tledge.errors import TledgeError
from tledge.quant.calibration import CALIBRATION_FORMAT, load_calibration_set, sample_calibration_set

CLASSES = ["a", "b", "c"]
SHAPE = (3, 32, 32)


@pytest.fixture()
def data(tmp_path) -> Path:
    """train: 3 classes x 5 images; val: 3 x 1."""
    return make_image_folder(tmp_path / "data", {"train": 5, "val": 1}, classes=tuple(CLASSES))


def _write(definition: dict, path: Path) -> Path:
    path.write_text(json.dumps(definition))
    return path


def _definition(data: Path, num: int = 6, seed: int = 0) -> dict:
    return sample_calibration_set(load_splits(data), num, seed).to_dict(CLASSES, SHAPE)


def _class_of(rel: str) -> str:
    return Path(rel).parent.name


# --- sampling ---------------------------------------------------------------------------------------------------


def test_sampling_is_stratified_round_robin(tmp_path):
    data = make_image_folder(tmp_path / "d", {"train": 4, "val": 1}, classes=tuple(CLASSES))
    calib = sample_calibration_set(load_splits(data), 9, seed=0)
    assert len(calib.images) == 9
    assert sorted(_class_of(rel) for rel, _ in calib.images) == ["a"] * 3 + ["b"] * 3 + ["c"] * 3
    assert all(rel.startswith("train/") for rel, _ in calib.images)  # never val or test images
    assert calib.sampling == {"method": "stratified-round-robin", "split": "train", "requested": 9, "seed": 0}
    assert [rel for rel, _ in calib.images] == sorted(rel for rel, _ in calib.images)
    assert len({rel for rel, _ in calib.images}) == 9


def test_small_class_is_not_crowded_out(tmp_path):
    make_image_folder(tmp_path, {"train": 1, "val": 1}, classes=("small",))
    make_image_folder(tmp_path, {"train": 10, "val": 1}, classes=("big1", "big2"), seed=1)
    calib = sample_calibration_set(load_splits(tmp_path), 9, seed=0)
    counts = {}
    for rel, _ in calib.images:
        counts[_class_of(rel)] = counts.get(_class_of(rel), 0) + 1
    assert counts == {"small": 1, "big1": 4, "big2": 4}


def test_more_requested_than_available(data):
    calib = sample_calibration_set(load_splits(data), 100, seed=0)
    assert len(calib.images) == 15
    assert calib.sampling["requested"] == 100


def test_sampling_is_seeded(tmp_path):
    data = make_image_folder(tmp_path / "d", {"train": 12, "val": 1}, classes=tuple(CLASSES))
    splits = load_splits(data)
    first = sample_calibration_set(splits, 6, seed=3)
    assert sample_calibration_set(load_splits(data), 6, seed=3).images == first.images
    assert sample_calibration_set(splits, 6, seed=4).images != first.images
    # sampling must not reorder or consume the splits it was given
    assert load_splits(data).train == splits.train


def test_hashes_and_paths(data):
    calib = sample_calibration_set(load_splits(data), 6, seed=0)
    assert calib.root == data
    for (rel, digest), path in zip(calib.images, calib.paths):
        assert path == data / rel and path.is_file()
        assert digest == hashlib.sha256(path.read_bytes()).hexdigest()


def test_needs_an_image(data):
    with pytest.raises(TledgeError, match="at least one image"):
        sample_calibration_set(load_splits(data), 0, seed=0)


def test_definition_round_trip(data, tmp_path):
    definition = _definition(data)
    assert definition["format"] == CALIBRATION_FORMAT
    assert definition["classes"] == CLASSES and definition["input_shape"] == list(SHAPE)
    assert definition["count"] == 6 == len(definition["images"])
    path = _write(definition, tmp_path / "calibration.json")
    calib = load_calibration_set(path, data, CLASSES, SHAPE)
    assert calib.images == [(e["path"], e["sha256"]) for e in definition["images"]]
    assert calib.sampling == {**definition["sampling"], "definition": "calibration.json"}
    assert calib.root == data


# --- load_calibration_set: refusals -------------------------------------------------------------------------------


def test_modified_image(data, tmp_path):
    definition = _definition(data)
    rel = definition["images"][2]["path"]
    with open(data / rel, "ab") as f:
        f.write(b"\0")  # still a readable PNG, but not the pinned bytes
    path = _write(definition, tmp_path / "calib.json")
    with pytest.raises(TledgeError) as err:
        load_calibration_set(path, data, CLASSES, SHAPE)
    msg = str(err.value)
    assert f"{rel}: sha256 differs" in msg and "calib.json" in msg
    assert msg.count("sha256 differs") == 1  # only the changed one is blamed


def test_missing_image(data, tmp_path):
    definition = _definition(data)
    rel = definition["images"][0]["path"]
    (data / rel).unlink()
    with pytest.raises(TledgeError, match=f"{rel}: missing"):
        load_calibration_set(_write(definition, tmp_path / "c.json"), data, CLASSES, SHAPE)


def test_many_problems_are_summarized(data, tmp_path):
    definition = _definition(data, num=15)
    for entry in definition["images"]:
        entry["sha256"] = "0" * 64
    with pytest.raises(TledgeError, match="and 10 more"):
        load_calibration_set(_write(definition, tmp_path / "c.json"), data, CLASSES, SHAPE)


@pytest.mark.parametrize("bad", ["../outside.png", "train/a/../../../outside.png", "/etc/hostname"])
def test_paths_must_stay_inside_the_dataset(data, tmp_path, bad):
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"x")
    definition = _definition(data)
    digest = hashlib.sha256(b"x").hexdigest()
    definition["images"].append({"path": bad, "sha256": digest})
    with pytest.raises(TledgeError) as err:
        load_calibration_set(_write(definition, tmp_path / "c.json"), data, CLASSES, SHAPE)
    assert f"{bad}: paths must stay inside the dataset folder" in str(err.value)


def test_other_classes(data, tmp_path):
    path = _write(_definition(data), tmp_path / "c.json")
    with pytest.raises(TledgeError) as err:
        load_calibration_set(path, data, ["a", "b", "d"], SHAPE)
    msg = str(err.value)
    assert "made for classes ['a', 'b', 'c']" in msg and "the model has ['a', 'b', 'd']" in msg
    with pytest.raises(TledgeError, match="made for classes"):
        load_calibration_set(path, data, ["b", "a", "c"], SHAPE)  # same names, other label order


def test_other_input_shape(data, tmp_path):
    path = _write(_definition(data), tmp_path / "c.json")
    with pytest.raises(TledgeError) as err:
        load_calibration_set(path, data, CLASSES, (3, 64, 64))
    msg = str(err.value)
    assert "made for input (3, 32, 32)" in msg and "takes (3, 64, 64)" in msg
    assert "make a new one" in msg


@pytest.mark.parametrize(
    "content",
    ['{"format": "tledge.quantize/1", "images": []}', "[1, 2, 3]", "not json at all", '{"images": []}'],
)
def test_not_a_definition(data, tmp_path, content):
    path = tmp_path / "c.json"
    path.write_text(content)
    with pytest.raises(TledgeError) as err:
        load_calibration_set(path, data, CLASSES, SHAPE)
    msg = str(err.value)
    assert "c.json" in msg
    assert "not a tledge calibration definition" in msg or "not valid JSON" in msg


def test_missing_definition(data, tmp_path):
    with pytest.raises(TledgeError, match="does not exist"):
        load_calibration_set(tmp_path / "nope.json", data, CLASSES, SHAPE)


def test_empty_definition(data, tmp_path):
    definition = _definition(data)
    definition["images"] = []
    with pytest.raises(TledgeError, match="lists no images"):
        load_calibration_set(_write(definition, tmp_path / "c.json"), data, CLASSES, SHAPE)


def test_definition_checked_against_another_root(data, tmp_path):
    path = _write(_definition(data), tmp_path / "c.json")
    other = make_image_folder(tmp_path / "other", {"train": 5, "val": 1}, classes=tuple(CLASSES), seed=9)
    with pytest.raises(TledgeError, match="sha256 differs"):
        load_calibration_set(path, other, CLASSES, SHAPE)
