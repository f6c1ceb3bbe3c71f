"""Each pipeline stage on the tiny registered model: what it writes and the guarantees users rely on."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from tledge.errors import TledgeError
from tledge.runners import OrtRunner


# --- finetune ------------------------------------------------------------------------------------------------

# --- export --------------------------------------------------------------------------------------------------

def test_exported_graph_is_clean_for_tensorrt(tiny_pipeline):
    from tledge.export import read_metadata

    model = onnx.load(str(tiny_pipeline / "model.fp32.onnx"))
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]
    ops = {n.op_type for n in model.graph.node}
    assert not ops & {"Pad", "Shape", "Gather", "ConstantOfShape", "BatchNormalization"}
    pads = [list(a.ints) for n in model.graph.node if n.op_type == "Conv" for a in n.attribute if a.name == "pads"]
    assert [0, 0, 1, 1] in pads  # TensorFlow "SAME" on stride 2 lives in the Conv itself
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [3, 32, 32]
    meta = read_metadata(model)
    assert meta["classes"] == ["circle", "square", "stripes"] and meta["preprocess"]["size"] == 32


def test_onnx_matches_pytorch_at_several_batch_sizes(tiny_pipeline):
    from tledge.models import load_checkpoint

    model, _ = load_checkpoint(tiny_pipeline / "model.pt")
    runner = OrtRunner(tiny_pipeline / "model.fp32.onnx")
    x = np.random.default_rng(0).standard_normal((5, 3, 32, 32)).astype(np.float32)
    with torch.inference_mode():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(runner(x), expected, atol=1e-4)
    np.testing.assert_allclose(runner(x[:1]), expected[:1], atol=1e-4)
    parity = json.loads((tiny_pipeline / "export.json").read_text())["parity"]
    assert parity["max_abs_diff"] < 1e-4 and parity["top1_agreement"] == 1.0 and "test split" in parity["inputs"]


def test_failed_parity_writes_no_model(tiny_pipeline, tmp_path):
    from tledge.export import ExportConfig, export_onnx

    target = tmp_path / "model.onnx"
    with pytest.raises(TledgeError, match="disagrees with PyTorch"):
        export_onnx(ExportConfig(checkpoint=tiny_pipeline / "model.pt", out=target, atol=-1.0))
    assert list(tmp_path.iterdir()) == []


def _conv_graph(pad_mode: str = "constant", pad_value: float = 0.0):
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 2, 3, 3)).astype(np.float32), "w")
    pads = numpy_helper.from_array(np.array([0, 0, 0, 0, 0, 0, 1, 1], np.int64), "pads")
    value = numpy_helper.from_array(np.array(pad_value, np.float32), "value")
    nodes = [
        helper.make_node("Pad", ["x", "pads", "value"], ["padded"], mode=pad_mode),
        helper.make_node("Conv", ["padded", "w"], ["y"], kernel_shape=[3, 3], strides=[2, 2]),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w, pads, value])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model, x):
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_pad_merges_into_conv_without_changing_results():
    from tledge.export import fold_pads_into_convs

    model = _conv_graph()
    x = np.random.default_rng(1).standard_normal((1, 2, 8, 8)).astype(np.float32)
    before = _run(model, x)
    assert fold_pads_into_convs(model) == 1
    assert [n.op_type for n in model.graph.node] == ["Conv"]
    np.testing.assert_allclose(_run(model, x), before, atol=1e-6)


@pytest.mark.parametrize("mode, value", [("reflect", 0.0), ("constant", 1.0)])
def test_non_zero_padding_is_left_alone(mode, value):
    from tledge.export import fold_pads_into_convs

    model = _conv_graph(mode, value)
    assert fold_pads_into_convs(model) == 0 and [n.op_type for n in model.graph.node] == ["Pad", "Conv"]


# --- quantize ------------------------------------------------------------------------------------------------

def test_tensorrt_model_follows_tensorrt_rules(tiny_pipeline):
    from tledge.quantize import check_tensorrt_qdq

    model = onnx.load(str(tiny_pipeline / "model.int8.qdq.onnx"))
    assert check_tensorrt_qdq(model) == []
    inits = {i.name: i for i in model.graph.initializer}
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq
    for node in qdq:
        zp = inits[node.input[2]]
        assert zp.data_type == TensorProto.INT8 and not numpy_helper.to_array(zp).any()
    producers = {o: n for n in model.graph.node for o in n.output}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    # Every Conv reads quantized activations and weights.
    assert all(producers[c.input[0]].op_type == "DequantizeLinear" and producers[c.input[1]].op_type == "DequantizeLinear" for c in convs)
    # Conv -> ReLU6 (Clip) stays unbroken so TensorRT can fuse bias and activation into the convolution.
    clips = [n for n in model.graph.node if n.op_type == "Clip"]
    assert clips and all(producers[c.input[0]].op_type == "Conv" for c in clips)
    assert all(i.data_type != TensorProto.INT32 for i in model.graph.initializer)  # bias stays float


def test_cpu_model_uses_uint8_activations(tiny_pipeline):
    model = onnx.load(str(tiny_pipeline / "model.int8.cpu.onnx"))
    inits = {i.name: i for i in model.graph.initializer}
    activation_zps = {inits[n.input[2]].data_type for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits}
    assert activation_zps == {TensorProto.UINT8}


def test_checker_flags_what_tensorrt_rejects():
    from tledge.quantize import check_tensorrt_qdq

    def model_with(zp_array, scale=np.array(0.1, np.float32), axis=None, weight=False):
        inputs = ["w" if weight else "x", "s", "zp"]
        attrs = {"axis": axis} if axis is not None else {}
        node = helper.make_node("DequantizeLinear" if weight else "QuantizeLinear", inputs, ["y"], name="q", **attrs)
        inits = [numpy_helper.from_array(scale, "s"), numpy_helper.from_array(zp_array, "zp")]
        if weight:
            inits.append(numpy_helper.from_array(np.zeros((2, 2), np.int8), "w"))
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
        return helper.make_model(graph)

    assert check_tensorrt_qdq(model_with(np.array(0, np.int8))) == []
    assert "INT8" in check_tensorrt_qdq(model_with(np.array(0, np.uint8)))[0]
    assert "symmetric" in check_tensorrt_qdq(model_with(np.array(3, np.int8)))[0]
    assert "int32" in check_tensorrt_qdq(model_with(np.array(0, np.int32)))[0]
    assert "non-positive" in check_tensorrt_qdq(model_with(np.array(0, np.int8), scale=np.array(0.0, np.float32)))[0]
    per_channel = model_with(np.zeros(2, np.int8), scale=np.array([0.1, 0.2], np.float32), axis=1, weight=True)
    assert "axis 1" in check_tensorrt_qdq(per_channel)[0]


def test_int8_models_stay_close_to_fp32(tiny_pipeline, tiny_dataset):
    from tledge.data import Preprocess, load_array, load_splits

    pre = Preprocess(size=32, resize=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    x, _ = load_array(load_splits(tiny_dataset).test, pre)
    reference = OrtRunner(tiny_pipeline / "model.fp32.onnx")(x)
    for name in ("model.int8.qdq.onnx", "model.int8.cpu.onnx"):
        logits = OrtRunner(tiny_pipeline / name)(x)
        assert np.isfinite(logits).all()
        assert np.mean(logits.argmax(1) == reference.argmax(1)) >= 0.7, name
        assert np.abs(logits - reference).mean() < 0.25 * np.abs(reference).mean() + 1e-3, name


def test_entropy_calibration_is_not_min_max(tiny_pipeline, tiny_dataset):
    """Regression: quantize_static's entropy defaults (128 bins for 128 levels) silently equal min-max."""
    from tledge.data import Preprocess, load_array, load_splits
    from tledge.quantize import compute_ranges

    pre = Preprocess(size=32, resize=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    x, _ = load_array(load_splits(tiny_dataset).train[:24], pre)
    model = tiny_pipeline / "model.fp32.onnx"
    minmax = compute_ranges(model, "input", x, "minmax", symmetric=True)
    entropy = compute_ranges(model, "input", x, "entropy", symmetric=True)
    assert minmax.keys() == entropy.keys()
    amax = {k: max(abs(lo), abs(hi)) for k, (lo, hi) in minmax.items()}
    tighter = [k for k, (lo, hi) in entropy.items() if max(abs(lo), abs(hi)) < 0.95 * amax[k]]
    assert tighter, "entropy calibration clipped no tensor: it is behaving like min-max"


def test_reusing_calibration_json_reproduces_the_models(tiny_pipeline, tiny_dataset, tmp_path):
    from tledge.quantize import QuantizeConfig, quantize

    record = quantize(QuantizeConfig(model=tiny_pipeline / "model.fp32.onnx", data=tiny_dataset, out_dir=tmp_path,
                                     calibration=tiny_pipeline / "calibration.json", targets=("cpu",)))
    assert record["calibration"]["images"] == 24
    first = json.loads((tiny_pipeline / "calibration.json").read_text())["images"]
    assert json.loads((tmp_path / "calibration.json").read_text())["images"] == first
    original = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(tiny_pipeline / "model.int8.cpu.onnx")).graph.initializer}
    again = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(tmp_path / "model.int8.cpu.onnx")).graph.initializer}
    assert original.keys() == again.keys() and all(np.array_equal(original[k], again[k]) for k in original)


def test_keep_float_leaves_a_layer_unquantized(tiny_pipeline, tiny_dataset, tmp_path):
    from tledge.quantize import QuantizeConfig, quantize

    fp32 = onnx.load(str(tiny_pipeline / "model.fp32.onnx"))
    first_conv = next(n.name for n in fp32.graph.node if n.op_type == "Conv")
    quantize(QuantizeConfig(model=tiny_pipeline / "model.fp32.onnx", data=tiny_dataset, out_dir=tmp_path, num_images=12,
                            targets=("tensorrt",), keep_float=(first_conv,)))
    model = onnx.load(str(tmp_path / "model.int8.qdq.onnx"))
    producers = {o: n for n in model.graph.node for o in n.output}
    conv = next(n for n in model.graph.node if n.name == first_conv)
    assert conv.input[0] == "input" or producers[conv.input[0]].op_type != "DequantizeLinear"


def test_quantize_rejects_a_dataset_with_other_classes(tiny_pipeline, tmp_path):
    from conftest import make_image_folder

    from tledge.quantize import QuantizeConfig, quantize

    other = make_image_folder(tmp_path / "other", {"train": 4, "val": 2}, classes=("cat", "dog"))
    with pytest.raises(TledgeError, match="classes"):
        quantize(QuantizeConfig(model=tiny_pipeline / "model.fp32.onnx", data=other, out_dir=tmp_path / "q"))


# --- bench ---------------------------------------------------------------------------------------------------

def test_bench_top1_matches_an_independent_count(tiny_pipeline, tiny_dataset, tmp_path):
    from tledge.bench import BenchConfig, bench
    from tledge.data import Preprocess, load_array, load_splits

    models = {"fp32": tiny_pipeline / "model.fp32.onnx", "int8-cpu": tiny_pipeline / "model.int8.cpu.onnx"}
    record = bench(BenchConfig(models=models, data=tiny_dataset, out_dir=tmp_path, iterations=10, rounds=2, warmup=1, throughput_batch=4))
    pre = Preprocess(size=32, resize=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    x, y = load_array(load_splits(tiny_dataset).test, pre)
    ref = OrtRunner(models["fp32"])(x).argmax(1)
    cpu = OrtRunner(models["int8-cpu"])(x).argmax(1)
    v = record["variants"]
    assert v["fp32"]["top1"] == pytest.approx(np.mean(ref == y), abs=1e-5)
    assert v["int8-cpu"]["top1"] == pytest.approx(np.mean(cpu == y), abs=1e-5)
    assert v["int8-cpu"]["agreement"] == pytest.approx(np.mean(cpu == ref), abs=1e-5)
    assert v["fp32"]["latency_ms"]["samples"] == 10 and record["input_shape"] == [1, 3, 32, 32]


def test_bench_refuses_models_for_other_classes(tiny_pipeline, tmp_path):
    from conftest import make_image_folder

    from tledge.bench import BenchConfig, bench

    other = make_image_folder(tmp_path / "other", {"train": 4, "val": 2}, classes=("cat", "dog"))
    with pytest.raises(TledgeError, match="classes"):
        bench(BenchConfig(models={"fp32": tiny_pipeline / "model.fp32.onnx"}, data=other, out_dir=tmp_path))
