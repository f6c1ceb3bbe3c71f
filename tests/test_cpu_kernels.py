"""The CPU model's input channels are padded to four so ONNX Runtime's fast int8 convolution takes its stem, and
nothing the model computes changes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tledge.quant.cpu_kernels import pad_input_channels
from tledge.quant.cpu_weights import check_int16_saturation, make_weights_pair_safe
from tledge.quant.sensitivity import bypass_quantization, simulate
from tledge.runners.ort_runner import OrtRunner


def _stem_model(channels: int = 3, weights: np.ndarray | None = None, group: int = 1, readers: int = 1, levels: int = 127):
    """input -> Q -> DQ -> Conv (int8 per-channel weights, the largest on ``levels``) -> Q -> DQ -> output, and the
    FP32 model it came from."""
    rng = np.random.default_rng(0)
    out = channels if group > 1 else 8
    w = weights if weights is not None else rng.normal(0, 0.3, (out, channels // group, 3, 3)).astype(np.float32)
    scale = (np.abs(w).reshape(out, -1).max(1) / levels).astype(np.float32)
    q = np.clip(np.rint(w / scale[:, None, None, None]), -127, 127).astype(np.int8)
    b = rng.normal(0, 0.1, out).astype(np.float32)
    conv = dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2], group=group)
    inits = [numpy_helper.from_array(v, n) for n, v in (
        ("xs", np.array(0.02, np.float32)), ("xz", np.array(128, np.uint8)), ("ys", np.array(0.05, np.float32)),
        ("yz", np.array(100, np.uint8)), ("wq", q), ("ws", scale), ("wz", np.zeros(out, np.int8)), ("b", b))]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="input_QuantizeLinear"),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], axis=0),
             helper.make_node("Conv", ["xd", "w", "b"], ["c"], name="stem", **conv),
             helper.make_node("QuantizeLinear", ["c", "ys", "yz"], ["cq"]), helper.make_node("DequantizeLinear", ["cq", "ys", "yz"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", out, 8, 8])]
    if readers > 1:  # the graph input also read by a second node
        nodes.append(helper.make_node("Identity", ["x"], ["x_copy"]))
        outputs.append(helper.make_tensor_value_info("x_copy", TensorProto.FLOAT, ["N", channels, 16, 16]))
    graph = helper.make_graph(nodes, "stem", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", channels, 16, 16])], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    fp32 = helper.make_model(helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="stem", **conv)], "fp32",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", channels, 16, 16])], outputs[:1],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")]), opset_imports=[helper.make_opsetid("", 17)])
    fp32.ir_version = 8
    return model, fp32


def _x(channels: int = 3, n: int = 4) -> np.ndarray:
    return np.random.default_rng(1).uniform(-2, 2, (n, channels, 16, 16)).astype(np.float32)


def test_padding_the_stem_changes_no_output_on_the_fused_kernels_or_the_simulation():
    # weights within +-64: no pair can saturate int16 in either layout, so the fused kernels of every x86 CPU are exact
    model, _ = _stem_model(levels=64)
    before_fused, before_simulated = OrtRunner(model).run_batches(_x(), 1), simulate(model, _x())
    assert pad_input_channels(model) == ["stem"]
    weight = next(i for i in model.graph.initializer if i.name == "wq")
    assert list(weight.dims) == [8, 4, 3, 3] and not numpy_helper.to_array(weight)[:, 3].any()
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == [0, 3, 16, 16], "users still feed RGB"
    onnx.checker.check_model(model)
    np.testing.assert_array_equal(OrtRunner(model).run_batches(_x(), 1), before_fused)
    np.testing.assert_array_equal(simulate(model, _x()), before_simulated)


@pytest.mark.parametrize("case", ["four channels", "depthwise", "input read twice"])
def test_only_the_pattern_it_knows_is_rewritten(case):
    kwargs = {"four channels": {"channels": 4}, "depthwise": {"channels": 16, "group": 16}, "input read twice": {"readers": 2}}[case]
    model, _ = _stem_model(**kwargs)
    before = model.SerializeToString()
    assert pad_input_channels(model) == []
    assert model.SerializeToString() == before


def test_padded_weights_are_made_pair_safe_in_their_new_layout():
    """Padding pairs input channels 0 and 1 of each tap in the int16 step of x86 kernels without VNNI: weights that
    were safe as (tap, channel) triples can saturate there, and the portable model must move them."""
    w = np.zeros((8, 3, 3, 3), np.float32)
    w[:, 0], w[:, 1], w[:, 2] = 1.0, 0.9, -1.0  # channels 0 and 1 large and of one sign at every tap
    model, fp32 = _stem_model(weights=w)
    assert pad_input_channels(model) == ["stem"]
    assert check_int16_saturation(model), "the padded layout pairs the two large weights"
    moved = make_weights_pair_safe(model, fp32)
    assert moved > 0 and check_int16_saturation(model) == []
    # the fused kernels compute what the model means, on any x86 CPU (run under `qemu-x86_64 -cpu Haswell` for AVX2):
    # at most one output step of rounding apart from the simulated arithmetic
    x = np.random.default_rng(2).uniform(0, 2.5, (4, 3, 16, 16)).astype(np.float32)  # all positive: the worst case
    np.testing.assert_allclose(OrtRunner(model).run_batches(x, 1), simulate(model, x), atol=0.051)


def test_a_padded_layer_can_still_be_put_back_in_float():
    """Sensitivity and the fallback bypass a layer by giving it its FP32 weight: that weight must fit the padded input."""
    model, fp32 = _stem_model()
    pad_input_channels(model)
    restored = simulate(bypass_quantization(model, fp32, ["stem"]), _x())
    quantized = simulate(model, _x())
    reference = OrtRunner(fp32).run_batches(_x(), 4)
    assert np.abs(restored - reference).mean() < 0.5 * np.abs(quantized - reference).mean()


def test_bias_correction_of_a_padded_stem_is_that_of_the_unpadded_one():
    from onnx import ModelProto

    from tledge.quant.bias_correction import correct_bias

    model, fp32 = _stem_model()
    padded = ModelProto()
    padded.CopyFrom(model)
    pad_input_channels(padded)
    mean = {"x": np.array([0.3, -0.2, 0.5], np.float32)}
    correct_bias(model, fp32, mean)
    correct_bias(padded, fp32, mean)
    b_model = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "b"))
    b_padded = numpy_helper.to_array(next(i for i in padded.graph.initializer if i.name == "b"))
    b_fp32 = numpy_helper.to_array(next(i for i in fp32.graph.initializer if i.name == "b"))
    assert not np.allclose(b_model, b_fp32), "the correction moved the bias"
    np.testing.assert_allclose(b_padded, b_model, rtol=1e-6)


def test_openvino_gets_the_model_back_without_the_padding():
    """OpenVINO needs no padded stem and would run the Pad as a float op of its own: its runner drops it, which must
    give back exactly the model before the padding."""
    from tledge.runners.openvino_runner import drop_input_channel_padding

    model, _ = _stem_model(levels=64)
    original = model.SerializeToString()
    assert drop_input_channel_padding(model) == [], "nothing to undo"
    pad_input_channels(model)
    assert drop_input_channel_padding(model) == ["stem"]
    assert model.SerializeToString() == original


def test_padding_that_carries_weights_is_not_dropped():
    from tledge.runners.openvino_runner import drop_input_channel_padding

    model, _ = _stem_model(levels=64)
    pad_input_channels(model)
    weight = next(i for i in model.graph.initializer if i.name == "wq")
    w = numpy_helper.to_array(weight).copy()
    w[0, 3, 0, 0] = 1  # the fourth channel now matters: dropping it would change the outputs
    weight.CopyFrom(numpy_helper.from_array(w, "wq"))
    before = model.SerializeToString()
    assert drop_input_channel_padding(model) == []
    assert model.SerializeToString() == before


def test_openvino_runs_the_padded_model_as_the_unpadded_one(tmp_path):
    pytest.importorskip("openvino")
    from tledge.runners.openvino_runner import OpenVinoRunner

    model, _ = _stem_model(levels=64)
    onnx.save(model, tmp_path / "plain.onnx")
    pad_input_channels(model)
    onnx.save(model, tmp_path / "padded.onnx")
    plain, padded = OpenVinoRunner(tmp_path / "plain.onnx", threads=1), OpenVinoRunner(tmp_path / "padded.onnx", threads=1)
    assert "padding dropped before stem" in padded.describe()["graph"] and "graph" not in plain.describe()
    np.testing.assert_array_equal(padded.run_batches(_x()), plain.run_batches(_x()))


def test_openvino_runner_reads_what_onnx_cannot_as_before(tmp_path):
    """Looking for the padding must not stand between OpenVINO and a file it reads itself: a broken file is still
    OpenVINO's clear error, not onnx's parse exception."""
    pytest.importorskip("openvino")
    from tledge.errors import TledgeError
    from tledge.runners.openvino_runner import OpenVinoRunner

    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    with pytest.raises(TledgeError, match="OpenVINO cannot load"):
        OpenVinoRunner(broken)
