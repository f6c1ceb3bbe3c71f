"""Weight rounding by output error: never worse than nearest rounding, scales kept, and reproduced by the quantizer."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from tledge.errors import TledgeError
from tledge.quant.quantize import QuantizeConfig, quantize
from tledge.quant.weight_rounding import LEVEL, pair_partners, round_channels, round_weights

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


def _conv(channels_in: int, group: int = 1, op: str = "Conv"):
    attrs = {"group": group} if op == "Conv" else {"transB": 1}
    return onnx.helper.make_node(op, ["x", "w"], ["y"], **attrs)


def test_pair_partners_follow_the_x86_kernels_layout():
    # K runs tap major, input channel minor: a weight pairs with the next input channel at the same tap.
    four = pair_partners(_conv(4), (8, 4, 3, 3))
    assert all(four[0 * 9 + t] == 1 * 9 + t and four[3 * 9 + t] == 2 * 9 + t for t in range(9))
    # Three channels: the pairs cross taps (tap 0 channel 2 with tap 1 channel 0)...
    three = pair_partners(_conv(3), (8, 3, 3, 3))
    assert three[2 * 9 + 0] == 0 * 9 + 1 and three[0 * 9 + 1] == 2 * 9 + 0
    # ...unless the stem is padded to four channels: then channel 2 pairs with a zero, and nothing constrains it.
    padded = pair_partners(_conv(3), (8, 3, 3, 3), padded_channels=4)
    assert all(padded[2 * 9 + t] == -1 and padded[0 * 9 + t] == 1 * 9 + t for t in range(9))
    assert pair_partners(_conv(1, group=8), (8, 1, 3, 3)) is None  # depthwise: no int16 pair step
    gemm = pair_partners(_conv(0, op="Gemm"), (10, 5))
    assert list(gemm) == [1, 0, 3, 2, -1]  # an odd K pairs its last input with the kernel's padding zero


def test_pair_safe_levels_lower_the_output_error_and_never_saturate():
    from tledge.quant.saturation import pair_safe_scales, quantize_pair_safe, saturating_pairs

    rng = np.random.default_rng(1)
    channels, inputs = 16, 8  # a 1x1 convolution over 8 channels: K is the channel order
    # Large same-sign neighbours: nearest rounding would saturate, so scales narrow and pairs sit on the limit.
    sign = np.repeat(np.where(rng.random((channels, inputs // 2)) < 0.8, 1.0, -1.0), 2, axis=1)
    w = rng.uniform(0.5, 1.0, (channels, inputs)) * sign
    scale = pair_safe_scales(w)[0].astype(np.float64)
    start = quantize_pair_safe(w, scale).astype(np.float64)
    assert (np.abs(w).max(1) / scale < LEVEL - 0.5).any()  # some channels were narrowed
    mix = rng.normal(size=(inputs, inputs)) + 3 * np.eye(inputs)
    x = np.abs(rng.normal(size=(600, inputs)) @ mix)  # post-ReLU inputs, correlated
    gram = x.T @ x / 600
    partner = pair_partners(_conv(inputs), (channels, inputs, 1, 1))
    q, flips = round_channels(w, scale, gram, False, start=start, partner=partner)
    assert flips > 0 and not saturating_pairs(q).any()
    before, after = _output_error(w, start, scale, gram, False), _output_error(w, q, scale, gram, False)
    assert np.all(after <= before + 1e-15) and after.sum() < before.sum()
    # A pair moved onto the limit (70 + 70 -> 64 + 64): with uncorrelated inputs the error wants both back up, which
    # would saturate; the rule lets at most the sum of 128 stand.
    w2, s2, eye = np.array([[70.4, 70.4, 127.0, 0.0]]), np.ones(1), np.eye(4)
    start2 = quantize_pair_safe(w2, s2).astype(np.float64)
    assert list(start2[0, :2]) == [64, 64]
    free, _ = round_channels(w2, s2, eye, False, start=start2)
    assert saturating_pairs(free).any()
    safe, _ = round_channels(w2, s2, eye, False, start=start2, partner=np.array([1, 0, 3, 2]))
    assert not saturating_pairs(safe).any() and safe[0, :2].sum() == 128


def test_the_portable_cpu_model_ships_the_pair_safe_levels_it_chose(tiny_pipeline, tiny_dataset, tmp_path):
    import json

    from tledge.data.images import Preprocess, Sample, load_array
    from tledge.export.onnx_io import read_metadata
    from tledge.quant.cpu_weights import check_int16_saturation, make_weights_pair_safe

    record = quantize(QuantizeConfig(model=tiny_pipeline / FP32, data=tiny_dataset, out_dir=tmp_path, num_images=12,
                                     targets=("cpu",), fallback_layers=0, weight_rounding=True, rounding_images=8))
    info = record["models"]["cpu"]
    assert info["weight_rounding"]["grid"].startswith("pair-safe") and info["weight_rounding"]["flipped"] > 0
    model = onnx.load(str(tmp_path / "model.int8.cpu.onnx"))
    assert check_int16_saturation(model) == []
    fp32 = onnx.load(str(tiny_pipeline / FP32))
    # The same rounding on the same images, done here: the shipped int8 weights are its levels, exactly.
    images = [Sample(tiny_dataset / e["path"], 0) for e in json.loads((tmp_path / "calibration.json").read_text())["images"]]
    x, _ = load_array(images[:8], Preprocess.from_dict(read_metadata(fp32)["preprocess"]))
    chosen, again = round_weights(fp32, x, pair_safe=True)
    assert again["flipped"] == info["weight_rounding"]["flipped"]
    chosen_w = {i.name: numpy_helper.to_array(i) for i in chosen.graph.initializer}
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    compared = 0
    for node in (n for n in fp32.graph.node if n.op_type in ("Conv", "Gemm") and n.name not in again["nearest_rounding"]):
        shipped = next(n for n in model.graph.node if n.name == node.name)
        dq = producer[shipped.input[1]]
        levels, scale = inits[dq.input[0]], inits[dq.input[1]]
        levels = levels[:, : chosen_w[node.input[1]].shape[1]] if levels.ndim == 4 else levels  # the stem's padded channel
        expected = chosen_w[node.input[1]] / scale.reshape(-1, *[1] * (levels.ndim - 1))
        assert np.array_equal(levels, np.rint(expected)), node.name
        compared += 1
    assert compared >= 5
    # And they are not nearest rounding: re-rounding the FP32 weights at the model's own scales changes some.
    assert make_weights_pair_safe(model, fp32) > 0
