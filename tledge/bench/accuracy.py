"""Accuracy and drift of a variant against the FP32 reference on one split: top-1 (top-5), agreement, KL divergence,
per-class change, and an INT8 model's fused kernels against its simulated arithmetic."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Accumulator:
    correct: int = 0
    correct_top5: int = 0
    agree: int = 0
    count: int = 0
    abs_logit_diff: float = 0.0
    kl_divergence: float = 0.0  # of this variant's softmax from the reference's, summed over images
    per_class_correct: dict = field(default_factory=dict)
    confusion: np.ndarray | None = None  # [true class, predicted class] counts


ACCURACY_METHODS = {
    "int8-tensorrt": "simulated: Q/DQ run as float ops (ONNX Runtime, graph optimizations off), the arithmetic of "
                     "TensorRT's int32-accumulating INT8 kernels up to float rounding; not this CPU's int8 kernels",
    "int8-cpu": "this CPU's int8 kernels (ONNX Runtime, optimized); the simulated arithmetic is given beside it",
    "other": "ONNX Runtime on this CPU",
    "engine": "the TensorRT engine itself, on this device's GPU (or DLA)",
}


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64) - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def accumulate(a: Accumulator, logits: np.ndarray, ref_logits: np.ndarray, y: np.ndarray) -> None:
    from tledge.validate import finite_array

    finite_array(logits, "a model's logits")
    pred = logits.argmax(1)
    classes = logits.shape[1]
    a.correct += int((pred == y).sum())
    top5 = np.argsort(-logits, axis=1)[:, : min(5, classes)]
    a.correct_top5 += int((top5 == y[:, None]).any(axis=1).sum())
    a.agree += int((pred == ref_logits.argmax(1)).sum())
    a.count += len(y)
    a.abs_logit_diff += float(np.abs(logits - ref_logits).mean()) * len(y)
    log_p, log_q = _log_softmax(ref_logits), _log_softmax(logits)
    a.kl_divergence += float((np.exp(log_p) * (log_p - log_q)).sum())
    if a.confusion is None:
        a.confusion = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(a.confusion, (y, pred), 1)
    for label, ok in zip(y.tolist(), (pred == y).tolist()):
        hit, total = a.per_class_correct.get(label, (0, 0))
        a.per_class_correct[label] = (hit + int(ok), total + 1)


def int8_checks(name: str, precision: str, meta: dict, cpu: dict, sim: Accumulator | None, logits: tuple | None,
                 fused: Accumulator, ref_top1: float) -> dict:
    """The simulated figures of an INT8 variant and, for a CPU model, whether this CPU computes it as meant."""
    from tledge.cpu_isa import CPU_TARGETS
    from tledge.quant.checks import fused_matches_simulation, fused_vs_simulated_figures

    if sim is None:
        return {}
    out = {"simulated": {"top1": round(sim.correct / sim.count, 5), "top1_delta_pp": round((sim.correct / sim.count - ref_top1) * 100, 3),
                         "agreement": round(sim.agree / sim.count, 5)}}
    if precision != "int8-cpu":
        return out
    warnings = []
    check = fused_vs_simulated_figures(np.concatenate(logits[0]), np.concatenate(logits[1]))
    out["fused_vs_simulated"] = {k: v for k, v in check.items() if k != "images"}
    target_name = meta.get("cpu_target")
    target = CPU_TARGETS.get(target_name)
    inside = target.covers(cpu["class"]) if target else None
    out["cpu_target"] = {"name": target_name or "unrecorded", "this_cpu": cpu["class"], "inside_target": inside,
                         "valid_on": sorted(target.classes) if target else None}
    if target is None:
        warnings.append(f"{name}: the model records no CPU target (made before tledge 0.1 tracked them); on CPUs without "
                        "VNNI its full 8-bit weights can saturate int16. Re-quantize with --cpu-target portable")
    elif not inside:
        warnings.append(
            f"{name}: THIS CPU ({cpu['class']}) IS OUTSIDE THE MODEL'S CPU TARGET '{target.name}' (valid on "
            f"{', '.join(sorted(target.classes))}). Its accuracy here ({fused.correct / fused.count:.4f}) is not what the model "
            f"computes on its target (simulated: {sim.correct / sim.count:.4f}); do not ship it to CPUs like this one. "
            "Rebuild with --cpu-target portable for every CPU"
        )
    if (inside or target is None) and not fused_matches_simulation(check):
        warnings.append(
            f"{name}: THIS CPU COMPUTES THE MODEL WRONGLY: its int8 kernels agree with the model's arithmetic on "
            f"{check['top1_agreement']:.1%} of the images (logits off by {check['mean_abs_logit_diff_relative']:.0%} of their spread)"
        )
    if warnings:
        out["warnings"] = warnings
    return out


def class_drift(a: Accumulator, ref: Accumulator, classes: list[str]) -> dict:
    """How the variant's errors moved against the reference's: per-class top-1 change, the classes that lost most,
    and the confusion-matrix cells that changed most (true -> predicted: count change)."""
    per_class = {}
    for k, name in enumerate(classes):
        hit, total = a.per_class_correct.get(k, (0, 0))
        ref_hit, _ = ref.per_class_correct.get(k, (0, 0))
        if total:
            per_class[name] = round((hit - ref_hit) / total * 100, 3)
    shift = a.confusion - ref.confusion if a.confusion is not None and ref.confusion is not None else np.zeros((0, 0), int)
    cells = sorted(((int(shift[i, j]), i, j) for i in range(shift.shape[0]) for j in range(shift.shape[1]) if i != j and shift[i, j]),
                   key=lambda c: -abs(c[0]))
    return {
        "per_class_top1_delta_pp": per_class,
        "lost_most": [{"class": n, "top1_delta_pp": d} for n, d in sorted(per_class.items(), key=lambda kv: kv[1])[:3] if d < 0],
        "confusion_shift": [{"true": classes[i], "predicted": classes[j], "change": c} for c, i, j in cells[:5]],
        "changed_errors": int(np.abs(shift).sum() // 2) if shift.size else 0,
    }
