"""The engine cost of a TensorRT Q/DQ model's float layers, estimated from the graph the quantizer wrote."""

from __future__ import annotations

import onnx
import pytest

from tledge.quant.engine_cost import describe_float_cost, estimate_float_cost
from tledge.quant.quantize import QuantizeConfig, quantize

QDQ, FP32 = "model.int8.qdq.onnx", "model.fp32.onnx"


def _conv_macs(fp32, name: str) -> int:
    """MACs per image of one Conv, from its attributes and the FP32 graph's inferred output shape."""
    inferred = onnx.shape_inference.infer_shapes(fp32)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in inferred.graph.value_info}
    node = next(n for n in fp32.graph.node if n.name == name)
    attrs = {a.name: a for a in node.attribute}
    group = attrs["group"].i if "group" in attrs else 1
    in_channels = next(v for v in list(inferred.graph.value_info) + list(inferred.graph.input) if v.name == node.input[0])
    c_in = in_channels.type.tensor_type.shape.dim[1].dim_value
    c_out, h, w = shapes[node.output[0]][1:]
    kh, kw = attrs["kernel_shape"].ints
    return c_out * h * w * (c_in // group) * kh * kw


@pytest.fixture(scope="module")
def kept(tiny_pipeline, tiny_dataset, tmp_path_factory):
    """The tiny model's TensorRT Q/DQ model with its stem and one middle convolution kept in float."""
    fp32 = onnx.load(str(tiny_pipeline / FP32))
    convs = [n for n in fp32.graph.node if n.op_type == "Conv"]
    stem = next(n for n in convs if n.input[0] == "input")
    middle = [n for n in convs if n.name != stem.name][len(convs) // 2]
    out = tmp_path_factory.mktemp("float_cost")
    record = quantize(QuantizeConfig(model=tiny_pipeline / FP32, data=tiny_dataset, out_dir=out, num_images=6,
                                     targets=("tensorrt",), keep_float=(stem.name, middle.name), fallback_layers=0))
    return fp32, onnx.load(str(out / QDQ)), stem.name, middle.name, record


def test_an_all_int8_model_costs_nothing(tiny_pipeline):
    cost = estimate_float_cost(onnx.load(str(tiny_pipeline / QDQ)))  # the fixture keeps every layer quantized
    assert cost["float_layers"] == 0 and cost["islands"] == 0 and cost["reformats"] == 0
    assert cost["macs_per_image"]["float"] == 0 and cost["macs_per_image"]["total"] > 0
    assert cost["relative_compute"] == 1.0
    assert "every weighted layer runs in INT8" in describe_float_cost(cost)


def test_float_layers_are_found_with_their_macs_and_reformats(kept):
    fp32, model, stem, middle, record = kept
    cost = estimate_float_cost(model)
    assert record["models"]["tensorrt"]["engine_cost"] == cost  # quantize.json states it for the model it wrote
    assert [layer["node"] for layer in cost["layers"]] == [stem, middle]
    assert cost["islands"] == 2  # the stem and the middle layer do not touch
    for layer in cost["layers"]:
        assert layer["macs_per_image"] == _conv_macs(fp32, layer["node"])
    float_macs = sum(layer["macs_per_image"] for layer in cost["layers"])
    assert cost["macs_per_image"]["float"] == float_macs
    assert cost["relative_compute"] == pytest.approx(1 + float_macs / cost["macs_per_image"]["total"], abs=1e-3)
    # The stem reads the float network input (no reformat in) and hands int8 on (one out); the middle layer
    # reads an int8 activation (one in) and hands its result back to the INT8 chain (at least one out).
    directions = [r["direction"] for r in cost["reformat_tensors"]]
    assert directions.count("int8 -> float") == 1 and directions.count("float -> int8") >= 2
    assert cost["reformat_elements_per_image"] == sum(r["elements_per_image"] for r in cost["reformat_tensors"]) > 0
    line = describe_float_cost(cost)
    assert "2 float layer(s) in 2 island(s)" in line and f"{cost['reformats']} reformat layer(s)" in line
