"""ONNX files as every stage reads them: loading (external data included), tledge's metadata in ``metadata_props``
and the checks a model must pass before any stage uses it."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tledge.errors import TledgeError


def load_onnx(path: str | Path, load_external_data: bool = True):
    """``onnx.load`` with user errors for a missing or unreadable file instead of protobuf tracebacks."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise TledgeError(f"ONNX model {path} {'is a folder, not a file' if path.is_dir() else 'does not exist'}")
    try:
        model = onnx.load(str(path), load_external_data=load_external_data)
    except Exception as exc:  # protobuf DecodeError, missing external data, ...
        raise TledgeError(f"{path} is not a readable ONNX model ({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else 'no details'})") from None
    # protobuf parses an empty (or zeroed) file as an empty message: no graph is not "no metadata", it is no model
    if not model.ir_version or not model.graph.node or not model.graph.input:
        size = path.stat().st_size
        raise TledgeError(f"{path} is not a valid ONNX file ({'empty' if size == 0 else f'{size} bytes holding no graph'})")
    return model


def read_metadata(model_or_path) -> dict:
    """The tledge description stored in an ONNX model (a path or a loaded ModelProto)."""
    model = load_onnx(model_or_path, load_external_data=False) if isinstance(model_or_path, (str, Path)) else model_or_path
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            try:
                return json.loads(prop.value)
            except json.JSONDecodeError:
                raise TledgeError(f"{model_or_path if isinstance(model_or_path, (str, Path)) else 'the model'} has corrupt tledge metadata (not JSON); export it again") from None
    raise TledgeError(f"{model_or_path if isinstance(model_or_path, (str, Path)) else 'the model'} has no tledge metadata; export it with `tledge export`")


def set_metadata(model, meta: dict) -> None:
    for prop in list(model.metadata_props):
        if prop.key == METADATA_KEY:
            model.metadata_props.remove(prop)
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(meta, sort_keys=True)


def onnx_metadata(path: str | os.PathLike, proto=None) -> dict:
    """The tledge metadata of an ONNX file, checked against the graph: well-formed, its input named and shaped as
    the preprocessing says (batch, 3, size, size), its output one logit per class."""
    from tledge.data.images import Preprocess
    from tledge.export.onnx_io import load_onnx, read_metadata

    path = Path(path)
    proto = proto if proto is not None else load_onnx(path, load_external_data=False)
    meta = read_metadata(proto)
    if not isinstance(meta, dict) or not all(k in meta for k in ("classes", "preprocess", "input", "output")):
        raise TledgeError(f"{path}: its tledge metadata is incomplete (needs classes, preprocess, input, output); export it again")
    try:
        pre = Preprocess.from_dict(meta["preprocess"])
    except (TypeError, AttributeError) as exc:
        raise TledgeError(f"{path}: its tledge metadata has a malformed preprocess entry ({exc})") from None
    if not isinstance(meta["classes"], list) or len(meta["classes"]) < 2:
        raise TledgeError(f"{path}: its tledge metadata lists no classes")
    graph = proto.graph
    inputs = {i.name: i for i in graph.input}
    outputs = {o.name: o for o in graph.output}
    if meta["input"] not in inputs or meta["output"] not in outputs:
        raise TledgeError(f"{path}: the graph has no input {meta['input']!r} or no output {meta['output']!r} as its metadata says "
                          f"(inputs {sorted(inputs)}, outputs {sorted(outputs)})")

    def dims(value_info):
        return [d.dim_value if d.HasField("dim_value") else None for d in value_info.type.tensor_type.shape.dim]

    shape, want = dims(inputs[meta["input"]]), [None, *pre.input_shape]
    if len(shape) != 4 or any(s is not None and w is not None and s != w for s, w in zip(shape[1:], want[1:])):
        raise TledgeError(f"{path}: the graph's input {meta['input']!r} has shape {['batch' if s is None else s for s in shape]}, "
                          f"its metadata says {['batch', *pre.input_shape]}; the file was edited or mixed up. Export it again")
    out_shape = dims(outputs[meta["output"]])
    if out_shape and out_shape[-1] is not None and out_shape[-1] != len(meta["classes"]):
        raise TledgeError(f"{path}: the graph gives {out_shape[-1]} logits, its metadata lists {len(meta['classes'])} classes")
    return meta


def finite_onnx_weights(proto, path: str | os.PathLike) -> None:
    """Every float initializer of an ONNX graph is finite (a NaN weight makes every output NaN)."""
    import numpy as np
    from onnx import TensorProto, numpy_helper

    floats = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16)
    for init in proto.graph.initializer:
        if init.data_type in floats and init.data_location != TensorProto.EXTERNAL:
            if not bool(np.isfinite(numpy_helper.to_array(init).astype(np.float32)).all()):
                raise TledgeError(f"{path} holds non-finite weights (NaN or inf) in {init.name}; it cannot be used. Export it from a sound checkpoint")


METADATA_KEY = "tledge"
