"""ONNX export: signature, parity with PyTorch, metadata, graph clean-up (constant folding, Pad->Conv) and failures."""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from _trained_tiny import trained_pipeline
from onnx import TensorProto, helper, numpy_helper

from tledge.errors import TledgeError
from tledge.export.onnx_export import ExportConfig, export_onnx, fold_constants, fold_pads_into_convs
from tledge.export.onnx_io import read_metadata

CLASSES = ["circle", "square", "stripes"]


@pytest.fixture(scope="module")
def trained(tiny_dataset, tmp_path_factory):
    return trained_pipeline(tiny_dataset, tmp_path_factory)


def _session(model_or_path) -> ort.InferenceSession:
    src = model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto) else str(model_or_path)
    return ort.InferenceSession(src, providers=["CPUExecutionProvider"])


def _test_images(data, pre, n=None):
    from tledge.data.images import load_array
    from tledge.data.splits import load_splits

    splits = load_splits(data)
    x, _ = load_array(splits.test[:n] if n else splits.test, pre)
    return x


def _leftovers(folder):
    return [name for name in os.listdir(folder) if name.endswith(".partial")]


# --- the exported model --------------------------------------------------------------------------------------


def test_opset_and_input_signature(tiny_pipeline):
    model = onnx.load(str(tiny_pipeline / "model.fp32.onnx"))
    assert [(o.domain, o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")] == [("", 17)]
    assert [i.name for i in model.graph.input] == ["input"]
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert len(dims) == 4
    assert dims[0].dim_param and not dims[0].HasField("dim_value"), "the batch axis must be symbolic"
    assert [d.dim_value for d in dims[1:]] == [3, 32, 32]
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    out = model.graph.output[0]
    assert out.name == "logits"
    odims = out.type.tensor_type.shape.dim
    assert odims[0].dim_param and odims[1].dim_value == 3


@pytest.mark.parametrize("which", ["tiny_pipeline", "trained"])
@pytest.mark.parametrize("batch", [1, 5])
def test_onnxruntime_matches_pytorch(which, batch, request, tiny_dataset):
    import torch

    from tledge.models import load_checkpoint

    folder = request.getfixturevalue(which)
    model, meta = load_checkpoint(folder / "model.pt")
    x = _test_images(tiny_dataset, meta["preprocess"], n=batch)
    assert x.shape == (batch, 3, 32, 32)
    with torch.inference_mode():
        expected = model(torch.from_numpy(x)).numpy()
    got = _session(folder / "model.fp32.onnx").run(None, {"input": x})[0]
    assert got.shape == (batch, 3)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_dynamic_batch_gives_the_same_logits_per_image(trained, tiny_dataset):
    from tledge.data.images import Preprocess

    pre = Preprocess.from_dict(read_metadata(trained / "model.fp32.onnx")["preprocess"])
    x = _test_images(tiny_dataset, pre, n=5)
    sess = _session(trained / "model.fp32.onnx")
    whole = sess.run(None, {"input": x})[0]
    one_by_one = np.concatenate([sess.run(None, {"input": x[i : i + 1]})[0] for i in range(5)])
    np.testing.assert_allclose(whole, one_by_one, rtol=1e-5, atol=1e-5)
    # The trained model's logits depend on the image (else the parity checks above would be vacuous).
    assert np.ptp(whole, axis=0).max() > 0.1


def test_metadata_describes_the_model(tiny_pipeline):
    from tledge.data.images import Preprocess
    from tledge.models import get_spec

    meta = read_metadata(tiny_pipeline / "model.fp32.onnx")
    assert meta["arch"] == "test_efficientnet_lite"
    assert meta["classes"] == CLASSES
    assert Preprocess.from_dict(meta["preprocess"]) == get_spec("test_efficientnet_lite").preprocess
    assert meta["input"] == "input" and meta["output"] == "logits" and meta["precision"] == "fp32"
    # read_metadata also takes a loaded ModelProto
    assert read_metadata(onnx.load(str(tiny_pipeline / "model.fp32.onnx"))) == meta


def test_read_metadata_of_a_foreign_model_is_a_user_error(tmp_path):
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), str(tmp_path / "foreign.onnx"))
    with pytest.raises(TledgeError, match="no tledge metadata"):
        read_metadata(tmp_path / "foreign.onnx")


def test_export_record_has_parity_fields(tiny_pipeline, trained):
    for folder in (tiny_pipeline, trained):
        record = json.loads((folder / "export.json").read_text())
        assert record["stage"] == "export"
        assert record["onnx"]["opset"] == 17 and record["onnx"]["path"] == "model.fp32.onnx"
        assert record["onnx"]["input"] == ["input", ["batch", 3, 32, 32], "float32"]
        parity = record["parity"]
        for key in ("inputs", "atol", "rtol", "max_abs_diff", "mean_abs_diff", "max_rel_diff", "top1_agreement", "batch_sizes"):
            assert key in parity, key
        assert 0 <= parity["mean_abs_diff"] <= parity["max_abs_diff"] < 1e-4
        assert parity["top1_agreement"] == 1.0
        assert parity["batch_sizes"] == [1, 8]
        assert "test split" in parity["inputs"] and "18 images" in parity["inputs"]


def test_graph_has_no_pad_and_no_shape_arithmetic(tiny_pipeline):
    from tledge.models import load_checkpoint
    from tledge.models.efficientnet_lite import SamePadConv2d

    model = onnx.load(str(tiny_pipeline / "model.fp32.onnx"))
    ops = [n.op_type for n in model.graph.node]
    for banned in ("Pad", "Shape", "Gather", "ConstantOfShape", "Concat", "Slice"):
        assert banned not in ops, banned
    asymmetric = []
    for node in model.graph.node:
        if node.op_type == "Conv":
            pads = next((list(a.ints) for a in node.attribute if a.name == "pads"), [0, 0, 0, 0])
            if pads[:2] != pads[2:]:
                asymmetric.append(pads)
    assert asymmetric, "stride-2 SAME convolutions must carry asymmetric pads after the merge"
    assert all(p[2] >= p[0] and p[3] >= p[1] for p in asymmetric), "TF SAME puts the extra pixel bottom/right"
    torch_model, _ = load_checkpoint(tiny_pipeline / "model.pt")
    same_convs = sum(isinstance(m, SamePadConv2d) for m in torch_model.modules())
    record = json.loads((tiny_pipeline / "export.json").read_text())
    assert record["onnx"]["pads_folded_into_conv"] == same_convs > 0


# --- fold_pads_into_convs on hand-built graphs -----------------------------------------------------------------


def _pad_conv_model(pads, mode="constant", value=None, conv_pads=None, pad_consumers=1):
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.asarray(pads, np.int64), "pads"),
             numpy_helper.from_array(rng.standard_normal((3, 2, 3, 3)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "B")]
    pad_inputs = ["X", "pads"]
    if value is not None:
        inits.append(numpy_helper.from_array(np.asarray(value, np.float32), "value"))
        pad_inputs.append("value")
    conv_attrs = {"strides": [2, 2]}
    if conv_pads is not None:
        conv_attrs["pads"] = conv_pads
    nodes = [helper.make_node("Pad", pad_inputs, ["P"], mode=mode, name="pad"),
             helper.make_node("Conv", ["P", "W", "B"], ["Y"], name="conv", **conv_attrs)]
    outputs = [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)]
    if pad_consumers == 2:
        nodes.append(helper.make_node("Relu", ["P"], ["R"], name="relu"))
        outputs.append(helper.make_tensor_value_info("R", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "pad_conv", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2, 2, 6, 6])], outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


X = np.random.default_rng(1).standard_normal((2, 2, 6, 6)).astype(np.float32)


def _conv_pads(model):
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    return next((list(a.ints) for a in conv.attribute if a.name == "pads"), None)


@pytest.mark.parametrize("pads, conv_pads, expected", [
    ([0, 0, 0, 0, 0, 0, 1, 1], None, [0, 0, 1, 1]),       # TF SAME, stride 2, even input: bottom/right only
    ([0, 0, 1, 2, 0, 0, 1, 0], None, [1, 2, 1, 0]),       # top 1, left 2, bottom 1, right 0
    ([0, 0, 0, 0, 0, 0, 1, 1], [1, 1, 1, 1], [1, 1, 2, 2]),  # added to the Conv's own pads
])
def test_fold_pad_into_conv_is_numerically_identical(pads, conv_pads, expected):
    model = _pad_conv_model(pads, conv_pads=conv_pads)
    before = _session(model).run(None, {"X": X})[0]
    folded = copy.deepcopy(model)
    assert fold_pads_into_convs(folded) == 1
    assert [n.op_type for n in folded.graph.node] == ["Conv"]
    conv = folded.graph.node[0]
    assert conv.input[0] == "X"
    assert _conv_pads(folded) == expected
    assert "pads" not in {i.name for i in folded.graph.initializer}, "the unused pads constant is dropped"
    after = _session(folded).run(None, {"X": X})[0]
    assert after.shape == before.shape
    np.testing.assert_allclose(after, before, rtol=1e-6, atol=1e-6)


def test_fold_pad_accepts_an_explicit_zero_value():
    model = _pad_conv_model([0, 0, 0, 0, 0, 0, 1, 1], value=0.0)
    before = _session(model).run(None, {"X": X})[0]
    assert fold_pads_into_convs(model) == 1
    np.testing.assert_allclose(_session(model).run(None, {"X": X})[0], before, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kwargs", [
    dict(pads=[0, 0, 0, 0, 0, 0, 1, 1], value=1.0),          # non-zero constant: not the same as Conv's zero padding
    dict(pads=[0, 0, 1, 1, 0, 0, 1, 1], mode="reflect"),
    dict(pads=[0, 0, 1, 1, 0, 0, 1, 1], mode="edge"),
    dict(pads=[0, 1, 0, 0, 0, 0, 1, 1]),                    # pads the channel axis
    dict(pads=[0, 0, 0, 0, 0, 0, 1, 1], pad_consumers=2),   # the padded tensor is used elsewhere too
])
def test_fold_pad_leaves_other_pads_alone(kwargs):
    model = _pad_conv_model(**kwargs)
    try:
        before = _session(model).run(None, {"X": X})
    except Exception:  # channel padding makes the Conv invalid; the structure is what matters then
        before = None
    folded = copy.deepcopy(model)
    assert fold_pads_into_convs(folded) == 0
    assert [n.op_type for n in folded.graph.node] == [n.op_type for n in model.graph.node]
    assert _conv_pads(folded) == _conv_pads(model)
    if before is not None:
        for a, b in zip(before, _session(folded).run(None, {"X": X})):
            np.testing.assert_array_equal(a, b)


def test_fold_pad_does_not_fold_negative_pads():
    model = _pad_conv_model([0, 0, -1, 0, 0, 0, 0, 0])  # crop the top row, then convolve
    before = _session(model).run(None, {"X": X})[0]
    folded = copy.deepcopy(model)
    fold_pads_into_convs(folded)
    np.testing.assert_allclose(_session(folded).run(None, {"X": X})[0], before, rtol=1e-6, atol=1e-6)


# --- fold_constants --------------------------------------------------------------------------------------------


def test_fold_constants_evaluates_a_constant_chain():
    a = numpy_helper.from_array(np.array([1.0, 2.0, 3.0], np.float32), "A")
    b = helper.make_node("Constant", [], ["B"], value=numpy_helper.from_array(np.array([2.0, 2.0, 2.0], np.float32)))
    shape = numpy_helper.from_array(np.array([3], np.int64), "S")
    nodes = [
        b,
        helper.make_node("Add", ["A", "B"], ["C"]),                    # [3, 4, 5]
        helper.make_node("Mul", ["C", "C"], ["D"]),                    # [9, 16, 25]
        helper.make_node("ConstantOfShape", ["S"], ["E"], value=numpy_helper.from_array(np.array([1.0], np.float32))),
        helper.make_node("Sub", ["D", "E"], ["F"]),                    # [8, 15, 24]
        helper.make_node("Add", ["X", "F"], ["Y"]),                    # depends on the input: stays
    ]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [3])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [3])], [a, shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = np.array([0.5, -1.0, 2.0], np.float32)
    before = _session(model).run(None, {"X": x})[0]

    assert fold_constants(model) == 4  # Add, Mul, ConstantOfShape, Sub
    assert [(n.op_type, list(n.input)) for n in model.graph.node] == [("Add", ["X", "F"])]
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert set(inits) == {"F"}, "intermediate constants and the Constant node are removed"
    np.testing.assert_array_equal(inits["F"], np.array([8.0, 15.0, 24.0], np.float32))
    np.testing.assert_array_equal(_session(model).run(None, {"X": x})[0], before)


def test_fold_constants_keeps_large_tensors_and_graph_outputs():
    big = numpy_helper.from_array(np.ones(10, np.float32), "W")
    nodes = [helper.make_node("Neg", ["W"], ["N"]), helper.make_node("Add", ["X", "N"], ["Y"]),
             helper.make_node("Abs", ["W"], ["Z"])]  # a graph output computed from constants
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [10])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [10]), helper.make_tensor_value_info("Z", TensorProto.FLOAT, [10])], [big])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert fold_constants(model, max_elements=4) == 0
    assert [n.op_type for n in model.graph.node] == ["Neg", "Add", "Abs"]
    assert fold_constants(model) == 1  # Neg now fits; Abs still produces a graph output
    assert [n.op_type for n in model.graph.node] == ["Add", "Abs"]


# --- failures ---------------------------------------------------------------------------------------------------


def test_parity_failure_writes_nothing(tiny_pipeline, tiny_dataset, tmp_path):
    target = tmp_path / "model.fp32.onnx"
    with pytest.raises(TledgeError, match="disagrees with PyTorch") as info:
        export_onnx(ExportConfig(checkpoint=tiny_pipeline / "model.pt", out=target, data=tiny_dataset, atol=0.0, rtol=0.0))  # exact equality: float kernels differ in the last bits
    assert "not written" in str(info.value)
    assert not target.exists()
    assert _leftovers(tmp_path) == []
    assert not (tmp_path / "export.json").exists()
    assert sorted(os.listdir(tmp_path)) == []


def test_parity_failure_keeps_an_existing_model(tiny_pipeline, tmp_path):
    target = tmp_path / "model.fp32.onnx"
    target.write_bytes(b"previous model")
    with pytest.raises(TledgeError):
        export_onnx(ExportConfig(checkpoint=tiny_pipeline / "model.pt", out=target, atol=0.0, rtol=0.0))  # exact equality: float kernels differ in the last bits
    assert target.read_bytes() == b"previous model"
    assert _leftovers(tmp_path) == []


def test_export_without_data_uses_random_inputs(tiny_pipeline, tmp_path):
    record = export_onnx(ExportConfig(checkpoint=tiny_pipeline / "model.pt", out=tmp_path / "m.onnx", parity_images=6))
    assert record["parity"]["inputs"] == "random normal"
    assert (tmp_path / "m.onnx").is_file() and (tmp_path / "export.json").is_file()
    assert read_metadata(tmp_path / "m.onnx")["classes"] == CLASSES
    assert _leftovers(tmp_path) == []


def test_export_refuses_a_dataset_with_other_classes(tiny_pipeline, tmp_path):
    from conftest import make_image_folder

    other = make_image_folder(tmp_path / "other", {"train": 2, "val": 2}, classes=("cat", "dog", "fox"))
    out = tmp_path / "out"
    with pytest.raises(TledgeError, match="classes"):
        export_onnx(ExportConfig(checkpoint=tiny_pipeline / "model.pt", out=out / "m.onnx", data=other))
    assert not out.exists(), "the data is checked before anything is written"


def test_missing_checkpoint_is_a_user_error(tmp_path):
    with pytest.raises(TledgeError, match="does not exist"):
        export_onnx(ExportConfig(checkpoint=tmp_path / "nope.pt", out=tmp_path / "m.onnx"))
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("content", ["state_dict", "list", "html", "zip"])
def test_non_tledge_checkpoint_is_a_user_error(content, tmp_path):
    import torch

    path = tmp_path / "foreign.pt"
    if content == "state_dict":
        torch.save({"weight": torch.zeros(2, 2)}, path)
    elif content == "list":
        torch.save([1, 2, 3], path)
    elif content == "html":  # a download that returned an error page
        path.write_bytes(b"<!DOCTYPE html><html><body>404 Not Found</body></html>")
    else:
        path.write_bytes(b"PK\x03\x04 truncated zip")
    with pytest.raises(TledgeError, match="foreign.pt"):
        export_onnx(ExportConfig(checkpoint=path, out=tmp_path / "m.onnx"))
    assert not (tmp_path / "m.onnx").exists() and _leftovers(tmp_path) == []


@pytest.mark.parametrize("content", [b"", b"the model"])
def test_empty_or_text_checkpoint_is_a_user_error(content, tmp_path):
    # torch's weights_only unpickler raises IndexError for these, not UnpicklingError
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    with pytest.raises(TledgeError, match="model.pt"):
        export_onnx(ExportConfig(checkpoint=path, out=tmp_path / "m.onnx"))
    assert not (tmp_path / "m.onnx").exists()


def test_incomplete_tledge_checkpoint_is_a_user_error(tmp_path):
    import torch

    torch.save({"format": "tledge.checkpoint/1"}, tmp_path / "partial.pt")
    with pytest.raises(TledgeError, match="incomplete"):
        export_onnx(ExportConfig(checkpoint=tmp_path / "partial.pt", out=tmp_path / "m.onnx"))


def test_unsupported_opset_is_refused(tmp_path):
    with pytest.raises(TledgeError, match="opset"):
        ExportConfig(checkpoint=tmp_path / "m.pt", out=tmp_path / "m.onnx", opset=11)
