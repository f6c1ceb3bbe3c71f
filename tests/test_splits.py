"""Splits written once by the fine-tune, read by every later stage, and a dataset that changed is refused."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import make_image_folder

from tledge.artifacts import sha256_file
from tledge.data.splits import SPLITS_FILE, load_splits, read_splits, splits_for
from tledge.errors import TledgeError
from tledge.export.onnx_io import read_metadata


def test_finetune_writes_the_split_and_the_models_name_it(tiny_pipeline, tiny_dataset):
    record = json.loads((tiny_pipeline / SPLITS_FILE).read_text())
    listed = [rel for name in ("train", "val", "test") for rel, _, _ in record[name]]
    assert len(listed) == len(set(listed)) == 3 * (16 + 6 + 6)  # every image once
    rel, digest, label = record["train"][0]
    assert digest == sha256_file(tiny_dataset / rel) and record["classes"][label] in rel
    digest = sha256_file(tiny_pipeline / SPLITS_FILE)
    assert json.loads((tiny_pipeline / "finetune.json").read_text())["splits"]["sha256"] == digest
    assert read_metadata(tiny_pipeline / "model.fp32.onnx")["splits_sha256"] == digest
    assert read_metadata(tiny_pipeline / "model.int8.cpu.onnx")["splits_sha256"] == digest


def test_later_stages_use_the_recorded_split_not_their_own_seed(tmp_path):
    """One folder per class, fine-tuned with seed 1: a stage given no seed must still score on seed 1's test images."""
    from tledge.data.splits import write_splits

    data = make_image_folder(tmp_path / "data", {"": 20})
    seeded = load_splits(data, seed=1)
    write_splits(seeded, tmp_path / SPLITS_FILE, 1, 0.15, 0.15)
    used = splits_for(data, tmp_path, seed=0)  # what bench/quantize/export/gate call
    assert [s.path for s in used.test] == [s.path for s in seeded.test]
    assert [s.path for s in used.test] != [s.path for s in load_splits(data, seed=0).test]  # the trap it avoids


def test_a_changed_dataset_or_a_foreign_split_file_is_refused(tiny_pipeline, tiny_dataset, tmp_path):
    from tledge.bench.benchmark import BenchConfig, bench

    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    model = tiny_pipeline / "model.fp32.onnx"
    first = sorted((data / "val" / "circle").iterdir())[0]
    first.write_bytes((data / "val" / "square" / first.name).read_bytes())  # an image replaced
    with pytest.raises(TledgeError, match="no longer matches .* 1 changed"):
        bench(BenchConfig(models={"fp32": model}, data=data, out_dir=tmp_path / "b", iterations=1, rounds=1, warmup=0))
    shutil.rmtree(data)
    shutil.copytree(tiny_dataset, data)
    (data / "train" / "circle" / "extra.png").write_bytes((data / "train" / "circle" / "000.png").read_bytes())
    with pytest.raises(TledgeError, match="1 added"):
        read_splits(tiny_pipeline / SPLITS_FILE, data)

    # A splits.json that is not the one the model was trained on, and a model separated from its splits.json
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(model, other)
    with pytest.raises(TledgeError, match="copy it there"):
        splits_for(tiny_dataset, other, expected_sha256=read_metadata(model)["splits_sha256"])
    record = json.loads((tiny_pipeline / SPLITS_FILE).read_text())
    record["seed"] = 99
    (other / SPLITS_FILE).write_text(json.dumps(record))
    with pytest.raises(TledgeError, match="not the split the model was trained on"):
        splits_for(tiny_dataset, other, expected_sha256=read_metadata(model)["splits_sha256"])
