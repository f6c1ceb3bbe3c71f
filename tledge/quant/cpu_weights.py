"""CPU INT8 weights that compute right on every x86 CPU: without VNNI, ONNX Runtime's u8s8 kernels add two products in
int16 (``vpmaddubsw``), which saturates for some int8 weight pairs; those pairs are narrowed, and a model is checked
for any pair that could still saturate."""

from __future__ import annotations

import numpy as np

from tledge.errors import TledgeError


def _attr(node, name: str, default):
    return next((a.i for a in node.attribute if a.name == name), default)


def _weight_layout(node) -> dict:
    return {"group": _attr(node, "group", 1), "trans_b": bool(_attr(node, "transB", 0))}


def _channel_axis(node) -> int:
    return 0 if node.op_type == "Conv" or (node.op_type == "Gemm" and _attr(node, "transB", 0)) else 1


def pair_safe_weight_overrides(model) -> tuple[dict, dict]:
    """Per-channel weight ranges (TensorQuantOverrides) under which no int8 weight pair of the FP32 ``model`` can
    saturate an int16 accumulator, and a summary of what was narrowed.

    Only channels that could saturate with full-range weights get a narrower range (:func:`pair_safe_scales`);
    depthwise convolutions never do.
    """
    from onnx import numpy_helper

    from tledge.quant.saturation import INT8_MAX, gemm_rows, pair_safe_scales

    inits = {i.name: i for i in model.graph.initializer}
    overrides, narrowed, layers, channels = {}, {}, 0, 0
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2 or node.input[1] not in inits:
            continue
        weight = numpy_helper.to_array(inits[node.input[1]])
        rows = gemm_rows(node.op_type, weight, **_weight_layout(node))
        if rows is None:
            continue
        layers += 1
        channels += rows.shape[0]
        scales, levels = pair_safe_scales(rows)
        if (levels < INT8_MAX).any():
            ranges = (scales.astype(np.float64) * INT8_MAX).astype(np.float32)
            overrides[node.input[1]] = [{"axis": _channel_axis(node), "rmin": -ranges[0], "rmax": ranges[0]}] + [
                {"rmin": -r, "rmax": r} for r in ranges[1:]
            ]
            narrowed[node.name] = {"channels": int((levels < INT8_MAX).sum()), "of": int(rows.shape[0]), "min_levels": int(levels.min())}
    summary = {
        "layers_checked": layers, "channels_checked": channels,
        "narrowed_layers": len(narrowed), "narrowed_channels": sum(v["channels"] for v in narrowed.values()),
        "layers": narrowed,
    }
    return overrides, summary


def _quantized_weights(model):
    """(node, weight DequantizeLinear node) for every Conv/Gemm/MatMul whose weight is a dequantized int8 initializer."""
    from onnx import TensorProto

    inits = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        dq = producer.get(node.input[1])
        if dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in inits and inits[dq.input[0]].data_type == TensorProto.INT8:
            yield node, dq, inits


def make_weights_pair_safe(model, fp32_model) -> int:
    """Rewrite the int8 weights of ``model`` (a CPU Q/DQ model) so that no pair can saturate int16; returns the
    number of weights changed.

    Each weight is re-rounded from its FP32 value with the model's own per-channel scale, and the pairs that
    would still saturate are moved onto the limit (:func:`tledge.quant.saturation.quantize_pair_safe`).
    """
    from onnx import numpy_helper

    from tledge.quant.cpu_kernels import zero_padded_channels
    from tledge.quant.saturation import from_gemm_rows, gemm_rows, quantize_pair_safe

    float_weights = {i.name: i for i in fp32_model.graph.initializer}
    fp32_nodes = {n.name: n for n in fp32_model.graph.node}
    changed = 0
    for node, dq, inits in _quantized_weights(model):
        source = fp32_nodes.get(node.name)
        if source is None or source.input[1] not in float_weights:
            raise TledgeError(f"cannot find the FP32 weight of {node.name} to make it safe for x86 int8 kernels")
        weight = numpy_helper.to_array(float_weights[source.input[1]])
        if node.op_type == "Conv" and len(inits[dq.input[0]].dims) == 4:  # input channels padded for ONNX Runtime's kernels
            weight = zero_padded_channels(weight, inits[dq.input[0]].dims[1])
        layout = _weight_layout(node)
        rows = gemm_rows(node.op_type, weight, **layout)
        if rows is None:
            continue
        scale = np.broadcast_to(numpy_helper.to_array(inits[dq.input[1]]).astype(np.float64), (rows.shape[0],))
        q = from_gemm_rows(node.op_type, quantize_pair_safe(rows.astype(np.float64), scale), weight.shape, layout["trans_b"])
        old = numpy_helper.to_array(inits[dq.input[0]])
        changed += int((old != q).sum())
        inits[dq.input[0]].CopyFrom(numpy_helper.from_array(q, dq.input[0]))
    return changed


def check_int16_saturation(model) -> list[str]:
    """Layers of an int8 model whose weights can saturate the int16 step of x86 kernels without VNNI; empty = safe.

    >>> check_int16_saturation(onnx.load("out/model.int8.cpu.onnx"))  # doctest: +SKIP
    []
    """
    from onnx import numpy_helper

    from tledge.quant.saturation import gemm_rows, saturating_channels

    problems = []
    for node, dq, inits in _quantized_weights(model):
        rows = gemm_rows(node.op_type, numpy_helper.to_array(inits[dq.input[0]]), **_weight_layout(node))
        if rows is not None:
            bad = int(saturating_channels(rows).sum())
            if bad:
                problems.append(f"{node.name}: {bad} of {rows.shape[0]} output channels have int8 weight pairs that can saturate int16")
    return problems
