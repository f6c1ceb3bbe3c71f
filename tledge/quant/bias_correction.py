"""Bias correction: remove the mean output shift that rounding the weights to int8 adds to each channel.

Rounding a layer's weights changes its output by ``(W_q - W) x``; over the calibration images that error has a
mean ``(W_q - W) E[x]`` per output channel, which the layer's bias can absorb exactly (Nagel et al., "Data-Free
Quantization Through Weight Equalization and Bias Correction", 2019, empirical variant: ``E[x]`` per input channel
comes from the calibration statistics). It matters most for depthwise convolutions, whose nine weights per
channel round coarsely. The correction is applied to the quantized model only; the FP32 model is unchanged.
"""

from __future__ import annotations

import numpy as np

from tledge.errors import TledgeError
from tledge.quant.cpu_kernels import zero_padded_channels


def _dequantized_weight(dq, inits, producer):
    """``(float weight as the model computes it, where the weight comes from)`` for a weight DequantizeLinear."""
    from onnx import numpy_helper

    def array(name):
        return numpy_helper.to_array(inits[name]).astype(np.float64)

    scale = array(dq.input[1])
    zero = array(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else np.zeros_like(scale)
    axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
    source = dq.input[0]
    if source in inits:  # int8 weights stored as integers (the CPU model)
        q = array(source)
    else:  # FP32 weights behind QuantizeLinear (the TensorRT model): round them as TensorRT will
        qnode = producer.get(source)
        if qnode is None or qnode.op_type != "QuantizeLinear" or qnode.input[0] not in inits:
            return None
        q = np.clip(np.rint(array(qnode.input[0]) / _expand(scale, axis, array(qnode.input[0]).ndim)), -128, 127)
    return (q - _expand(zero, axis, q.ndim)) * _expand(scale, axis, q.ndim)


def _expand(v: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    if v.ndim == 0:
        return v
    shape = [1] * ndim
    shape[axis] = -1
    return v.reshape(shape)


def correct_bias(model, fp32_model, channel_mean: dict[str, np.ndarray]) -> dict:
    """Shift the bias of every Conv/Gemm of the Q/DQ ``model`` whose weights are quantized, in place; returns a
    summary. ``channel_mean`` maps the FP32 model's Conv/Gemm input tensors to their per-channel means."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    fp32_nodes = {n.name: n for n in fp32_model.graph.node}
    fp32_inits = {i.name: i for i in fp32_model.graph.initializer}
    corrected, largest = [], 0.0
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or not node.input[2]:
            continue
        dq = producer.get(node.input[1])
        source = fp32_nodes.get(node.name)
        if dq is None or dq.op_type != "DequantizeLinear" or source is None or source.input[0] not in channel_mean:
            continue
        w_q = _dequantized_weight(dq, inits, producer)
        if w_q is None:
            continue
        w = numpy_helper.to_array(fp32_inits[source.input[1]]).astype(np.float64)
        mean = channel_mean[source.input[0]].astype(np.float64)
        if node.op_type == "Conv" and w_q.ndim == 4 and w_q.shape[1] > w.shape[1]:
            # input channels padded with zeros for ONNX Runtime's kernels: their mean is 0 too
            w, mean = zero_padded_channels(w, w_q.shape[1]), np.pad(mean, (0, w_q.shape[1] - w.shape[1]))
        error = w_q - w
        if node.op_type == "Gemm":
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            shift = (error if trans_b else error.T) @ mean
        else:  # Conv: output channel o of group g reads input channels g*cin .. (g+1)*cin - 1
            groups = next((a.i for a in node.attribute if a.name == "group"), 1)
            out_ch, cin = error.shape[:2]
            per_input = error.reshape(out_ch, cin, -1).sum(axis=2)
            group_of = np.arange(out_ch) // (out_ch // groups)
            inputs = mean[(group_of[:, None] * cin + np.arange(cin)[None, :])]
            shift = (per_input * inputs).sum(axis=1)
        if not np.all(np.isfinite(shift)):
            raise TledgeError(f"bias correction of {node.name} is not finite; the calibration statistics are damaged")
        _shift_bias(node.input[2], shift, inits, producer)
        corrected.append(node.name)
        largest = max(largest, float(np.abs(shift).max()))
    return {"layers": len(corrected), "largest_shift": round(largest, 6)}


def _shift_bias(name: str, shift: np.ndarray, inits, producer) -> None:
    """Subtract ``shift`` from a bias that is a float initializer, or an int32 one behind DequantizeLinear."""
    from onnx import numpy_helper

    if name in inits:
        bias = numpy_helper.to_array(inits[name])
        inits[name].CopyFrom(numpy_helper.from_array((bias - shift).astype(bias.dtype), name))
        return
    dq = producer.get(name)
    if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
        raise TledgeError(f"cannot find the bias {name} to correct it")
    q = numpy_helper.to_array(inits[dq.input[0]])
    scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float64)
    limit = np.iinfo(q.dtype)
    moved = np.clip(np.rint(q - shift / scale), limit.min, limit.max).astype(q.dtype)
    inits[dq.input[0]].CopyFrom(numpy_helper.from_array(moved, dq.input[0]))
