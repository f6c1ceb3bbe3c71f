"""Which quantized layers cost the most accuracy, measured end to end on the simulated INT8 arithmetic.

A layer's sensitivity is how much closer the Q/DQ model's logits come to the FP32 model's when that layer alone
reads float inputs and weights (its DequantizeLinear inputs bypassed): a graph edit, no re-quantization. The
ranking tells the per-layer fallback which layers to keep in float first.
"""

from __future__ import annotations

import numpy as np

from tledge.errors import TledgeError


def quantized_layers(model) -> list[str]:
    """Names of the compute nodes that read at least one dequantized tensor, in graph order."""
    producer = {o: n for n in model.graph.node for o in n.output}
    names = []
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if any(producer.get(i) is not None and producer[i].op_type == "DequantizeLinear" for i in node.input):
            names.append(node.name)
    return names


def _representable_range(q, inits) -> tuple[float, float]:
    """The real interval a QuantizeLinear can express: its saturation limits, without its rounding."""
    from onnx import numpy_helper

    scale = float(numpy_helper.to_array(inits[q.input[1]]))
    zp_array = numpy_helper.to_array(inits[q.input[2]]) if len(q.input) > 2 and q.input[2] else np.zeros((), np.uint8)
    info = np.iinfo(zp_array.dtype)
    zp = float(zp_array)
    return (info.min - zp) * scale, (info.max - zp) * scale


def bypass_quantization(model, fp32_model, node_names) -> object:
    """A copy of Q/DQ ``model`` in which the nodes ``node_names`` read float inputs and float weights.

    An activation keeps the saturation of its quantizer (a Clip to the interval it can represent), because a CPU
    model may have no Clip of its own left: ONNX Runtime drops a ReLU6 whose output range the quantizer already
    enforces. Only the rounding goes.
    """
    from onnx import ModelProto, helper, numpy_helper

    edited = ModelProto()
    edited.CopyFrom(model)
    init_protos = {i.name: i for i in edited.graph.initializer}
    inits = set(init_protos)
    producer = {o: n for n in edited.graph.node for o in n.output}
    fp32_nodes = {n.name: n for n in fp32_model.graph.node}
    fp32_inits = {i.name: i for i in fp32_model.graph.initializer}
    wanted = set(node_names)
    clips: dict[str, list] = {}  # node name -> Clip nodes to insert before it

    def fp32_input(node, k: int) -> str:
        """A copy of the FP32 model's input ``k`` of ``node`` (found by the node's name), added once."""
        source = fp32_nodes.get(node.name)
        float_name = source.input[k] if source is not None and k < len(source.input) else None
        if float_name not in fp32_inits:
            raise TledgeError(f"cannot find the FP32 input {k} of {node.name} to measure its sensitivity")
        copy_name = f"{float_name}__tledge_float"
        if copy_name not in inits:
            init = edited.graph.initializer.add()
            init.CopyFrom(fp32_inits[float_name])
            init.name = copy_name
            inits.add(copy_name)
        return copy_name

    for node in edited.graph.node:
        if node.name not in wanted:
            continue
        for k, name in enumerate(node.input):
            dq = producer.get(name)
            if k == 2 and node.op_type in ("Conv", "Gemm") and name in inits:
                node.input[k] = fp32_input(node, k)  # bias correction shifted it for int8 weights; float weights need the FP32 bias
                continue
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = producer.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear" and q.input[0] in inits:
                # a float weight behind a Q->DQ pair: the FP32 model's, since weight rounding may have moved it
                node.input[k] = fp32_input(node, k) if node.name in fp32_nodes else q.input[0]
            elif q is not None and q.op_type == "QuantizeLinear":
                lo, hi = _representable_range(q, init_protos)
                base = f"{node.name}__tledge_in{k}"
                for suffix, value in (("lo", lo), ("hi", hi)):
                    edited.graph.initializer.append(numpy_helper.from_array(np.array(value, np.float32), f"{base}_{suffix}"))
                clips.setdefault(node.name, []).append(
                    helper.make_node("Clip", [q.input[0], f"{base}_lo", f"{base}_hi"], [f"{base}_float"], name=f"{base}_clip"))
                node.input[k] = f"{base}_float"
            elif dq.input[0] in inits:  # an int8 weight or int32 bias initializer: take the FP32 one by the node's name
                node.input[k] = fp32_input(node, k)
                if k == 1 and node.op_type == "Conv":
                    _pad_like(edited, node.input[k], init_protos[dq.input[0]])
    if clips:  # keep the graph in topological order: each Clip right before the node that reads it
        nodes = list(edited.graph.node)
        del edited.graph.node[:]
        for node in nodes:
            edited.graph.node.extend(clips.get(node.name, []))
            edited.graph.node.append(node)
    # A bypassed node's own output quantization, where it reaches a graph output (the logits of a CPU model), goes
    # too: the DequantizeLinear becomes an Identity of the float tensor.
    outputs = {o.name for o in edited.graph.output}
    for node in edited.graph.node:
        if node.op_type == "DequantizeLinear" and node.output[0] in outputs:
            q = producer.get(node.input[0])
            source = producer.get(q.input[0]) if q is not None and q.op_type == "QuantizeLinear" else None
            if source is not None and source.name in wanted:
                node.op_type = "Identity"
                del node.input[:]
                node.input.append(q.input[0])
                del node.attribute[:]
    return edited


def _pad_like(model, name: str, quantized) -> None:
    """Give the float weight ``name`` the zero input channels its int8 copy ``quantized`` was padded with, so that
    it fits the padded input."""
    from onnx import numpy_helper

    from tledge.quant.cpu_kernels import zero_padded_channels

    if len(quantized.dims) == 4:
        init = next(i for i in model.graph.initializer if i.name == name)
        init.CopyFrom(numpy_helper.from_array(zero_padded_channels(numpy_helper.to_array(init), quantized.dims[1]), name))


def simulate(model, x: np.ndarray, batch: int = 32) -> np.ndarray:
    """Logits of an in-memory Q/DQ model with Q/DQ run as float ops (see :class:`tledge.runners.backends.OrtRunner`)."""
    from tledge.runners.ort_runner import OrtRunner

    return OrtRunner(model, simulate_int8=True).run_batches(x, batch)


def logit_error(logits: np.ndarray, reference: np.ndarray) -> float:
    """Mean squared logit difference, relative to the reference's variance: 0 is exact, 1 is as large as the signal.

    Each image's logits are centred first: a shift of all of one image's logits by the same amount changes no
    prediction and no probability, so it is not error."""
    logits = logits - logits.mean(axis=1, keepdims=True)
    reference = reference - reference.mean(axis=1, keepdims=True)
    return float(np.mean((logits - reference) ** 2) / (np.var(reference) or 1.0))


def rank_layers(model, fp32_model, x: np.ndarray, reference: np.ndarray, progress=None) -> list[dict]:
    """Every quantized layer with the logit error left when it alone runs in float, most helpful first.

    ``reference``: the FP32 model's logits on ``x``. Returns ``[{"node", "error", "gain"}]`` where ``gain`` is the
    error removed relative to the fully quantized model's.
    """
    base = logit_error(simulate(model, x), reference)
    layers = quantized_layers(model)
    ranked = []
    for name in progress(layers) if progress else layers:
        error = logit_error(simulate(bypass_quantization(model, fp32_model, [name]), x), reference)
        ranked.append({"node": name, "error": round(error, 6), "gain": round(base - error, 6)})
    ranked.sort(key=lambda r: r["error"])
    return ranked
