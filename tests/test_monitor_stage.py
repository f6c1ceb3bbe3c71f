"""`tledge monitor` end to end: the reference a build ships, a held-in set that must raise no alarm, and shifted
inputs made here (brightness, blur, another class mix), each detected and named; logs, operators' labels, exit codes."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import make_image_folder
from PIL import Image, ImageFilter
from typer.testing import CliRunner

from tledge.cli import app
from tledge.errors import TledgeError
from tledge.monitor import ModelTap, Monitor, MonitorConfig, ReferenceConfig, monitor, write_reference
from tledge.monitor.observe import embedding_output

PER_CLASS = 80  # enough images that PSI's sampling noise (about 9 x 2 / 240 on 10 bins) stays far below 0.25


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A tiny trained model with its export record and monitoring reference, signed as a bundle."""
    from _trained_tiny import train_tiny_checkpoint

    from tledge.export.onnx_export import ExportConfig, export_onnx
    from tledge.release.bundle import bundle

    root = tmp_path_factory.mktemp("monitor")
    data = make_image_folder(root / "data", {"train": 16, "val": PER_CLASS, "test": 6})
    out = root / "release"
    out.mkdir()
    train_tiny_checkpoint(data, out / "model.pt", steps=25)
    export_onnx(ExportConfig(checkpoint=out / "model.pt", out=out / "model.fp32.onnx", data=data))
    record = write_reference(ReferenceConfig(out_dir=out, data=data))
    bundle(out)
    return out, record


def _production(root, seed, only=None, edit=None):
    """Images from the same generator as the training set (another seed), optionally edited or of one class only."""
    folder = make_image_folder(root, {"": PER_CLASS}, seed=seed, classes=only or ("circle", "square", "stripes"))
    if edit is not None:
        for path in folder.rglob("*.png"):
            edit(Image.open(path)).save(path)
    return folder


def test_the_reference_is_small_signed_and_taps_the_classifier_input(released):
    import onnx

    out, record = released
    assert record["images"] == 3 * PER_CLASS and record["split"] == "val"
    assert record["bytes"] < 16_000  # KBs, not the images
    model = onnx.load(str(out / "model.fp32.onnx"))
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    flatten = next(n for n in model.graph.node if gemm.input[0] in n.output)
    assert record["embedding_tensor"] == embedding_output(model) in (gemm.input[0], flatten.input[0])  # the pooled features
    signed = {a["path"] for a in json.loads((out / "manifest.json").read_text())["artifacts"]}
    assert {"monitor.reference.json", "monitor.json"} <= signed


def test_held_in_images_raise_no_alarm(released, tmp_path):
    out, _ = released
    record = monitor(MonitorConfig(bundle=out, images=_production(tmp_path / "prod", seed=11), out=tmp_path / "verdict.json"))
    assert record["verdict"] == "ok", {k: (s["value"], s["status"]) for k, s in record["signals"].items()}
    assert record["moved"] == [] and record["source"]["count"] == 3 * PER_CLASS
    assert {"brightness", "contrast", "confidence", "class_mix", "embedding"} <= set(record["signals"])
    assert json.loads((tmp_path / "verdict.json").read_text())["verdict"] == "ok"


@pytest.mark.parametrize("shift, only, edit, signal", [
    ("brighter", None, lambda im: Image.eval(im, lambda v: min(255, v + 70)), "brightness"),
    ("blurred", None, lambda im: im.filter(ImageFilter.GaussianBlur(2)), "sharpness"),
    ("one class", ("circle",), None, "class_mix"),
])
def test_each_shift_is_detected_and_named(released, tmp_path, shift, only, edit, signal):
    out, _ = released
    record = monitor(MonitorConfig(bundle=out, images=_production(tmp_path / "prod", seed=12, only=only, edit=edit)))
    assert record["verdict"] == "drift" and signal in record["moved"], (shift, record["moved"])


def test_the_cli_exit_codes_follow_the_verdict(released, tmp_path):
    out, _ = released
    runner = CliRunner()
    ok = runner.invoke(app, ["monitor", str(out), "--images", str(_production(tmp_path / "ok", seed=13))])
    assert ok.exit_code == 0, ok.output
    assert "verdict: OK" in ok.output
    dark = _production(tmp_path / "dark", seed=13, edit=lambda im: Image.eval(im, lambda v: v // 3))
    drift = runner.invoke(app, ["monitor", str(out), "--images", str(dark), "--json"])
    assert drift.exit_code == 3, drift.output
    assert "brightness" in json.loads(drift.stdout)["moved"]


def test_a_prediction_log_and_operator_labels(released, tmp_path):
    out, _ = released
    prod = _production(tmp_path / "prod", seed=14)
    from tledge.data.images import Preprocess, load_image
    from tledge.export.onnx_io import read_metadata

    meta = read_metadata(out / "model.fp32.onnx")
    pre = Preprocess.from_dict(meta["preprocess"])
    tap = ModelTap(out / "model.fp32.onnx")
    files = sorted(prod.rglob("*.png"))
    logits, _ = tap(np.stack([load_image(p, pre) for p in files]))
    z = np.exp(logits - logits.max(1, keepdims=True))
    probs = z / z.sum(1, keepdims=True)
    log = tmp_path / "service.jsonl"
    log.write_text("".join(json.dumps({"predicted": meta["classes"][int(k)], "confidence": float(c)}) + "\n"
                           for k, c in zip(probs.argmax(1), probs.max(1))))
    assert monitor(MonitorConfig(bundle=out, log=log))["verdict"] == "ok"
    one_class = tmp_path / "one-class.jsonl"
    one_class.write_text("".join(json.dumps({"predicted": "circle", "confidence": 0.9}) + "\n" for _ in range(200)))
    assert "class_mix" in monitor(MonitorConfig(bundle=out, log=one_class))["moved"]

    # operators label ten images: the model's disagreement with them is counted per class
    labels = tmp_path / "labels.csv"
    chosen = files[::24]
    labels.write_text("file,label\n" + "".join(f"{p.relative_to(prod).as_posix()},{p.parent.name}\n" for p in chosen))
    overrides = monitor(MonitorConfig(bundle=out, images=prod, labels=labels))["overrides"]
    predicted = {p: meta["classes"][int(k)] for p, k in zip(files, probs.argmax(1))}
    wrong = sum(predicted[p] != p.parent.name for p in chosen)
    assert overrides["matched"] == len(chosen) and overrides["disagreements"] == wrong


def test_the_library_monitor_for_a_running_service_agrees_with_the_stage(released, tmp_path):
    from tledge.data.images import Preprocess, load_image
    from tledge.export.onnx_io import read_metadata

    out, _ = released
    prod = _production(tmp_path / "prod", seed=15, edit=lambda im: Image.eval(im, lambda v: min(255, v + 70)))
    pre = Preprocess.from_dict(read_metadata(out / "model.fp32.onnx")["preprocess"])
    tap, watch = ModelTap(out / "model.fp32.onnx"), Monitor(out / "monitor.reference.json")
    files = sorted(prod.rglob("*.png"))
    for start in range(0, len(files), 50):  # a service sees batches as they come
        x = np.stack([load_image(p, pre) for p in files[start:start + 50]])
        logits, embedding = tap(x)
        watch.observe(inputs=x, logits=logits, embeddings=embedding)
    verdict = watch.verdict()
    staged = monitor(MonitorConfig(bundle=out, images=prod))
    assert verdict["moved"] == staged["moved"] and "brightness" in verdict["moved"]
    for name, s in verdict["signals"].items():
        assert s["value"] == pytest.approx(staged["signals"][name]["value"], abs=1e-6), name


def test_bad_monitor_input_is_a_clear_error(released, tmp_path):
    out, _ = released
    with pytest.raises(TledgeError, match="one of the two"):
        MonitorConfig(bundle=out)
    with pytest.raises(TledgeError, match="holds no images"):
        (tmp_path / "empty").mkdir()
        monitor(MonitorConfig(bundle=out, images=tmp_path / "empty"))
    old = tmp_path / "old"
    shutil.copytree(out, old)
    (old / "monitor.reference.json").write_text((old / "monitor.reference.json").read_text().replace('"images"', '"images" ', 1))
    with pytest.raises(TledgeError, match="failed verification"):  # a reference changed after signing is never used
        monitor(MonitorConfig(bundle=old, images=_production(tmp_path / "prod", seed=16)))
