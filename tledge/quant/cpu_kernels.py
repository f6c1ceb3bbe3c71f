"""Graph rewrites that let ONNX Runtime's x86 int8 kernels take their fast path, without changing what a model computes.

ONNX Runtime runs an int8 convolution with symmetric weights through its indirect "ConvSym" kernels (VNNI, AVX-512 or
AVX2 code) only when the layer's input channels are a multiple of 4 (MLAS ``MlasConvSymPackWSize``); otherwise it
falls back to im2col and a generic int8 GEMM. A network's first convolution reads 3 colour channels, so it takes the
slow path: on an AVX-512/VNNI Xeon at 224 px that stem ran 1.7x *slower* than its float copy (bench/RESULTS.md).

:func:`pad_input_channels` gives such a convolution a fourth input channel of zeros: a float ``Pad`` before the
input's QuantizeLinear, and zero int8 weights for that channel. The padded channel quantizes to the zero point and
its weights are 0, so every product it adds is exactly 0: the outputs are bit-identical wherever no int16 pair
saturates (the portable CPU target makes its pairs safe in the padded layout afterwards).
"""

from __future__ import annotations

import numpy as np

CHANNEL_MULTIPLE = 4  # MLAS's KernelInputChannelAlignment for the x86 ConvSym kernels


def zero_padded_channels(w: np.ndarray, channels: int) -> np.ndarray:
    """A 4-D conv weight ``(out, in, kh, kw)`` with zero input channels appended up to ``channels`` (``w`` itself when
    it has that many already): the float or int8 weight that fits an input padded by :func:`pad_input_channels`."""
    if w.ndim != 4 or w.shape[1] >= channels:
        return w
    return np.concatenate([w, np.zeros((w.shape[0], channels - w.shape[1], *w.shape[2:]), dtype=w.dtype)], axis=1)


def _consumers(graph, name: str) -> list:
    return [n for n in graph.node if name in n.input]


def pad_input_channels(model, multiple: int = CHANNEL_MULTIPLE) -> list[str]:
    """Pad the channels of a Q/DQ model's input up to ``multiple`` where it feeds int8 convolutions directly, in
    place; returns the names of the convolutions padded (none when the pattern is not there).

    The pattern: graph input -> QuantizeLinear -> DequantizeLinear -> Conv(s) (group 1) whose weight is a
    DequantizeLinear of an int8 initializer with channels not a multiple of ``multiple``.
    """
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    if len(graph.input) != 1:
        return []
    source = graph.input[0].name
    readers = _consumers(graph, source)
    if len(readers) != 1 or readers[0].op_type != "QuantizeLinear" or any(o.name == source for o in graph.output):
        return []
    quantize = readers[0]
    dequantizers = _consumers(graph, quantize.output[0])
    if not dequantizers or any(n.op_type != "DequantizeLinear" for n in dequantizers):
        return []
    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    convs = [c for dq in dequantizers for c in _consumers(graph, dq.output[0])]
    weights = []
    for conv in convs:
        if conv.op_type != "Conv" or conv.input[0] not in {dq.output[0] for dq in dequantizers}:
            return []
        if next((a.i for a in conv.attribute if a.name == "group"), 1) != 1:
            return []
        wdq = producer.get(conv.input[1])
        if wdq is None or wdq.op_type != "DequantizeLinear" or wdq.input[0] not in inits:
            return []
        w = inits[wdq.input[0]]
        if w.data_type != TensorProto.INT8 or len(w.dims) != 4:
            return []
        axis = next((a.i for a in wdq.attribute if a.name == "axis"), 1)
        if axis == 1 and len(inits[wdq.input[1]].dims) > 0:  # scales along the input channels: not this pattern
            return []
        weights.append(w)
    channels = {w.dims[1] for w in weights}
    if len(channels) != 1 or not weights:
        return []
    c = channels.pop()
    extra = -c % multiple
    if extra == 0:
        return []
    if any(len(_consumers(graph, w.name)) != 1 for w in weights) or len({w.name for w in weights}) != len(weights):
        return []  # a weight shared with another node would change it too
    for w in weights:
        w.CopyFrom(numpy_helper.from_array(zero_padded_channels(numpy_helper.to_array(w), c + extra), w.name))
    rank = len(graph.input[0].type.tensor_type.shape.dim) or 4
    pads_name, padded_name = f"{source}_channel_pads", f"{source}_channels_padded"
    pads = np.zeros(2 * rank, dtype=np.int64)
    pads[rank + 1] = extra  # after the last channel
    graph.initializer.append(numpy_helper.from_array(pads, pads_name))
    index = list(graph.node).index(quantize)
    graph.node.insert(index, helper.make_node("Pad", [source, pads_name], [padded_name], name=f"{source}_pad_channels", mode="constant"))
    quantize.input[0] = padded_name
    # Shapes recorded for the tensors that now have more channels would contradict them.
    stale = {quantize.output[0], *(dq.output[0] for dq in dequantizers)}
    kept = [v for v in graph.value_info if v.name not in stale]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    return [conv.name for conv in convs]


def with_padded_stem(fp32_model):
    """A copy of the FP32 ``model`` whose convolutions reading the graph input have the zero input channels that
    :func:`pad_input_channels` will give their int8 copies (the graph itself is not rewired): for code that reasons
    about the weights' layout, such as which int8 pairs could saturate."""
    from onnx import ModelProto, numpy_helper

    copy = ModelProto()
    copy.CopyFrom(fp32_model)
    if len(copy.graph.input) != 1:
        return copy
    inits = {i.name: i for i in copy.graph.initializer}
    for node in _consumers(copy.graph, copy.graph.input[0].name):
        if node.op_type != "Conv" or next((a.i for a in node.attribute if a.name == "group"), 1) != 1 or node.input[1] not in inits:
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        if w.ndim == 4 and w.shape[1] % CHANNEL_MULTIPLE:
            channels = w.shape[1] + -w.shape[1] % CHANNEL_MULTIPLE
            inits[node.input[1]].CopyFrom(numpy_helper.from_array(zero_padded_channels(w, channels), node.input[1]))
    return copy
