"""TensorRT calibration cache: the documented text format, version headers, and agreement with the Q/DQ model."""

from __future__ import annotations

import json
import struct

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from tledge.errors import TledgeError
from tledge.quant.calibration_cache import format_cache, parse_cache, retarget, scale_hex, version_code
from tledge.quant.quantize import QuantizeConfig, quantize


@pytest.mark.parametrize("version, code", [("8.5.2", 8502), ("8.6.1", 8601), ("8.6.2.3", 8602), ("10.0.1", 100001),
                                           ("10.3.0", 100300), ("10.14.1", 101401), ("10.3", 100300)])
def test_version_codes(version, code):
    assert version_code(version) == code


@pytest.mark.parametrize("version, message", [("11.0.0", "no implicit INT8"), ("8.4.3", "older than 8.5"), ("ten", "must look like")])
def test_versions_without_a_cache_are_refused(version, message):
    with pytest.raises(TledgeError, match=message):
        version_code(version)


def test_scale_is_the_float32_bit_pattern():
    # 0.0208... is 0x3caa64c3 in IEEE-754 single precision; zero prints as 0, like TensorRT's own caches
    assert scale_hex(0.0208) == "3caa64c3" and scale_hex(0.0) == "0" and scale_hex(1.0) == "3f800000"
    assert struct.unpack(">f", bytes.fromhex("3caa64c3"))[0] == pytest.approx(0.0208)


def test_format_parse_and_retarget_round_trip():
    amax = {"input": 2.6463, "/blocks.0/Conv_output_0": 6.0, "dead": 0.0}
    text = format_cache(amax, "8.5.2")
    lines = text.splitlines()
    assert lines[0] == "TRT-8502-EntropyCalibration2"
    assert lines[1:] == sorted(lines[1:]) and all(": " in line for line in lines[1:])
    header, scales = parse_cache(text)
    assert header == {"version_code": 8502, "calibrator": "EntropyCalibration2"}
    for name, value in amax.items():
        assert scales[name] == pytest.approx(np.float32(value / 127), rel=1e-7)
    moved = retarget(text, "10.3.0")
    assert moved.splitlines()[0] == "TRT-100300-EntropyCalibration2" and moved.splitlines()[1:] == lines[1:]
    assert parse_cache(moved)[1] == scales


@pytest.mark.parametrize("text, message", [
    ("", "first line must be"),
    ("input: 3c010204\n", "first line must be"),
    ("TRT-8502-EntropyCalibration2\ninput 3c010204\n", "line 2"),
    ("TRT-8502-EntropyCalibration2\ninput: zz\n", "line 2"),
])
def test_malformed_caches_are_errors(text, message):
    with pytest.raises(TledgeError, match=message):
        parse_cache(text)


def test_unwritable_ranges_are_errors():
    with pytest.raises(TledgeError, match="no finite range"):
        format_cache({"x": float("nan")}, "10.3.0")
    with pytest.raises(TledgeError, match="cannot be written"):
        format_cache({"a: b": 1.0}, "10.3.0")


def test_quantize_writes_a_cache_of_the_fp32_models_ranges(tiny_pipeline):
    """The implicit path builds from the FP32 ONNX (TensorRT rounds its weights itself), so the cache holds the FP32
    model's activation ranges, for every tensor the Q/DQ model quantizes, even where weight rounding moved the Q/DQ
    model's own scales a little."""
    from tledge.quant.statistics import STATS_FILE, CalibrationStats

    header, scales = parse_cache((tiny_pipeline / "calibration.cache").read_text())
    assert header == {"version_code": 100300, "calibrator": "EntropyCalibration2"}
    record = json.loads((tiny_pipeline / "quantize.json").read_text())["models"]["tensorrt"]
    assert record["weight_rounding"]["layers"] > 0  # the premise: the Q/DQ model's weights were chosen by output error
    ranges = CalibrationStats.load(tiny_pipeline / STATS_FILE).ranges(record["calibration_method"], symmetric=True)
    model = onnx.load(str(tiny_pipeline / "model.int8.qdq.onnx"))
    inits = {i.name: i for i in model.graph.initializer}
    activations = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits]
    assert len(activations) > 10
    for q in activations:
        assert q.input[0] in scales, f"{q.input[0]} is quantized in the Q/DQ model but has no cache scale"
        lo, hi = ranges[q.input[0]]
        assert scales[q.input[0]] == pytest.approx(max(abs(lo), abs(hi)) / 127, rel=1e-6), q.input[0]
        # the rounded model's activations differ from FP32's by a weight rounding step, not by a wrong tensor
        assert scales[q.input[0]] == pytest.approx(float(numpy_helper.to_array(inits[q.input[1]])), rel=0.25), q.input[0]
    assert "input" in scales and "logits" in scales
    assert record["calibration_cache"] == {"path": "calibration.cache", "trt_version": "10.3.0", "version_code": 100300,
                                           "calibrator": "EntropyCalibration2", "tensors": len(scales)}


def test_kept_float_layers_get_no_scale_and_the_version_is_chosen(tiny_pipeline, tiny_dataset, tmp_path):
    """Without weight rounding the Q/DQ model is the FP32 one behind Q/DQ: its scales are the cache's, to the bit."""
    conv = next(n for n in onnx.load(str(tiny_pipeline / "model.fp32.onnx")).graph.node if n.op_type == "Conv")
    quantize(QuantizeConfig(model=tiny_pipeline / "model.fp32.onnx", data=tiny_dataset, out_dir=tmp_path, num_images=12,
                            targets=("tensorrt",), keep_float=(conv.name,), trt_version="8.5.2", weight_rounding=False))
    header, scales = parse_cache((tmp_path / "calibration.cache").read_text())
    assert header["version_code"] == 8502
    assert conv.output[0] not in scales and "input" in scales
    model = onnx.load(str(tmp_path / "model.int8.qdq.onnx"))
    inits = {i.name: i for i in model.graph.initializer}
    activations = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits]
    assert len(activations) > 10
    for q in activations:
        assert scales[q.input[0]] == pytest.approx(float(numpy_helper.to_array(inits[q.input[1]])), rel=1e-6), q.input[0]


def test_a_trt_version_without_implicit_int8_fails_before_any_work(tiny_pipeline, tiny_dataset, tmp_path):
    with pytest.raises(TledgeError, match="no implicit INT8"):
        QuantizeConfig(model=tiny_pipeline / "model.fp32.onnx", data=tiny_dataset, out_dir=tmp_path, trt_version="11.0")
    # the CPU model alone needs no TensorRT version
    QuantizeConfig(model=tiny_pipeline / "model.fp32.onnx", data=tiny_dataset, out_dir=tmp_path, targets=("cpu",), trt_version="11.0")


def test_every_cpu_activation_scale_comes_from_tledges_ranges(tiny_pipeline, tiny_dataset, tmp_path):
    """quantize_static sees one batch only; each activation scale must still come from the ranges of all images.

    Without weight rounding the CPU model quantizes the FP32 model itself, whose statistics are in the folder (with
    it, the rounded copy's, which differ by a rounding step)."""
    from tledge.quant.statistics import STATS_FILE, CalibrationStats

    record = quantize(QuantizeConfig(model=tiny_pipeline / "model.fp32.onnx", data=tiny_dataset, out_dir=tmp_path, num_images=24,
                                     targets=("cpu",), fallback_layers=0, weight_rounding=False))
    # The statistics' extremes are exact (test_calib_stats checks them against the activations themselves).
    method = record["models"]["cpu"]["calibration_method"]
    ranges = CalibrationStats.load(tmp_path / STATS_FILE).ranges(method, symmetric=False)
    model = onnx.load(str(tmp_path / "model.int8.cpu.onnx"))
    inits = {i.name: i for i in model.graph.initializer}
    activations = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits]
    assert len(activations) > 10
    producer = {o: n for n in model.graph.node for o in n.output}
    for q in activations:
        source = producer.get(q.input[0])
        # the padded stem's input (cpu_kernels.pad_input_channels): the zero channel leaves the graph input's range
        tensor = source.input[0] if source is not None and source.op_type == "Pad" else q.input[0]
        name = tensor.removesuffix("_QuantizeLinear_Input")  # onnxruntime renames a quantized graph output
        lo, hi = ranges[name]
        expected = (max(hi, 0.0) - min(lo, 0.0)) / 255  # onnxruntime's uint8 asymmetric scale
        assert float(numpy_helper.to_array(inits[q.input[1]])) == pytest.approx(expected, rel=1e-5), q.input[0]
