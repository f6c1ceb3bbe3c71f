"""`tledge build --json` through the real console entry point (test_cli.py covers the table output)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

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


def test_build_stdout_is_the_json_summary(built):
    out, proc = built
    summary = json.loads(proc.stdout)  # --json: stdout holds only the summary, progress goes to stderr
    assert summary == json.loads((out / "report.json").read_text())
    assert "[1/5] finetune" in proc.stderr and "[5/5]" in proc.stderr


def test_one_class_dataset_is_refused(tmp_path):
    from conftest import make_image_folder

    data = make_image_folder(tmp_path / "one", {"": 4}, classes=("only",))
    proc = run_cli("build", "--data", data, "--out", tmp_path / "out", "--model", "test_efficientnet_lite", "--weights", "none", timeout=120)
    assert proc.returncode == 1 and "at least two" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.parametrize("command", ["quantize", "bench"])
def test_corrupt_onnx_is_one_line_error(command, tiny_dataset, tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_text("not a model")
    args = [command, bad, "--data", tiny_dataset, "--out-dir", tmp_path / "out"]
    proc = run_cli(*args, timeout=120)
    assert proc.returncode == 1 and "not a readable ONNX model" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "kwargs, message",
    [({"calib_method": "foo"}, "calibration method"), ({"num_calib": 0}, "num-calib"), ({"epochs": 0}, "epochs"),
     ({"image_size": 4}, "--image-size must be at least 8"), ({"calibration": "/no/such/calibration.json"}, "does not exist")],
)
def test_build_settings_fail_before_any_work(kwargs, message, tmp_path):
    from tledge.errors import TledgeError
    from tledge.pipeline.build import BuildConfig

    with pytest.raises(TledgeError, match=message):
        BuildConfig(out=tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()
