"""Weight rounding by output error: never worse than nearest rounding, scales kept, and reproduced by the quantizer."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from tledge.errors import TledgeError
from tledge.quant.quantize import QuantizeConfig, quantize
from tledge.quant.weight_rounding import LEVEL, round_channels, round_weights

FP32, QDQ = "model.fp32.onnx", "model.int8.qdq.onnx"


def _output_error(w, q, scale, gram, depthwise):
    e = q * scale[:, None] - w
    return np.einsum("cd,cde,ce->c", e, gram, e) if depthwise else np.einsum("cd,de,ce->c", e, gram, e)


@pytest.mark.parametrize("depthwise", [False, True])
def test_levels_lower_every_channels_output_error_and_keep_the_scale(depthwise):
    rng = np.random.default_rng(0)
    channels, inputs = 12, 9
    w = rng.normal(0, 0.2, (channels, inputs))
    scale = np.abs(w).max(1) / LEVEL
    # Correlated inputs (as neighbouring pixels are): where nearest rounding leaves most to gain.
    mix = rng.normal(size=(channels if depthwise else 1, inputs, inputs)) + 3 * np.eye(inputs)
    x = rng.normal(size=(channels if depthwise else 1, 400, inputs)) @ mix + 0.5
    gram = np.einsum("cli,clj->cij", x, x) / 400
    gram = gram if depthwise else gram[0]
    q, flips = round_channels(w, scale, gram, depthwise)
    nearest = np.clip(np.round(w / scale[:, None]), -LEVEL, LEVEL)
    before, after = _output_error(w, nearest, scale, gram, depthwise), _output_error(w, q, scale, gram, depthwise)
    assert flips > 0 and np.all(after <= before + 1e-15) and after.sum() < 0.9 * before.sum()
    assert np.all(np.abs(q - w / scale[:, None]) < 1 + 1e-9)  # each weight on one of its two neighbouring levels
    assert np.array_equal(np.abs(q).max(1), np.full(channels, LEVEL))  # so max |w| / 127 gives back the same scale


@pytest.fixture(scope="module")
def rounded(tiny_pipeline, tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("rounded")
    record = quantize(QuantizeConfig(model=tiny_pipeline / FP32, data=tiny_dataset, out_dir=out, num_images=12,
                                     targets=("tensorrt",), fallback_layers=0, weight_rounding=True, rounding_images=8))
    return out, record


def test_quantize_ships_the_chosen_levels_in_the_tensorrt_model(rounded, tiny_pipeline):
    out, record = rounded
    info = record["models"]["tensorrt"]["weight_rounding"]
    assert info["layers"] > 5 and 0 < info["flipped"] < info["weights"] and info["images"] == 8
    assert record["config"]["weight_rounding"] is True
    fp32 = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(tiny_pipeline / FP32)).graph.initializer}
    model = onnx.load(str(out / QDQ))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    changed = 0
    skipped = set(info["nearest_rounding"])  # too few input samples per weight: left to nearest rounding
    assert info["layers"] + len(skipped) == sum(n.op_type in ("Conv", "Gemm") for n in model.graph.node)
    for conv in (n for n in model.graph.node if n.op_type == "Conv"):
        dq = producer[conv.input[1]]
        q_node = producer[dq.input[0]]  # FP32 weights behind a Q -> DQ pair (TensorRT 8.x wants them so)
        weights, scale = inits[q_node.input[0]], inits[dq.input[1]]
        if conv.name in skipped:
            assert np.array_equal(weights, fp32[q_node.input[0]])
            continue
        levels = weights.reshape(len(weights), -1) / scale[:, None]
        assert np.allclose(levels, np.round(levels), atol=1e-3)  # already on the grid: the quantizer changes nothing
        original = fp32[q_node.input[0]].reshape(len(weights), -1)
        assert np.allclose(scale, np.abs(original).max(1) / LEVEL, rtol=1e-5)  # per-channel scales as nearest rounding has them
        nearest = np.round(original / scale[:, None])
        changed += int((np.round(levels) != nearest).sum())
    assert changed > 0  # some levels differ from nearest rounding


def test_the_fp32_model_itself_is_left_alone(tiny_pipeline):
    before = onnx.load(str(tiny_pipeline / FP32))
    model, info = round_weights(before, np.zeros((2, *[d.dim_value or 1 for d in before.graph.input[0].type.tensor_type.shape.dim][1:]), np.float32))
    assert model is not before and info["images"] == 2
    assert onnx.load(str(tiny_pipeline / FP32)).SerializeToString() == before.SerializeToString()


def test_rounding_images_must_be_positive(tmp_path):
    with pytest.raises(TledgeError, match="rounding_images"):
        QuantizeConfig(model=tmp_path / "m.onnx", data=tmp_path, out_dir=tmp_path, rounding_images=0)


def test_a_layer_kept_in_float_keeps_its_fp32_weights(tiny_pipeline, tiny_dataset, tmp_path):
    fp32 = onnx.load(str(tiny_pipeline / FP32))
    inits = {i.name: numpy_helper.to_array(i) for i in fp32.graph.initializer}
    depthwise = next(n for n in fp32.graph.node if n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute))
    quantize(QuantizeConfig(model=tiny_pipeline / FP32, data=tiny_dataset, out_dir=tmp_path, num_images=12, targets=("tensorrt",),
                            fallback_layers=0, keep_float=(depthwise.name,), weight_rounding=True, rounding_images=8))
    model = onnx.load(str(tmp_path / QDQ))
    node = next(n for n in model.graph.node if n.name == depthwise.name)
    got = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for name in node.input[1:]:
        assert np.array_equal(got[name], inits[name]), name  # not the rounded levels, not the corrected bias
