"""`tledge build` through the real console entry point, on a tiny model and tiny generated images."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tledge.artifacts import sha256_file

CLI = [sys.executable, "-m", "tledge.cli"]


def run_cli(*args, timeout=600):
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def built(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("build")
    proc = run_cli(
        "build", "--data", tiny_dataset, "--out", out, "--model", "test_efficientnet_lite", "--weights", "none",
        "--epochs", "3", "--patience", "1", "--unfreeze", "2", "--num-calib", "12", "--bench-iterations", "10", "--json",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_build_writes_every_artifact(built):
    out, _ = built
    for name in ("model.pt", "model.fp32.onnx", "model.int8.qdq.onnx", "model.int8.cpu.onnx", "calibration.json",
                 "report.json", "report.md", "manifest.json", "finetune.json", "export.json", "quantize.json", "bench.json"):
        assert (out / name).is_file(), name
    assert not list(out.glob(".*partial")), "no temporary files may be left behind"


def test_build_stdout_is_the_json_summary(built):
    out, proc = built
    summary = json.loads(proc.stdout)  # --json: stdout holds only the summary, progress goes to stderr
    assert summary == json.loads((out / "report.json").read_text())
    assert "[1/5] finetune" in proc.stderr and "[5/5]" in proc.stderr


def test_report_has_accuracy_and_latency_per_variant(built, tiny_dataset):
    out, _ = built
    report = json.loads((out / "report.json").read_text())
    assert set(report["variants"]) == {"fp32", "int8-tensorrt-qdq", "int8-cpu"}
    assert report["evaluation"] == {"split": "test", "images": 18, "classes": 3}
    for name, v in report["variants"].items():
        assert 0.0 <= v["top1"] <= 1.0
        assert 0.0 <= v["agreement_with_reference"] <= 1.0
        lat = v["latency_ms"]
        assert lat["batch"] == 1 and 0 < lat["p50"] <= lat["p90"] <= lat["p99"]
    assert report["variants"]["fp32"]["agreement_with_reference"] == 1.0
    versions = report["machine"]["versions"]
    assert versions["onnxruntime"] and versions["torch"] and versions["onnx"]
    md = (out / "report.md").read_text()
    assert "| variant |" in md and "int8-cpu" in md and "**test** split" in md


def test_manifest_describes_the_files_truthfully(built):
    out, _ = built
    manifest = json.loads((out / "manifest.json").read_text())
    listed = {a["path"]: a for a in manifest["artifacts"]}
    on_disk = {p.name for p in out.iterdir() if p.is_file() and p.name != "manifest.json"}
    assert set(listed) == on_disk
    for name, entry in listed.items():
        assert entry["sha256"] == sha256_file(out / name)
        assert entry["bytes"] == (out / name).stat().st_size
    assert manifest["input"]["name"] == "input" and manifest["input"]["shape"] == ["batch", 3, 32, 32]
    assert manifest["input"]["dtype"] == "float32"
    assert manifest["classes"] == ["circle", "square", "stripes"]
    pre = manifest["preprocessing"]
    assert pre["center_crop"] == 32 and pre["mean"] == [0.5, 0.5, 0.5] and pre["std"] == [0.5, 0.5, 0.5]
    for package in ("torch", "onnx", "onnxruntime"):
        assert manifest["versions"][package]


def test_calibration_list_pins_training_images(built, tiny_dataset):
    out, _ = built
    calib = json.loads((out / "calibration.json").read_text())
    assert calib["count"] == 12 and len(calib["images"]) == 12
    for entry in calib["images"]:
        assert entry["path"].startswith("train/")
        assert sha256_file(tiny_dataset / entry["path"]) == entry["sha256"]


def test_user_error_is_one_line_and_exit_1(tmp_path):
    proc = run_cli("export", tmp_path / "missing.pt", "--out", tmp_path / "m.onnx", timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("tledge: error:") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_one_class_dataset_is_refused(tmp_path):
    from conftest import make_image_folder

    data = make_image_folder(tmp_path / "one", {"": 4}, classes=("only",))
    proc = run_cli("build", "--data", data, "--out", tmp_path / "out", "--model", "test_efficientnet_lite", "--weights", "none", timeout=120)
    assert proc.returncode == 1 and "at least two" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_bad_option_value_is_exit_1_with_message(tmp_path):
    proc = run_cli("build", "--unfreeze", "abc", "--out", tmp_path, timeout=120)
    assert proc.returncode == 1 and "--unfreeze" in proc.stderr


def test_every_command_has_help_with_an_example():
    from typer.main import get_command

    from tledge.cli import app

    group = get_command(app)
    assert {"build", "finetune", "export", "quantize", "bench", "bundle", "models"} <= set(group.commands)
    for name in group.commands:
        proc = run_cli(name, "--help", timeout=120)
        assert proc.returncode == 0, name
        assert "Examples" in proc.stdout and f"tledge {name}" in proc.stdout, name
