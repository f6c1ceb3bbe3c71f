"""Bias correction: after it, a quantized layer's outputs have the FP32 layer's mean, channel by channel."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tledge.cpu_isa import CPU_TARGETS
from tledge.quant.bias_correction import correct_bias
from tledge.quant.recipes import ArrayReader, CpuInt8, TensorRTQDQ
from tledge.quant.statistics import calibrate
from tledge.runners.ort_runner import OrtRunner


def conv_model(path, groups: int):
    """One Conv (no padding, so every output reads whole-image statistics) on 8 channels, as the exporter writes it."""
    rng = np.random.default_rng(0)
    cin = 8 // groups
    # Weights that int8 rounds with a systematic error: most sit just above a rounding boundary of their channel.
    w = rng.uniform(0.2, 1.0, (8, cin, 3, 3)).astype(np.float32)
    w[:, 0, 0, 0] = 1.0  # each channel's scale is 1/127
    w += np.float32(0.45 / 127)
    b = rng.normal(0, 0.1, 8).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "w", "b"], ["out"], name="conv", group=groups),
         helper.make_node("Relu", ["out"], ["logits"], name="relu")],
        "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 8, 12, 12])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return model


def conv_output_mean(model, x) -> np.ndarray:
    """Per-channel mean of the Conv's output (before the ReLU), run as the quantized arithmetic would."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    conv = next(n for n in m.graph.node if n.op_type == "Conv")
    m.graph.output.append(helper.make_tensor_value_info(conv.output[0], TensorProto.FLOAT, None))
    runner = OrtRunner(m, simulate_int8=True)
    return runner.session.run([conv.output[0]], {"input": x})[0].mean(axis=(0, 2, 3))


@pytest.mark.parametrize("groups", [1, 8])  # a full and a depthwise convolution
@pytest.mark.parametrize("recipe", [TensorRTQDQ(), CpuInt8(CPU_TARGETS["vnni"], "vnni")], ids=["tensorrt", "cpu"])
def test_corrected_layers_have_the_fp32_mean_per_channel(tmp_path, groups, recipe):
    fp32 = conv_model(tmp_path / "m.onnx", groups)
    x = (np.random.default_rng(1).uniform(0, 2, (32, 8, 12, 12))).astype(np.float32)  # inputs with a positive mean
    stats, _ = calibrate(tmp_path / "m.onnx", x, {"test": 1})
    recipe.prepare(fp32)
    recipe.quantize(tmp_path / "m.onnx", tmp_path / "q.onnx", ArrayReader("input", x[:8], 8), stats.ranges("minmax", recipe.symmetric_activations), ())
    quantized = onnx.load(str(tmp_path / "q.onnx"))
    reference = conv_output_mean(fp32, x)
    before = np.abs(conv_output_mean(quantized, x) - reference)

    summary = correct_bias(quantized, fp32, stats.channel_mean)
    after = np.abs(conv_output_mean(quantized, x) - reference)
    assert summary["layers"] == 1 and summary["largest_shift"] > 0
    assert before.mean() > 5 * after.mean(), (before, after)  # what is left is the activations' rounding
    # The corrected model still passes its runtime's checks and keeps its structure
    recipe.finish(quantized, fp32, ())


def test_layers_kept_in_float_are_not_corrected(tmp_path):
    fp32 = conv_model(tmp_path / "m.onnx", 1)
    x = np.random.default_rng(2).uniform(0, 2, (8, 8, 12, 12)).astype(np.float32)
    stats, _ = calibrate(tmp_path / "m.onnx", x, {"test": 1})
    recipe = TensorRTQDQ()
    recipe.quantize(tmp_path / "m.onnx", tmp_path / "q.onnx", ArrayReader("input", x, 8), stats.ranges("minmax", True), ("conv",))
    quantized = onnx.load(str(tmp_path / "q.onnx"))
    assert correct_bias(quantized, fp32, stats.channel_mean)["layers"] == 0


def test_quantize_records_bias_correction(tiny_pipeline, tiny_dataset, tmp_path):
    import shutil

    from tledge.quant.quantize import QuantizeConfig, quantize
    from tledge.quant.statistics import STATS_FILE

    shutil.copy(tiny_pipeline / STATS_FILE, tmp_path / STATS_FILE)
    record = quantize(QuantizeConfig(model=tiny_pipeline / "model.fp32.onnx", data=tiny_dataset, out_dir=tmp_path, bias_correction=True,
                                     calibration=tiny_pipeline / "calibration.json", fallback_layers=0))
    for target in ("tensorrt", "cpu"):
        assert record["models"][target]["bias_correction"]["layers"] > 5
    assert record["config"]["bias_correction"] is True
