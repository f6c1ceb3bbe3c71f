"""What the float layers of a Q/DQ model cost a TensorRT engine, estimated from the graph.

TensorRT cannot run here, so this is read from the ONNX graph, not timed. A weighted layer (Conv, Gemm, MatMul)
runs in INT8 only where both its input and its weights come through a DequantizeLinear; otherwise it runs in FP16
(FP32 without the FP16 flag). Float layers that touch form *islands*, and every tensor crossing an island's edge
from a DequantizeLinear, or into a QuantizeLinear, is one reformat layer in the engine (int8 <-> fp16, a pass over
the whole tensor that an all-INT8 chain fuses away). Each island also breaks TensorRT's conv + activation +
quantize fusion at its edges. The estimate counts:

* the float layers' MACs and their share of the model's weighted MACs;
* the islands and their reformat tensors (how many, and how many elements per image they move);
* ``relative_compute``: the MAC time against an all-INT8 engine, taking an FP16 MAC as twice an INT8 MAC
  (dense tensor-core throughput on Turing through Hopper and on Orin); 1.0 means no cost.
"""

from __future__ import annotations

import numpy as np

WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# Nodes that only move or reshape data: they run in whatever precision their input has.
PASS_THROUGH = ("Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Identity", "Concat", "Slice")


def _shapes(model) -> dict[str, list]:
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {}
    for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        dims = v.type.tensor_type.shape.dim
        shapes[v.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


def _per_image(shape) -> int | None:
    """Elements of one image's tensor (the batch axis dropped); None when a dimension is unknown."""
    if not shape or any(d is None for d in shape[1:]):
        return None
    return int(np.prod(shape[1:])) if len(shape) > 1 else 1


def _macs(node, shapes) -> int | None:
    """Multiply-accumulates per image of one weighted layer, from its weight and output shapes."""
    weight = shapes.get(node.input[1])
    out = shapes.get(node.output[0])
    if not weight or not out or any(d is None for d in out[1:]):
        return None
    if node.op_type in ("Conv", "ConvTranspose"):
        # every output element sums C_in/group * kh * kw products: the weight's per-filter size
        return int(np.prod(out[1:])) * int(np.prod(weight[1:]))
    trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0) if node.op_type == "Gemm" else 0
    inner = weight[1] if trans_b else weight[0]
    return int(np.prod(out[1:])) * int(inner)


def estimate_float_cost(model) -> dict:
    """The engine-side cost of a Q/DQ model's float layers (see the module docstring); a JSON-ready dict.

    >>> cost = estimate_float_cost(onnx.load("model.int8.qdq.onnx"))  # doctest: +SKIP
    >>> cost["float_layers"], cost["reformats"], cost["relative_compute"]  # doctest: +SKIP
    (2, 3, 1.04)
    """
    shapes = _shapes(model)
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    initializers = {i.name for i in model.graph.initializer}

    def from_dq(tensor: str) -> bool:
        p = producer.get(tensor)
        return p is not None and p.op_type == "DequantizeLinear"

    # Precision of each compute node, in graph order (ONNX graphs are topologically sorted).
    is_float: dict[str, bool] = {}
    for n in model.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if n.op_type in WEIGHTED:
            is_float[n.name] = not (from_dq(n.input[0]) and len(n.input) > 1 and from_dq(n.input[1]))
            continue
        # An activation, add or pool fuses into the INT8 chain unless it reads the float network input or the
        # output of a float node; constants (Clip bounds, shapes) do not count.
        data = [i for i in n.input if i and i not in initializers and not (i in producer and producer[i].op_type == "Constant")]
        is_float[n.name] = any(i not in producer or is_float.get(producer[i].name, False) for i in data)

    nodes = {n.name: n for n in model.graph.node}
    float_names = [name for name, f in is_float.items() if f and nodes[name].op_type not in PASS_THROUGH]
    # Islands: connected float nodes (union-find over tensor edges between two float nodes).
    parent = {name: name for name in float_names}

    def root(name):
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    for name in float_names:
        for out in nodes[name].output:
            for c in consumers.get(out, []):
                if c.name in parent:
                    parent[root(c.name)] = root(name)

    reformats = []
    for name in float_names:
        n = nodes[name]
        for i in n.input:
            p = producer.get(i)
            # An int8 activation read in float: straight from a DequantizeLinear, or through an activation fused
            # into the INT8 chain (the Clip that stands in for a float layer's ReLU6). A float output of an INT8
            # layer needs no reformat: TensorRT writes it in float.
            entry = (from_dq(i) and p.input[0] not in initializers) or (
                p is not None and p.op_type not in WEIGHTED + ("QuantizeLinear", "DequantizeLinear", "Constant")
                and not is_float.get(p.name, False))
            if entry:
                reformats.append({"tensor": i, "direction": "int8 -> float", "elements_per_image": _per_image(shapes.get(i))})
        for out in n.output:
            if any(c.op_type == "QuantizeLinear" for c in consumers.get(out, [])):
                reformats.append({"tensor": out, "direction": "float -> int8", "elements_per_image": _per_image(shapes.get(out))})

    layers, total_macs, float_macs = [], 0, 0
    for n in model.graph.node:
        if n.op_type not in WEIGHTED:
            continue
        macs = _macs(n, shapes)
        total_macs += macs or 0
        if is_float.get(n.name):
            float_macs += macs or 0
            layers.append({"node": n.name, "op": n.op_type, "macs_per_image": macs})
    islands = len({root(name) for name in float_names if nodes[name].op_type in WEIGHTED}) if layers else 0
    moved = [r["elements_per_image"] for r in reformats]
    share = float_macs / total_macs if total_macs else 0.0
    return {
        "estimated_from": "the ONNX graph (no TensorRT here): float MACs at twice an INT8 MAC's time, one reformat per island edge",
        "float_layers": len(layers),
        "islands": islands,
        "layers": layers,
        "macs_per_image": {"total": total_macs, "float": float_macs, "float_share": round(share, 4)},
        "reformats": len(reformats),
        "reformat_elements_per_image": int(sum(m for m in moved if m)) if all(m is not None for m in moved) else None,
        "reformat_tensors": reformats,
        "relative_compute": round(1.0 + share, 3),
    }


def describe_float_cost(cost: dict) -> str:
    """One line for logs and reports."""
    if not cost["float_layers"]:
        return "every weighted layer runs in INT8 in the engine: no float island, no reformat"
    moved = cost["reformat_elements_per_image"]
    return (f"{cost['float_layers']} float layer(s) in {cost['islands']} island(s): "
            f"{cost['macs_per_image']['float_share']:.1%} of the MACs in FP16 (about {cost['relative_compute']:.2f}x "
            f"the MAC time of an all-INT8 engine), {cost['reformats']} reformat layer(s)"
            + (f" moving {moved:,} elements per image" if moved is not None else "") + " (estimated from the graph)")
