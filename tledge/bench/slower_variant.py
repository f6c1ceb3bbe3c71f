"""A copy of a model that does measurably more work, with the same outputs: the regression a gate must catch, for its
tests and for bench/gate_reliability.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tledge.errors import TledgeError


def slower_variant(src: Path, dst: Path, extra_work: float) -> Path:
    """A copy of ``src`` that computes the same logits with ``extra_work`` more of its own work (0.1: 10% more).

    The extra work is the model itself: copies of its first layers (whole copies for ``extra_work >= 1``, then a
    prefix holding that share of the multiply-accumulates of its Conv and Gemm layers), run on the input scaled
    by 1.001 so that ONNX Runtime's common-subexpression elimination cannot merge them with the originals, their
    result multiplied by zero and added to the logits. The same kind of kernels run more, so the slowdown is
    close to the share of work added, which a made-up extra branch is not (one extra convolution cost 13% at
    batch 1 whatever its size). For checking that a gate catches a slowdown of known size
    (bench/gate_reliability.py).
    """
    import onnx
    from onnx import helper, numpy_helper

    if extra_work <= 0:
        raise TledgeError(f"extra work must be positive, got {extra_work}")
    model = onnx.load(str(src))
    g = model.graph
    inferred = onnx.shape_inference.infer_shapes(model)
    macs = node_macs(model, inferred)
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in (*inferred.graph.value_info, *inferred.graph.output)}
    total = sum(macs.values())
    if total == 0:
        raise TledgeError(f"{src} has no Conv or Gemm layer to repeat")
    source_nodes = list(g.node)
    producers = {o: n for n in source_nodes for o in n.output}
    weights = {i.name for i in g.initializer}
    quantized = any(n.op_type == "QuantizeLinear" for n in source_nodes)
    out = g.output[0].name
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
    g.initializer.extend([numpy_helper.from_array(np.zeros((1,), np.float32), "slow_zero"),
                          numpy_helper.from_array(np.array([1], np.int64), "slow_axes")])

    def is_end(node) -> bool:  # a float tensor where copying may stop without breaking the copied layers' fusion
        if not quantized:
            return node.op_type in ("Conv", "Gemm")
        # in a Q/DQ model, after an activation's DequantizeLinear: a Conv without its QuantizeLinear would run in float
        q = producers.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        return q is not None and q.op_type == "QuantizeLinear" and q.input[0] not in weights

    added, copy, remaining, last = [], 0, extra_work, "slow_logits"
    while remaining > 1e-9:
        share = min(remaining, 1.0)
        prefix, done, end = f"slow{copy}/", 0, out
        for node in source_nodes:
            done += macs.get(node.name, 0)
            if done >= share * total and is_end(node):
                end = node.output[0]
                break
        needed, todo = set(), [end]  # the nodes the end tensor depends on, and nothing else
        while todo:
            node = producers.get(todo.pop())
            if node is not None and id(node) not in needed:
                needed.add(id(node))
                todo.extend(node.input)
        scale = numpy_helper.from_array(np.array(1 + 1e-3 * (copy + 1), np.float32), prefix + "scale")
        g.initializer.append(scale)
        renamed = {g.input[0].name: prefix + "input"}
        added.append(helper.make_node("Mul", [g.input[0].name, scale.name], [prefix + "input"], name=prefix + "scale_input"))
        for node in source_nodes:
            if id(node) in needed:
                clone = onnx.NodeProto()
                clone.CopyFrom(node)
                clone.name = prefix + node.name
                clone.input[:] = [renamed.get(i, i) for i in node.input]
                for k, o in enumerate(node.output):
                    renamed[o] = clone.output[k] = prefix + o
                added.append(clone)
        end_rank = ranks.get(end, 4)
        axes = list(range(1, end_rank))
        end = renamed[end]
        if opset < 18:  # ReduceMean takes its axes as an attribute before opset 18, as an input since
            reduce = helper.make_node("ReduceMean", [end], [prefix + "mean"], keepdims=0, axes=axes, name=prefix + "mean")
        else:
            g.initializer.append(numpy_helper.from_array(np.array(axes, np.int64), prefix + "axes"))
            reduce = helper.make_node("ReduceMean", [end, prefix + "axes"], [prefix + "mean"], keepdims=0, name=prefix + "mean")
        nxt = out if remaining - share <= 1e-9 else f"slow{copy}/sum"
        added += [
            reduce,
            helper.make_node("Unsqueeze", [prefix + "mean", "slow_axes"], [prefix + "column"], name=prefix + "unsqueeze"),
            helper.make_node("Mul", [prefix + "column", "slow_zero"], [prefix + "nothing"], name=prefix + "times_zero"),
            helper.make_node("Add", [last, prefix + "nothing"], [nxt], name=prefix + "add"),
        ]
        last, remaining, copy = nxt, remaining - share, copy + 1
    producer = next(n for n in source_nodes if out in n.output)  # the original logits now feed the zero-sum chain
    producer.output[list(producer.output).index(out)] = "slow_logits"
    g.node.extend(added)
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))
    return Path(dst)


def node_macs(model, inferred=None) -> dict[str, int]:
    """Multiply-accumulates per Conv and Gemm node at batch 1, from ONNX shape inference (``inferred``: the
    model with shapes inferred already)."""
    import onnx

    inferred = inferred if inferred is not None else onnx.shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value or 1 for d in v.type.tensor_type.shape.dim]
              for v in (*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input)}
    weights = {i.name: tuple(i.dims) for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}

    def weight_shape(name):  # through the Q/DQ nodes in front of a quantized weight
        while name not in weights and name in producers and producers[name].op_type in ("QuantizeLinear", "DequantizeLinear"):
            name = producers[name].input[0]
        return weights.get(name)

    macs = {}
    for node in model.graph.node:
        w = weight_shape(node.input[1]) if node.op_type in ("Conv", "Gemm") else None
        if w is None or node.output[0] not in shapes:
            continue
        # Conv: every output element sums (input channels / groups) x kernel products; Gemm at batch 1: in x out
        macs[node.name] = int(np.prod(shapes[node.output[0]][1:]) * np.prod(w[1:]) if node.op_type == "Conv" else np.prod(w))
    return macs
