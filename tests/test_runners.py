"""One runner interface for every backend: made by name, described, skipped with a reason where it cannot run."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from tledge.bench.backends import BACKENDS, Variant, backend_unavailable, make_runner
from tledge.cli import app
from tledge.errors import TledgeError


def test_every_backend_says_whether_it_can_run_here():
    import importlib.util

    import onnxruntime

    from tledge.cuda import device_info

    providers = onnxruntime.get_available_providers()
    assert backend_unavailable("onnxruntime-cpu") is None
    cuda = backend_unavailable("onnxruntime-cuda")
    assert (cuda is None) == ("CUDAExecutionProvider" in providers)
    if cuda:
        assert "onnxruntime-gpu" in cuda  # says what to install
    import torch

    assert (backend_unavailable("torch-cuda") is None) == torch.cuda.is_available()
    assert backend_unavailable("torch-cpu") is None
    assert (backend_unavailable("tensorrt") is None) == (importlib.util.find_spec("tensorrt") is not None and device_info() is not None)
    assert (backend_unavailable("openvino-cpu") is None) == (importlib.util.find_spec("openvino") is not None)
    assert "unknown backend" in backend_unavailable("mxnet")
    with pytest.raises(TledgeError, match="unknown backend"):
        Variant("x", "m.onnx", "mxnet")


def test_onnxruntime_and_torch_runners_agree_and_describe_themselves(tiny_pipeline):
    from tledge.export.onnx_io import read_metadata

    shape = read_metadata(tiny_pipeline / "model.fp32.onnx")["preprocess"]
    x = np.random.default_rng(0).normal(0, 1, (2, 3, shape["size"], shape["size"])).astype(np.float32)
    ort = make_runner(Variant("fp32", tiny_pipeline / "model.fp32.onnx", "onnxruntime-cpu", {"threads": 1}))
    torch_runner = make_runner(Variant("torch", tiny_pipeline / "model.pt", "torch-cpu"))
    np.testing.assert_allclose(ort(x), torch_runner(x), atol=1e-4, rtol=1e-3)
    assert ort.describe()["backend"] == "onnxruntime-cpu" and ort.describe()["threads"] == 1
    assert torch_runner.describe()["backend"] == "torch-cpu" and torch_runner.describe()["runtime"].startswith("torch ")
    ort.close()
    torch_runner.close()
    with pytest.raises(TledgeError, match="does not exist"):
        make_runner(Variant("gone", tiny_pipeline / "nope.onnx"))
    if backend_unavailable("onnxruntime-cuda"):
        with pytest.raises(TledgeError, match="cannot run here"):
            make_runner(Variant("gpu", tiny_pipeline / "model.fp32.onnx", "onnxruntime-cuda"))


def test_bench_measures_torch_beside_onnx_and_skips_what_cannot_run(tiny_pipeline, tiny_dataset, tmp_path):
    out = tmp_path / "bench"
    result = CliRunner().invoke(app, [
        "bench", str(tiny_pipeline / "model.fp32.onnx"), f"torch={tiny_pipeline / 'model.pt'}",
        f"engine={tiny_pipeline / 'model.fp32.onnx'}@tensorrt", "--data", str(tiny_dataset), "--out-dir", str(out), "--iterations", "10",
    ])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "bench.json").read_text())
    assert list(record["variants"]) == ["fp32", "torch"]
    assert record["variants"]["torch"]["backend"]["backend"] == "torch-cpu"
    assert record["variants"]["torch"]["agreement"] == 1.0  # the same weights, another runtime
    assert record["skipped"]["engine"]["backend"] == "tensorrt" and record["skipped"]["engine"]["reason"]
    assert "engine: skipped" in result.output  # on stderr, where CI logs show it
    assert set(BACKENDS) >= {"onnxruntime-cpu", "onnxruntime-cuda", "onnxruntime-tensorrt", "tensorrt", "torch-cpu", "torch-cuda"}


def test_openvino_runs_the_cpu_int8_model_as_onnx_runtime_does(tiny_pipeline, tiny_dataset, tmp_path):
    """The CPU INT8 file is plain Q/DQ ONNX: OpenVINO's int8 kernels run it to the same predictions, and `tledge bench`
    measures it beside ONNX Runtime's."""
    pytest.importorskip("openvino")
    from tledge.data.images import Preprocess, load_array
    from tledge.data.splits import splits_for
    from tledge.export.onnx_io import read_metadata

    pre = Preprocess.from_dict(read_metadata(tiny_pipeline / "model.int8.cpu.onnx")["preprocess"])
    x, _ = load_array(splits_for(tiny_dataset, tiny_pipeline).test, pre)
    ort = make_runner(Variant("ort", tiny_pipeline / "model.int8.cpu.onnx", "onnxruntime-cpu", {"threads": 1}))
    ov = make_runner(Variant("ov", tiny_pipeline / "model.int8.cpu.onnx", "openvino-cpu", {"threads": 1}))
    a, b = ort.run_batches(x), ov.run_batches(x)
    assert b.shape == a.shape and np.all(np.isfinite(b))
    assert np.mean(a.argmax(1) == b.argmax(1)) >= 0.9  # two runtimes' int8 rounding, not two models
    # the bound test_quantize puts on fused vs simulated: the tiny model's weights differ by CPU class, and 0.1 of the
    # logit spread was already 90% used here (VNNI and emulated AVX2 alike)
    assert np.abs(a - b).mean() <= 0.25 * np.abs(a - a.mean(1, keepdims=True)).mean()
    assert ov.describe()["backend"] == "openvino-cpu" and ov.describe()["runtime"].startswith("openvino ")
    with pytest.raises(TledgeError, match="does not exist"):
        make_runner(Variant("gone", tiny_pipeline / "nope.onnx", "openvino-cpu"))
    out = tmp_path / "bench"
    result = CliRunner().invoke(app, [
        "bench", str(tiny_pipeline / "model.fp32.onnx"), str(tiny_pipeline / "model.int8.cpu.onnx"),
        f"ov={tiny_pipeline / 'model.int8.cpu.onnx'}@openvino-cpu", "--data", str(tiny_dataset), "--out-dir", str(out),
        "--iterations", "10", "--threads", "1"])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "bench.json").read_text())
    assert list(record["variants"]) == ["fp32", "int8.cpu", "ov"]
    assert record["variants"]["ov"]["backend"]["backend"] == "openvino-cpu" and record["variants"]["ov"]["backend"]["threads"] == 1
    assert record["variants"]["ov"]["agreement"] >= 0.9
