"""Fine-tuning: feature extraction then validation-gated staged unfreezing, with frozen batch-norm statistics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_CLASSES

from tledge.data.images import Preprocess, load_array
from tledge.data.splits import load_splits
from tledge.errors import TledgeError
from tledge.models import create_model, get_spec, load_checkpoint
from tledge.train.finetune import FinetuneConfig, finetune, resolve_preprocess

TINY = "test_efficientnet_lite"
TINY_BLOCKS = 12


@pytest.fixture(scope="module")
def weights_file(tiny_weights) -> Path:
    return tiny_weights


def _config(data, out, weights, **kw) -> FinetuneConfig:
    base = dict(data=data, out=out, model=TINY, weights=str(weights), strategy="staged", unfreeze=(2,), epochs=4, patience=2, batch_size=16, lr=1e-2)
    base.update(kw)
    return FinetuneConfig(**base)


def _initial_state(weights) -> dict:
    model, _ = create_model(TINY, weights=str(weights), num_classes=len(TINY_CLASSES), seed=0)
    return model.state_dict()


@pytest.fixture(scope="module")
def run(tiny_dataset, weights_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("finetune")
    # Thawing 4 blocks at the same learning rate clearly helps on this data (val top-1 0.50 -> 0.61, loss 1.14 -> 0.81).
    record = finetune(_config(tiny_dataset, out, weights_file, unfreeze=(4,), lr_decay=1.0))
    return out, record


def test_writes_checkpoint_and_record(run, tiny_dataset):
    out, record = run
    assert (out / "model.pt").is_file() and (out / "finetune.json").is_file()
    on_disk = json.loads((out / "finetune.json").read_text())
    assert on_disk == json.loads(json.dumps(record))
    assert record["stage"] == "finetune" and record["checkpoint"] == "model.pt"
    assert record["config"]["unfreeze"] == [4] and record["config"]["model"] == TINY
    assert record["dataset"]["counts"] == {"train": 48, "val": 18, "test": 18}
    assert record["dataset"]["classes"] == sorted(TINY_CLASSES)
    assert record["model"]["blocks"] == TINY_BLOCKS
    assert Preprocess.from_dict(record["preprocess"]) == get_spec(TINY).preprocess
    model, meta = load_checkpoint(out / "model.pt")
    assert meta["arch"] == TINY and meta["classes"] == sorted(TINY_CLASSES)
    assert meta["extra"]["finetune"] == record["result"]
    assert record["model"]["parameters"] == sum(p.numel() for p in model.parameters())


def test_stages_start_with_feature_extraction(run):
    _, record = run
    stages = record["stages"]
    assert [s["name"] for s in stages] == ["feature-extraction", "unfreeze-top-4"]
    assert [s["trainable_blocks"] for s in stages] == [0, 4]
    # He-init weights learn on this data: unfreezing improves validation, so the thawed top trained in this run
    assert stages[0]["accepted"] is True and stages[1]["accepted"] is True, stages
    assert stages[1]["val_accuracy"] > stages[0]["val_accuracy"] > 1 / 3
    assert stages[0]["lr"] == pytest.approx(1e-2) and stages[1]["lr"] == pytest.approx(1e-2)  # lr * lr_decay**k, decay 1
    for s in stages:
        assert 1 <= s["epochs_run"] <= 4 and len(s["history"]) == s["epochs_run"]
        assert 1 <= s["best_epoch"] <= s["epochs_run"]
        best = s["history"][s["best_epoch"] - 1]
        assert best["val_accuracy"] == round(s["val_accuracy"], 5)
        assert max(h["val_accuracy"] for h in s["history"]) == best["val_accuracy"]
    kept = [s for s in stages if s["accepted"]]
    assert record["model"]["trainable_blocks"] == kept[-1]["trainable_blocks"]
    assert record["result"]["val_accuracy"] == round(kept[-1]["val_accuracy"], 5)


def test_batchnorm_statistics_are_unchanged(run, weights_file):
    out, _ = run
    before = _initial_state(weights_file)
    after = load_checkpoint(out / "model.pt")[0].state_dict()
    bn_keys = [k for k in before if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert len(bn_keys) == 3 * 31
    assert float(before["blocks.0.1.running_mean"].abs().sum()) > 0  # the weights file's statistics, not an init
    for k in bn_keys:
        assert torch.equal(before[k], after[k]), f"{k} changed during fine-tuning"


def test_blocks_outside_the_thawed_top_are_untouched(run, weights_file):
    out, record = run
    before = _initial_state(weights_file)
    after = load_checkpoint(out / "model.pt")[0].state_dict()
    frozen = [k for k in before if k.startswith("blocks.") and int(k.split(".")[1]) < TINY_BLOCKS - 4]
    assert frozen
    for k in frozen:
        assert torch.equal(before[k], after[k]), k
    # and training did happen: the new 3-class head is not the seeded init any more
    assert not torch.equal(before["head.weight"], after["head.weight"])
    assert record["stages"][1]["accepted"]
    for k in (f"blocks.{TINY_BLOCKS - 1}.0.weight", f"blocks.{TINY_BLOCKS - 2}._project_conv.weight"):
        assert not torch.equal(before[k], after[k]), f"{k} was thawed but did not train"


def test_reported_test_accuracy_is_the_checkpoints(run, tiny_dataset):
    out, record = run
    model, meta = load_checkpoint(out / "model.pt")
    splits = load_splits(tiny_dataset)
    x, y = load_array(splits.test, meta["preprocess"])
    with torch.inference_mode():
        predicted = model(torch.from_numpy(x)).argmax(1).numpy()
    assert record["result"]["test_accuracy"] == round(float(np.mean(predicted == y)), 5)


def test_from_scratch_run_trains_everything_including_batchnorm(tiny_dataset, tmp_path):
    """weights='none' (a from-scratch baseline): one stage trains every block and batch-norm statistics move."""
    record = finetune(FinetuneConfig(data=tiny_dataset, out=tmp_path, model=TINY, weights="none", unfreeze=(1, 3), epochs=3, batch_size=16))
    assert (tmp_path / "model.pt").is_file() and (tmp_path / "finetune.json").is_file()
    assert [s["name"] for s in record["stages"]] == ["from-scratch"]
    assert record["stages"][0]["trainable_blocks"] == TINY_BLOCKS == record["model"]["trainable_blocks"]
    assert record["model"]["weights"] == record["model"]["weights_source"] == "none"
    before = create_model(TINY, weights="none", num_classes=3, seed=0)[0].state_dict()
    after = load_checkpoint(tmp_path / "model.pt")[0].state_dict()
    assert not torch.equal(before["blocks.0.1.running_var"], after["blocks.0.1.running_var"])
    assert not torch.equal(before["blocks.1._depthwise_conv.weight"], after["blocks.1._depthwise_conv.weight"])
    # eval-mode logits depend on the image (precise batch-norm statistics, not the lagging running averages)
    x, _ = load_array(load_splits(tiny_dataset).val, get_spec(TINY).preprocess)
    model = load_checkpoint(tmp_path / "model.pt")[0]
    with torch.inference_mode():
        logits = model(torch.from_numpy(x))
    assert logits.std(0).mean() > 1e-3


def test_stage_that_does_not_improve_is_rejected(tiny_dataset, weights_file, tmp_path):
    # lr_decay 1e-9 gives the unfreeze stage an lr of 1e-11, which cannot move validation by more than rounding
    # noise; a stage must beat the previous one by more than noise to be kept.
    cfg = dict(model=TINY, weights=str(weights_file), strategy="staged", epochs=2, patience=1, batch_size=16, lr=1e-2)
    record = finetune(FinetuneConfig(data=tiny_dataset, out=tmp_path / "rejected", unfreeze=(4,), lr_decay=1e-9, **cfg))
    stages = record["stages"]
    assert [s["name"] for s in stages] == ["feature-extraction", "unfreeze-top-4"]
    assert stages[0]["accepted"] is True and stages[1]["accepted"] is False
    assert stages[1]["lr"] == pytest.approx(1e-11)
    assert record["model"]["trainable_blocks"] == 0
    assert record["result"]["val_loss"] == round(stages[0]["val_loss"], 5)

    before = create_model(TINY, weights=str(weights_file), num_classes=3, seed=0)[0].state_dict()
    after = load_checkpoint(tmp_path / "rejected" / "model.pt")[0].state_dict()
    thawed = [k for k in before if k.startswith("blocks.") and int(k.split(".")[1]) >= TINY_BLOCKS - 4]
    assert any(k.endswith("_bn2.bias") for k in thawed)  # zero-initialized: even a 1e-11 step would show in them
    for k in (k for k in before if k.startswith("blocks.")):  # the thawed ones included: the stage was thrown away
        assert torch.equal(before[k], after[k]), k

    # the saved head is feature extraction's: the same as a run that never unfreezes
    only_fe = finetune(FinetuneConfig(data=tiny_dataset, out=tmp_path / "fe", unfreeze=(), **cfg))
    assert [s["name"] for s in only_fe["stages"]] == ["feature-extraction"]
    fe = load_checkpoint(tmp_path / "fe" / "model.pt")[0].state_dict()
    assert not torch.equal(fe["head.bias"], before["head.bias"])
    for k in ("head.weight", "head.bias"):
        torch.testing.assert_close(after[k], fe[k], rtol=1e-6, atol=1e-7)


def test_unfreeze_more_blocks_than_the_model_has(tiny_dataset, weights_file, tmp_path):
    with pytest.raises(TledgeError, match=f"has {TINY_BLOCKS} blocks; cannot unfreeze {TINY_BLOCKS + 1}"):
        finetune(_config(tiny_dataset, tmp_path / "out", weights_file, unfreeze=(2, TINY_BLOCKS + 1)))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "kw, words",
    [
        ({"unfreeze": (3, 2)}, "increasing positive"),
        ({"unfreeze": (0,)}, "increasing positive"),
        ({"unfreeze": (2, 2)}, "increasing positive"),
        ({"epochs": 0}, "epochs must be at least 1"),
        ({"batch_size": 0}, "batch_size must be at least 1"),
        ({"lr": 0.0}, "lr > 0"),
        ({"lr_decay": 0.0}, "lr_decay in (0, 1]"),
        ({"lr_decay": 1.5}, "lr_decay in (0, 1]"),
        ({"patience": -1}, "patience must be >= 0"),
    ],
)
def test_config_validation(tmp_path, kw, words):
    with pytest.raises(TledgeError) as err:
        FinetuneConfig(data=tmp_path, out=tmp_path, **kw)
    assert words in str(err.value)


def test_resolve_preprocess_keeps_the_crop_ratio():
    lite0 = get_spec("efficientnet_lite0").preprocess  # 224 crop of a 256 resize
    assert resolve_preprocess(lite0, None, None) == lite0
    p = resolve_preprocess(lite0, 128, None)
    assert (p.size, p.resize) == (128, 146)  # 128 * 256 / 224 = 146.3
    assert (p.mean, p.std, p.interpolation) == (lite0.mean, lite0.std, lite0.interpolation)
    p = resolve_preprocess(lite0, 112, None)
    assert (p.size, p.resize) == (112, 128)
    assert resolve_preprocess(lite0, 128, 128).resize == 128  # an explicit resize wins
    # a model without a crop (resize == size) stays without one at any size
    tiny = get_spec(TINY).preprocess
    assert (tiny.size, tiny.resize) == (32, 32)
    p = resolve_preprocess(tiny, 50, None)
    assert (p.size, p.resize) == (50, 50)
    b0 = resolve_preprocess(get_spec("efficientnet_b0").preprocess, 160, None)
    assert (b0.size, b0.resize, b0.interpolation) == (160, round(160 * 256 / 224), "bicubic")
    with pytest.raises(TledgeError, match="must be at least the input size"):
        resolve_preprocess(lite0, 128, 100)
