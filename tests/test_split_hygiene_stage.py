"""Split hygiene as the fine-tune applies it: checked before any training, recorded in finetune.json."""

from __future__ import annotations

import json
import shutil

import pytest

from tledge.errors import TledgeError
from tledge.train.finetune import FinetuneConfig, finetune


def _leaky_copy(tiny_dataset, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    leaked = sorted((data / "train" / "circle").iterdir())[0]
    shutil.copyfile(leaked, data / "test" / "circle" / "copy-of-a-train-image.png")
    return data, leaked


def test_an_image_in_two_splits_stops_the_finetune_before_training(tiny_dataset, tmp_path):
    data, leaked = _leaky_copy(tiny_dataset, tmp_path)
    with pytest.raises(TledgeError, match="more than one split") as err:
        finetune(FinetuneConfig(data=data, out=tmp_path / "out", model="test_efficientnet_lite", weights="none", epochs=1))
    assert f"train/circle/{leaked.name}" in str(err.value) and "test/circle/copy-of-a-train-image.png" in str(err.value)
    assert "--allow-duplicates" in str(err.value)
    assert not (tmp_path / "out" / "model.pt").exists()


def test_allowed_duplicates_are_recorded_and_warned_about(tiny_dataset, tmp_path):
    data, leaked = _leaky_copy(tiny_dataset, tmp_path)
    record = finetune(FinetuneConfig(data=data, out=tmp_path / "out", model="test_efficientnet_lite", weights="none", epochs=1,
                                     allow_duplicates=True))
    hygiene = json.loads((tmp_path / "out" / "finetune.json").read_text())["split_hygiene"]
    assert hygiene == record["split_hygiene"]
    assert [sorted(f["path"] for f in g["files"]) for g in hygiene["exact_across_splits"]] == [
        sorted(["test/circle/copy-of-a-train-image.png", f"train/circle/{leaked.name}"])]  # relative, as in splits.json
    assert any("byte-identical" in w for w in record["warnings"])
    assert hygiene["class_balance"]["counts"]["train"]["circle"] == 16
