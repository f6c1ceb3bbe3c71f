"""Model registry, the TransferNet shape, pretrained EfficientNet-Lite0 mapping, checkpoints and weight files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tledge.data.images import Preprocess, load_image
from tledge.errors import TledgeError
from tledge.models import CHECKPOINT_FORMAT, TransferNet, create_model, get_spec, list_models, load_checkpoint, save_checkpoint

EXPECTED_MODELS = {
    "efficientnet_lite0", "resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large",
    "efficientnet_b0", "test_efficientnet_lite",
}
TINY = "test_efficientnet_lite"


def _perturb(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Give every parameter and BN buffer values no seeded init would produce (so a skipped load would show)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                noise = torch.rand(t.shape, generator=g) * 0.5
                t.copy_(noise + 0.75 if name.endswith("running_var") else t + noise - 0.25)
    return model


# --- registry ------------------------------------------------------------------------------------------------------


def test_registry_lists_the_models():
    names = [s.name for s in list_models()]
    assert EXPECTED_MODELS <= set(names)
    assert names == sorted(names)
    assert get_spec("efficientnet_lite0").offline is True
    assert get_spec("resnet18").offline is False


def test_unknown_model_lists_the_available_ones():
    with pytest.raises(TledgeError) as err:
        get_spec("efficientnet_lite9")
    msg = str(err.value)
    assert "unknown model 'efficientnet_lite9'" in msg
    for name in EXPECTED_MODELS:
        assert name in msg
    with pytest.raises(TledgeError, match="unknown model"):
        create_model("nope", weights="none")


@pytest.mark.parametrize("name", sorted({s.name for s in list_models()} | EXPECTED_MODELS))
def test_every_model_builds_as_transfernet(name):
    model, spec = create_model(name, weights="none", num_classes=5)
    assert isinstance(model, TransferNet) and spec.name == name
    assert model.head.out_features == 5
    assert len(model.blocks) >= 5
    # The big ones are fully convolutional with an adaptive pool: a small input keeps this quick.
    size = min(spec.preprocess.size, 64)
    model.eval()
    with torch.inference_mode():
        logits = model(torch.randn(2, 3, size, size))
    assert logits.shape == (2, 5)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", [TINY, "resnet18", "mobilenet_v3_small"])
def test_forward_from_matches_forward(name):
    model, _ = create_model(name, weights="none", num_classes=4, seed=3)
    model.eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        full = model(x)
        for k in range(len(model.blocks) + 1):
            part = model.forward_from(model.forward_blocks(x, 0, k), k)
            torch.testing.assert_close(part, full, rtol=0, atol=0, msg=f"split at block {k}")


def test_seed_makes_init_reproducible():
    a, _ = create_model(TINY, weights="none", num_classes=3, seed=0)
    b, _ = create_model(TINY, weights="none", num_classes=3, seed=0)
    c, _ = create_model(TINY, weights="none", num_classes=3, seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["head.weight"], sc["head.weight"])


def test_test_model_has_no_pretrained_weights():
    with pytest.raises(TledgeError, match="no pretrained weights"):
        create_model(TINY)


# --- pretrained EfficientNet-Lite0 ------------------------------------------------------------------------------


def test_lite0_checkpoint_maps_exactly():
    from tledge.models.efficientnet_lite import EfficientNetLite, LiteArch

    spec = get_spec("efficientnet_lite0")
    state = spec.load_pretrained()
    reference = EfficientNetLite(LiteArch())
    result = reference.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert set(state) == set(reference.state_dict())

    model, _ = create_model("efficientnet_lite0")  # pretrained, 1000 classes kept
    assert model.head.out_features == 1000
    torch.testing.assert_close(model.head.weight, state["_fc.weight"], rtol=0, atol=0)
    torch.testing.assert_close(model.blocks[0][0].weight, state["_conv_stem.weight"], rtol=0, atol=0)
    torch.testing.assert_close(model.blocks[-1][1].running_var, state["_bn1.running_var"], rtol=0, atol=0)
    # every tensor of the checkpoint is in the TransferNet, none left at random init
    ours = sorted(tuple(t.shape) + (float(t.double().sum()),) for t in model.state_dict().values() if t.is_floating_point())
    theirs = sorted(tuple(t.shape) + (float(t.double().sum()),) for t in state.values() if t.is_floating_point())
    assert ours == theirs


def test_lite0_classifies_real_photos(tmp_path):
    from PIL import Image
    from sklearn.datasets import load_sample_images

    model, spec = create_model("efficientnet_lite0")
    assert spec.preprocess == Preprocess(size=224, resize=256, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    photos = load_sample_images()
    batch = []
    for filename, pixels in zip(photos.filenames, photos.images):
        path = tmp_path / (Path(filename).stem + ".png")
        Image.fromarray(pixels).save(path)
        batch.append((Path(filename).stem, load_image(path, spec.preprocess)))
    model.eval()
    with torch.inference_mode():
        probs = model(torch.from_numpy(np.stack([x for _, x in batch]))).softmax(1)
    top1 = dict(zip([name for name, _ in batch], probs.argmax(1).tolist()))
    assert top1 == {"china": 698, "flower": 985}  # ImageNet 698 = palace, 985 = daisy
    # and confidently: measured 0.38 and 0.33 with the exact mapping; symmetric padding drops the daisy to 0.18
    assert probs[0, 698] > 0.3 and probs[1, 985] > 0.25


# --- checkpoints -----------------------------------------------------------------------------------------------------


def test_checkpoint_round_trip(tmp_path):
    model, spec = create_model(TINY, weights="none", num_classes=3, seed=11)
    _perturb(model)
    model.eval()
    pre = Preprocess(size=40, resize=48, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    path = save_checkpoint(tmp_path / "sub" / "model.pt", model, TINY, ["a", "b", "c"], pre, extra={"note": 1})
    assert path.is_file()
    payload = torch.load(path, map_location="cpu", weights_only=True)  # plain tensors and containers only
    assert payload["format"] == CHECKPOINT_FORMAT

    loaded, meta = load_checkpoint(path)
    assert not loaded.training
    assert meta["arch"] == TINY and meta["classes"] == ["a", "b", "c"] and meta["extra"] == {"note": 1}
    assert meta["preprocess"] == pre
    x = torch.randn(3, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    fresh, _ = create_model(TINY, weights="none", num_classes=3)
    with torch.inference_mode():
        assert not torch.allclose(fresh.eval()(x), model(x))  # the load did something


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(TledgeError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")

    original = get_spec(TINY).build()
    torch.save(original.state_dict(), tmp_path / "raw.pt")
    with pytest.raises(TledgeError, match="not a tledge checkpoint"):
        load_checkpoint(tmp_path / "raw.pt")

    model, _ = create_model(TINY, weights="none", num_classes=3)
    save_checkpoint(tmp_path / "ck.pt", model, TINY, ["a", "b", "c"], get_spec(TINY).preprocess)
    payload = torch.load(tmp_path / "ck.pt", weights_only=True)
    payload["arch"] = "mobilenet_v3_small"
    torch.save(payload, tmp_path / "wrong_arch.pt")
    with pytest.raises(TledgeError, match="does not match architecture mobilenet_v3_small"):
        load_checkpoint(tmp_path / "wrong_arch.pt")

    # a fine-tuned checkpoint is not a weights file for create_model: the message points to load_checkpoint
    with pytest.raises(TledgeError, match="load_checkpoint"):
        create_model(TINY, weights=str(tmp_path / "ck.pt"))


class _Payload:
    """Unpickling this would run ``__reduce__``'s callable: it writes a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def test_weights_are_loaded_with_weights_only(tmp_path):
    marker = tmp_path / "marker.txt"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "extra": _Payload(marker)}, evil)
    assert not marker.exists()
    with pytest.raises(TledgeError) as err:
        create_model(TINY, weights=str(evil))
    assert "weights_only" in str(err.value)
    assert not marker.exists(), "unpickling ran code from the weights file"
    with pytest.raises(TledgeError, match="weights_only"):
        load_checkpoint(evil)
    assert not marker.exists()
    # the file really does run code when unpickled without weights_only (the test would catch a regression)
    torch.load(evil, weights_only=False)
    assert marker.read_text() == "code ran"


def test_raw_state_dict_with_1000_class_head(tmp_path):
    torch.manual_seed(7)
    original = get_spec(TINY).build()  # the original architecture, ImageNet-sized head
    assert original._fc.out_features == 1000
    _perturb(original, seed=2)
    torch.save(original.state_dict(), tmp_path / "w.pt")
    model, _ = create_model(TINY, weights=str(tmp_path / "w.pt"), num_classes=3)
    assert model.head.out_features == 3
    torch.testing.assert_close(model.blocks[0][0].weight, original._conv_stem.weight, rtol=0, atol=0)
    torch.testing.assert_close(model.blocks[3]._project_conv.weight, original._blocks[2]._project_conv.weight, rtol=0, atol=0)
    torch.testing.assert_close(model.blocks[-1][1].running_mean, original._bn1.running_mean, rtol=0, atol=0)
    # {"state_dict": ...} wrappers are accepted as well, and the 1000-class head is kept when asked for
    torch.save({"state_dict": original.state_dict(), "epoch": 3}, tmp_path / "wrapped.pt")
    kept, _ = create_model(TINY, weights=str(tmp_path / "wrapped.pt"))
    torch.testing.assert_close(kept.head.weight, original._fc.weight, rtol=0, atol=0)


def test_state_dict_with_another_head_size_drops_the_head(tmp_path):
    original = get_spec(TINY).build()
    original._fc = torch.nn.Linear(original._fc.in_features, 10)
    _perturb(original, seed=4)
    torch.save(original.state_dict(), tmp_path / "w10.pt")
    model, _ = create_model(TINY, weights=str(tmp_path / "w10.pt"), num_classes=3)
    assert model.head.out_features == 3
    torch.testing.assert_close(model.blocks[0][0].weight, original._conv_stem.weight, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "mobilenet_v2"])
def test_state_dict_with_another_head_size_torchvision_sequential_head(tmp_path, name):
    original = get_spec(name).build()
    original.classifier[-1] = torch.nn.Linear(original.classifier[-1].in_features, 10)
    torch.save(original.state_dict(), tmp_path / "w10.pt")
    model, _ = create_model(name, weights=str(tmp_path / "w10.pt"), num_classes=3)
    assert model.head.out_features == 3
    torch.testing.assert_close(model.blocks[0][0].weight, original.features[0][0].weight, rtol=0, atol=0)


def test_state_dict_of_another_architecture(tmp_path):
    torch.save(get_spec("resnet18").build().state_dict(), tmp_path / "resnet.pt")
    with pytest.raises(TledgeError, match="do not fit this architecture") as err:
        create_model(TINY, weights=str(tmp_path / "resnet.pt"))
    assert "resnet.pt" in str(err.value)
    # same key names, other shapes: the full-size Lite0 into the tiny one
    torch.save(get_spec("efficientnet_lite0").build().state_dict(), tmp_path / "lite0.pt")
    with pytest.raises(TledgeError, match="missing or mis-shaped"):
        create_model(TINY, weights=str(tmp_path / "lite0.pt"))


def test_weights_file_errors(tmp_path):
    with pytest.raises(TledgeError, match="does not exist"):
        create_model(TINY, weights=str(tmp_path / "nope.pt"))
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(TledgeError, match="does not hold a state dict"):
        create_model(TINY, weights=str(tmp_path / "list.pt"))


def test_empty_weights_file(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(TledgeError, match="empty.pt"):
        create_model(TINY, weights=str(tmp_path / "empty.pt"))


def test_text_file_as_weights(tmp_path):
    (tmp_path / "notes.pt").write_text("hello world\n")
    with pytest.raises(TledgeError, match="notes.pt"):
        create_model(TINY, weights=str(tmp_path / "notes.pt"))


def test_torchvision_pretrained_offline_names_the_alternative(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # nothing cached: torchvision must download
    try:
        create_model("mobilenet_v3_small", weights="pretrained", num_classes=2)
    except TledgeError as exc:
        msg = str(exc)
        assert "mobilenet_v3_small" in msg
        assert "efficientnet_lite0" in msg and "--weights PATH" in msg
    else:
        pytest.skip("this machine can download torchvision weights; the offline message was not exercised")
