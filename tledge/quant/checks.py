"""Checks of a quantized model against its runtime: TensorRT's Q/DQ placement rules, and this CPU's fused int8 kernels
against the simulated arithmetic they stand for."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tledge.cpu_isa import CpuTarget
from tledge.errors import TledgeError


def compare_fused_with_simulation(path: Path, x: np.ndarray, batch: int = 32) -> dict:
    """This CPU's fused int8 kernels against the simulated arithmetic of the same Q/DQ model, on images ``x``."""
    from tledge.runners.ort_runner import OrtRunner

    return fused_vs_simulated_figures(OrtRunner(path).run_batches(x, batch), OrtRunner(path, simulate_int8=True).run_batches(x, batch))


def fused_vs_simulated_figures(fused: np.ndarray, simulated: np.ndarray) -> dict:
    """Agreement of the two and their mean logit difference relative to the logits' mean spread around each
    image's mean (1.0: the difference is as large as the signal)."""
    spread = float(np.abs(simulated - simulated.mean(1, keepdims=True)).mean()) or 1.0
    diff = np.abs(fused - simulated)
    return {
        "images": len(fused),
        "top1_agreement": round(float(np.mean(fused.argmax(1) == simulated.argmax(1))), 5),
        "max_abs_logit_diff": round(float(diff.max()), 6),
        "mean_abs_logit_diff_relative": round(float(diff.mean()) / spread, 6),
    }


# Fused kernels and the simulation differ only where a float sum rounds across a quantization step, which on a
# deep net moves logits by about 6% of their spread; a kernel that saturates int16 moves them by about as much as
# the signal and flips 20-50% of the predictions (measured on an AVX2 CPU without VNNI, onnxruntime 1.32,
# EfficientNet-Lite0 on digits: 0.056 for the portable model, 0.86 for full 8-bit weights).
FUSED_VS_SIMULATED_MAX_RELATIVE_DIFF = 0.25


FUSED_VS_SIMULATED_MIN_AGREEMENT = 0.9


def fused_matches_simulation(check: dict) -> bool:
    """Rounding moves logits a little and may flip a near-tie or two; saturation moves them as much as the signal."""
    flipped = round((1 - check["top1_agreement"]) * check["images"])
    return (check["mean_abs_logit_diff_relative"] <= FUSED_VS_SIMULATED_MAX_RELATIVE_DIFF
            and (check["top1_agreement"] >= FUSED_VS_SIMULATED_MIN_AGREEMENT or flipped <= 2))


def check_tensorrt_qdq(model) -> list[str]:
    """What TensorRT would reject or mis-handle in a Q/DQ model; an empty list means it is fine.

    Checks: zero points are int8 zeros (symmetric), scales are positive, per-channel only on axis 0 of weights,
    no int32 (bias) dequantization, activations per-tensor.
    """
    from onnx import TensorProto, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    problems = []
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        scale = numpy_helper.to_array(inits[node.input[1]]) if node.input[1] in inits else None
        zp_init = inits.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if scale is not None and np.any(scale <= 0):
            problems.append(f"{node.name}: non-positive scale")
        if len(node.input) < 3 or not node.input[2]:
            problems.append(f"{node.name}: no zero point, so ONNX's default uint8 applies; TensorRT needs INT8")
        if zp_init is not None:
            if zp_init.data_type == TensorProto.INT32:
                problems.append(f"{node.name}: int32 quantization (quantized bias breaks the TensorRT ONNX parser)")
            elif zp_init.data_type != TensorProto.INT8:
                problems.append(f"{node.name}: zero point type {TensorProto.DataType.Name(zp_init.data_type)}, TensorRT needs INT8")
            if np.any(numpy_helper.to_array(zp_init) != 0):
                problems.append(f"{node.name}: non-zero zero point (TensorRT supports symmetric quantization only)")
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        per_channel = scale is not None and scale.size > 1
        if per_channel and node.input[0] not in inits and node.op_type == "QuantizeLinear":
            problems.append(f"{node.name}: per-channel activation quantization (TensorRT wants per-tensor)")
        if per_channel and node.input[0] in inits and axis != 0:
            problems.append(f"{node.name}: per-channel weight axis {axis}, TensorRT wants 0")
    return problems


def validate_on_this_cpu(path: Path, x: np.ndarray, target: CpuTarget, max_images: int = 128) -> dict:
    """Run the CPU model's fused kernels here against its simulation on validation images; refuse a model that
    this CPU, inside its target, computes wrongly. Outside the target the figures are recorded, not judged."""
    from tledge.cpu_isa import this_cpu
    from tledge.machine import cpu_name

    cpu = this_cpu()
    check = compare_fused_with_simulation(path, x[:max_images])
    covered = target.covers(cpu["class"])
    record = {"cpu": cpu_name(), "cpu_class": cpu["class"], "int8_flags": cpu["int8_flags"], "inside_target": covered, **check}
    if covered and not fused_matches_simulation(check):
        raise TledgeError(
            f"the CPU INT8 model computes wrongly on this CPU ({cpu['class']}): its int8 kernels agree with the model's "
            f"arithmetic on {check['top1_agreement']:.1%} of {check['images']} images, logits off by "
            f"{check['mean_abs_logit_diff_relative']:.0%} of their spread. This ONNX Runtime's "
            "kernels do not match tledge's saturation model; report it, and use --cpu-target portable meanwhile"
        )
    return record
