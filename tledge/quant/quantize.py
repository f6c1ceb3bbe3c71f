"""INT8 quantization with real calibration images, as two artifacts for two runtimes.

* ``model.int8.qdq.onnx`` for TensorRT (explicit quantization, TensorRT 8.5 and later): symmetric int8
  activations and per-channel int8 weights (axis 0), zero points 0, FP32 weights behind Q->DQ pairs, float bias.
  Q/DQ sit on the inputs of Conv/Gemm and Add, never between a Conv and its activation, so TensorRT fuses bias
  and ReLU6 into the convolution (a Conv feeding another Conv or an Add is followed by that consumer's Q/DQ).
* ``model.int8.cpu.onnx`` for ONNX Runtime on CPUs: uint8 activations with int8 per-channel weights (U8S8),
  which the VNNI/AVX2 kernels run about 2x faster than FP32, where S8S8 runs no faster than FP32. Its CPU target
  (:mod:`tledge.cpu_isa`) says which CPUs it computes correctly on: ``portable`` (the default) narrows the weights
  of exactly those channels whose int8 pairs could saturate the int16 step of x86 kernels without VNNI
  (:mod:`tledge.quant.saturation`); ``vnni`` keeps full 8-bit weights for CPUs that accumulate in int32.

The accuracy of a Q/DQ model is judged by simulating its quantized arithmetic (:class:`tledge.runners.backends.OrtRunner`
with ``simulate_int8=True``), never by this machine's int8 kernels alone.
"""

from __future__ import annotations

import abc
import contextlib
import io
import logging
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from tledge.cpu_isa import CPU_TARGET_CHOICES, CpuTarget, resolve_cpu_target
from tledge.errors import TledgeError, require
from tledge.quant.calibration_cache import version_code
from tledge.quant.engine_cost import estimate_float_cost
from tledge.quant.weight_rounding import restore_float_layers
from tledge.export.onnx_io import finite_onnx_weights, onnx_metadata
from tledge.data.images import scan_images

CALIBRATION_METHODS = ("minmax", "entropy", "percentile", "mse", "auto")
# What "auto" chooses between, per model, by validation drift (entropy lost to these on every set in bench/RESULTS.md;
# mse was the only method to meet the budget with every layer in INT8 on clothing-small's TensorRT model).
AUTO_CANDIDATES = ("minmax", "percentile", "mse")


@dataclass(frozen=True)
class QuantizeConfig:
    """Settings for :func:`quantize`.

    ``calibration``: a definition file to reuse (its images are verified by sha256); without one, ``num_images``
    training images are sampled (stratified, seeded). ``keep_float``: node names left in float (per-layer fallback).
    """

    model: Path
    data: Path
    out_dir: Path
    calibration: Path | None = None
    num_images: int = 256
    seed: int = 0
    method: str = "auto"  # per model, the candidate closest to FP32 on validation (bench/RESULTS.md: mse met the budget where minmax could not)
    targets: tuple[str, ...] = ("tensorrt", "cpu")
    keep_float: tuple[str, ...] = ()
    batch_size: int = 16
    cpu_target: str = "portable"
    trt_version: str = "10.3.0"  # header of calibration.cache (JetPack 6.1/6.2); retarget it for another version
    # Drift budget, checked on the validation split by simulating each model's INT8 arithmetic.
    max_top1_drop_pp: float = 0.3
    min_agreement: float = 0.99
    fallback_layers: int = 16  # most layers kept in float to meet the budget; 0 checks and reports only
    # The CPU fallback leaves in INT8 a layer whose float copy slows the model by more than this share (1: no price).
    fallback_max_slowdown: float = 0.15  # bench/RESULTS.md: at 0.15 digits met the budget at 1.78x FP32, not 1.33x
    sensitivity_images: int = 32  # validation images that rank the layers
    budget_images: int = 1000  # most validation images the budget is judged on (evenly spaced; bounds memory)
    bias_correction: bool = True  # shift each quantized layer's bias by its mean weight-rounding error (bench/RESULTS.md: it helped on all three sets)
    # TensorRT model: int8 weight levels chosen by each layer's output error on calibration images (weight_rounding.py)
    weight_rounding: bool = True
    rounding_images: int = 64  # calibration images whose layer inputs choose the levels
    # Quantization-aware fine-tuning when post-training quantization misses the budget (needs the checkpoint).
    checkpoint: Path | None = None
    qat_epochs: int = 2  # 0: never
    # QAT also when post-training meets the budget only with more float layers than this (None: only when it
    # misses): each costs an INT8 engine reformats that cannot be timed without the target. Off by default: for the
    # default build's 16-layer TensorRT model it cost 2.5 minutes and missed the budget (bench/RESULTS.md).
    qat_over_float_layers: int | None = None
    qat_lr: float = 2e-5
    qat_images: int = 2048  # training images per QAT epoch at most

    def __post_init__(self):
        for name in ("model", "data", "out_dir"):
            object.__setattr__(self, name, Path(getattr(self, name)))
        for name in ("calibration", "checkpoint"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))
        if self.qat_epochs < 0 or self.qat_images < 1 or not self.qat_lr > 0 or (self.qat_over_float_layers or 0) < 0:
            raise TledgeError("QAT needs epochs >= 0 (0: off), images >= 1, a positive learning rate and qat_over_float_layers >= 0")
        if self.checkpoint is not None and self.qat_epochs and not self.checkpoint.is_file():
            raise TledgeError(f"checkpoint {self.checkpoint} (for quantization-aware fine-tuning) does not exist")
        if self.method not in CALIBRATION_METHODS:
            raise TledgeError(f"calibration method must be one of {CALIBRATION_METHODS}, got {self.method!r}")
        unknown = sorted(set(self.targets) - set(TARGETS))
        if unknown or not self.targets:
            raise TledgeError(f"quantization targets must be among {sorted(TARGETS)}, got {list(self.targets)}")
        if self.cpu_target not in CPU_TARGET_CHOICES:
            raise TledgeError(f"--cpu-target must be one of {list(CPU_TARGET_CHOICES)}, got {self.cpu_target!r}")
        if "tensorrt" in self.targets:
            version_code(self.trt_version)  # a bad or unsupported version fails before calibration
        if not 0 <= self.max_top1_drop_pp <= 100 or not 0 <= self.min_agreement <= 1:
            raise TledgeError("the drift budget needs 0 <= max top-1 drop <= 100 (points) and 0 <= min agreement <= 1")
        from tledge import validate as V

        V.number("--seed", self.seed, minimum=0)  # numpy refuses negative seeds, deep inside a stage
        if self.fallback_layers < 0:
            raise TledgeError(f"--fallback-layers must be 0 or more, got {self.fallback_layers}")
        if not 0 <= self.fallback_max_slowdown <= 1:
            raise TledgeError(f"--fallback-max-slowdown must be between 0 and 1 (a share of the latency), got {self.fallback_max_slowdown}")
        for name, flag in (("num_images", "--num-calib"), ("sensitivity_images", "sensitivity_images"), ("budget_images", "budget_images"),
                           ("batch_size", "batch_size"), ("rounding_images", "rounding_images")):
            if getattr(self, name) < 1:
                raise TledgeError(f"{flag} (calibration setting {name}) must be at least 1, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


class ArrayReader:
    """ONNX Runtime CalibrationDataReader over a preloaded array, in batches."""

    def __init__(self, input_name: str, x: np.ndarray, batch_size: int):
        self.input_name, self.x, self.batch_size, self.pos = input_name, x, batch_size, 0

    def get_next(self):
        if self.pos >= len(self.x):
            return None
        batch = self.x[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        return {self.input_name: batch}

    def rewind(self):
        self.pos = 0


def _quantize_static(src: Path, dst: Path, reader: ArrayReader, overrides: dict, keep_float: tuple[str, ...], **kwargs) -> None:
    """ONNX Runtime's quantizer with every range given (``TensorQuantOverrides``): its own calibration pass only has
    to see the graph run, so one batch is enough (a test checks that the scales are ours)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

    kwargs["extra_options"] = {**kwargs.get("extra_options", {}), "TensorQuantOverrides": overrides}
    reader.rewind()
    with quiet_onnxruntime():
        try:
            quantize_static(str(src), str(dst), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                            calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=list(keep_float), **kwargs)
        except TledgeError:
            raise
        except Exception as exc:  # ORT raises bare Exceptions/ValueErrors for unsupported graphs
            raise TledgeError(f"ONNX Runtime could not quantize {src}: {type(exc).__name__}: {exc}") from None


def _activation_overrides(ranges: dict[str, tuple[float, float]]) -> dict:
    return {name: [{"rmin": np.float32(lo), "rmax": np.float32(hi)}] for name, (lo, hi) in ranges.items()}


class Recipe(abc.ABC):
    """How one INT8 artifact is made: calibration statistics (as ranges) plus the layers kept in float in, a checked
    model out. Subclasses say what differs between runtimes; :func:`quantize` never asks which one it has."""

    target: str  # the name in QuantizeConfig.targets
    path: str  # file name in the build folder
    symmetric_activations: bool
    activations: str
    weights: str

    def prepare(self, fp32_proto) -> dict:
        """Once per build, before any candidate: facts for the record."""
        return {}

    @abc.abstractmethod
    def quantize(self, src: Path, dst: Path, reader: ArrayReader, ranges: dict, keep_float: tuple[str, ...]) -> None:
        """Write the INT8 model for ``src`` to ``dst`` with these activation ranges and float layers."""

    def finish(self, proto, fp32_proto, keep_float: tuple[str, ...]) -> tuple[object, dict]:
        """Check a fresh candidate against its runtime's rules and fix what the quantizer cannot express."""
        return proto, {}

    def metadata(self) -> dict:
        return {}

    def validate(self, path: Path, images: np.ndarray) -> dict:
        """The chosen model, before it replaces the previous one: refuse it here if it must not ship."""
        return {}

    def companions(self, cfg: "QuantizeConfig", dst: Path, ranges: dict, keep_float: tuple[str, ...]) -> dict:
        """Once the chosen model is in place: the files that go with it."""
        return {}


class TensorRTQDQ(Recipe):
    """Explicit quantization for TensorRT 8.5 and later, plus ``calibration.cache`` for its implicit INT8 path."""

    target, path, symmetric_activations = "tensorrt", "model.int8.qdq.onnx", True
    activations, weights = "int8 symmetric", "int8 symmetric per-channel"

    def quantize(self, src, dst, reader, ranges, keep_float):
        from onnxruntime.quantization import QuantType

        # Q/DQ only on Conv/Gemm inputs: a Conv's output stays float so TensorRT fuses bias and ReLU6 into it.
        _quantize_static(src, dst, reader, _activation_overrides(ranges), keep_float,
                         activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                         extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "AddQDQPairToWeight": True,
                                        "QuantizeBias": False, "OpTypesToExcludeOutputQuantization": ["Conv", "Gemm"]})

    def finish(self, proto, fp32_proto, keep_float):
        problems = check_tensorrt_qdq(proto)
        if problems:
            raise TledgeError(f"the TensorRT Q/DQ model breaks TensorRT's rules: {'; '.join(problems[:5])}")
        return proto, {}

    def companions(self, cfg, dst, ranges, keep_float):
        import onnx

        return {"calibration_cache": TensorRTCalibrationCache(cfg.trt_version).write(cfg.out_dir, onnx.load(str(dst)), ranges, keep_float)}


class CpuInt8(Recipe):
    """ONNX Runtime on CPUs: uint8 activations, int8 per-channel weights, correct on every CPU of ``cpu_target``."""

    target, path, symmetric_activations = "cpu", "model.int8.cpu.onnx", False
    activations = "uint8 asymmetric"

    def __init__(self, cpu_target: CpuTarget, reason: str):
        self.cpu_target, self.reason = cpu_target, reason
        self.weight_overrides: dict = {}
        self.weights = ("int8 symmetric per-channel" if cpu_target.full_range_weights
                        else "int8 symmetric per-channel, narrowed where an int16 pair could saturate")

    def prepare(self, fp32_proto):
        info = {"cpu_target": _cpu_target_record(self.cpu_target, self.reason)}
        if not self.cpu_target.full_range_weights:
            self.weight_overrides, info["narrowing"] = pair_safe_weight_overrides(fp32_proto)
        return info

    def quantize(self, src, dst, reader, ranges, keep_float):
        from onnxruntime.quantization import QuantType

        _quantize_static(src, dst, reader, {**_activation_overrides(ranges), **self.weight_overrides}, keep_float,
                         activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, extra_options={"WeightSymmetric": True})

    def finish(self, proto, fp32_proto, keep_float):
        from tledge.quant.sensitivity import bypass_quantization

        facts = {}
        if not self.cpu_target.full_range_weights:
            facts["pairs_moved_to_limit"] = make_weights_pair_safe(proto, fp32_proto)
            problems = check_int16_saturation(proto)
            if problems:  # a bug in tledge, not the user's: say so rather than ship a wrong model
                raise TledgeError(f"internal error: the portable CPU model can still saturate int16: {'; '.join(problems[:3])}")
        if keep_float:
            # ONNX Runtime quantizes the weights of a float Conv that reads a DequantizeLinear on its own, per
            # tensor (its WeightBiasQuantization pass, on by default), so a kept layer must read a float tensor:
            # the quantizer's range as a Clip (it may stand in for a ReLU6 that ONNX Runtime dropped), no rounding.
            proto = bypass_quantization(proto, fp32_proto, list(keep_float))
        return proto, facts

    def metadata(self):
        return {"cpu_target": self.cpu_target.name}

    def validate(self, path, images):
        return {"validation": _validate_on_this_cpu(path, images, self.cpu_target)}


class TensorRTCalibrationCache:
    """``calibration.cache`` for TensorRT's implicit INT8 path, from the ranges that made the Q/DQ model.

    Every calibrated tensor gets ``amax / 127`` (the Q/DQ model's activation scale where it has one), except the
    outputs of nodes kept in float, which TensorRT then leaves out of INT8.
    """

    path = "calibration.cache"

    def __init__(self, trt_version: str):
        self.trt_version = trt_version

    def write(self, out_dir: Path, qdq_model, ranges: dict[str, tuple[float, float]], keep_float: tuple[str, ...]) -> dict:
        from tledge.artifacts import write_text
        from tledge.quant.calibration_cache import DEFAULT_CALIBRATOR, format_cache

        kept = {o for n in qdq_model.graph.node if n.name in keep_float for o in n.output}
        amax = {name: max(abs(lo), abs(hi)) for name, (lo, hi) in ranges.items() if name not in kept}
        write_text(out_dir / self.path, format_cache(amax, self.trt_version))
        return {"path": self.path, "trt_version": self.trt_version, "version_code": version_code(self.trt_version),
                "calibrator": DEFAULT_CALIBRATOR, "tensors": len(amax)}


TARGETS = {recipe.target: recipe.path for recipe in (TensorRTQDQ, CpuInt8)}  # target name -> file in the build folder
TRT_CACHE = TensorRTCalibrationCache.path


QAT_CHECKPOINT = "model.qat.pt"


@dataclass
class _Source:
    """The FP32 model a recipe quantizes: the exported one, or its quantization-aware fine-tune."""

    path: Path
    proto: object
    stats: object
    qat: dict | None
    checkpoint: Path | None = None
    rounding: dict | None = None  # what weight rounding did, for a source whose weights it chose


def _qat_source(cfg: "QuantizeConfig", splits, calibration_x: np.ndarray, work: Path) -> _Source:
    """Fine-tune the checkpoint quantization-aware, export it and calibrate it (in ``work``)."""
    import onnx

    from tledge.quant.statistics import calibrate
    from tledge.export.onnx_export import ExportConfig, export_onnx
    from tledge.quant.qat import QatConfig, qat_finetune

    checkpoint, onnx_path = work / QAT_CHECKPOINT, work / "model.qat.fp32.onnx"
    record = qat_finetune(QatConfig(checkpoint=cfg.checkpoint, out=checkpoint, epochs=cfg.qat_epochs, lr=cfg.qat_lr,
                                    max_images=cfg.qat_images, seed=cfg.seed), splits.train, calibration_x)
    record["export_parity"] = export_onnx(ExportConfig(checkpoint=checkpoint, out=onnx_path, data=cfg.data))["parity"]["max_abs_diff"]
    stats, _ = calibrate(onnx_path, calibration_x, {"qat": True})
    return _Source(onnx_path, onnx.load(str(onnx_path)), stats, qat=record, checkpoint=checkpoint)


def _rounded_source(cfg: "QuantizeConfig", fp32_proto, calibration_x: np.ndarray, work: str) -> _Source:
    """The FP32 model with weights on the int8 levels its layers' output error chose, calibrated (in ``work``)."""
    import onnx

    from tledge.quant.statistics import calibrate
    from tledge.quant.weight_rounding import round_weights

    proto, record = round_weights(fp32_proto, calibration_x[: cfg.rounding_images])
    path = Path(work) / "model.rounded.fp32.onnx"
    onnx.save(proto, str(path))
    stats, _ = calibrate(path, calibration_x, {"weight_rounding": True})
    return _Source(path, proto, stats, qat=None, rounding=record)


def make_recipes(cfg: "QuantizeConfig") -> list[Recipe]:
    """The recipe of each requested target, in the order asked."""
    cpu_target, reason = resolve_cpu_target(cfg.cpu_target)
    made = {"tensorrt": lambda: TensorRTQDQ(), "cpu": lambda: CpuInt8(cpu_target, reason)}
    return [made[t]() for t in cfg.targets]


@contextlib.contextmanager
def quiet_onnxruntime():
    """Mute ONNX Runtime's advice to pre-process (our exported graph is already folded), its C++ warnings and prints."""
    import onnxruntime

    logger = logging.getLogger()
    previous = logger.level
    logger.setLevel(logging.ERROR)
    onnxruntime.set_default_logger_severity(3)
    try:
        # The histogram calibrators print() their progress; stdout belongs to tledge's own output (--json).
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logger.setLevel(previous)
        onnxruntime.set_default_logger_severity(2)


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

    from tledge.quant.saturation import from_gemm_rows, gemm_rows, quantize_pair_safe

    float_weights = {i.name: i for i in fp32_model.graph.initializer}
    fp32_nodes = {n.name: n for n in fp32_model.graph.node}
    changed = 0
    for node, dq, inits in _quantized_weights(model):
        source = fp32_nodes.get(node.name)
        if source is None or source.input[1] not in float_weights:
            raise TledgeError(f"cannot find the FP32 weight of {node.name} to make it safe for x86 int8 kernels")
        weight = numpy_helper.to_array(float_weights[source.input[1]])
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


def _rank_methods(make, budget, work: Path, keep_float: tuple[str, ...]) -> tuple[list[str], dict]:
    """``auto``: the calibration methods, the one whose model (before any fallback) stays closest to FP32 on
    validation first."""
    from tledge.quant.drift_budget import score

    figures = {}
    for method in AUTO_CANDIDATES:
        path = work / f"auto-{method}.onnx"
        make(keep_float, path, method)
        figures[method] = {k: v for k, v in budget.evaluate(path).items() if k in ("top1", "top1_drop_pp", "agreement", "expected_agreement")}
        path.unlink()
    ranked = sorted(AUTO_CANDIDATES, key=lambda m: (-score(figures[m]), AUTO_CANDIDATES.index(m)))  # a tie goes to min-max
    return ranked, {"candidates": figures, "order": ranked,
                    "by": "expected agreement with FP32 minus top-1 lost, validation, simulated, before any fallback"}


def _cpu_target_record(target: CpuTarget, reason: str) -> dict:
    return {"name": target.name, "requested": reason, "description": target.description, "valid_on": sorted(target.classes)}


def _validate_on_this_cpu(path: Path, x: np.ndarray, target: CpuTarget, max_images: int = 128) -> dict:
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


def quantize(cfg: QuantizeConfig) -> dict:
    """Calibrate on real training images and write the INT8 models, ``calibration.json`` and ``quantize.json``.

    >>> quantize(QuantizeConfig(model="out/model.fp32.onnx", data="my_images", out_dir="out"))  # doctest: +SKIP
    """
    require("onnxruntime.quantization", "pip install onnxruntime")
    import onnx

    from tledge.artifacts import atomic_path, write_json
    from tledge.quant.bias_correction import correct_bias
    from tledge.quant.statistics import STATS_FILE, calibrate, calibration_key
    from tledge.quant.calibration import calibration_warnings, load_calibration_set, sample_calibration_set
    from tledge.data.images import Preprocess, Sample, load_array
    from tledge.data.splits import splits_for
    from tledge.quant.drift_budget import TRIED_KEYS, DriftBudget, describe_drift, score
    from tledge.export.onnx_io import load_onnx, set_metadata

    from tledge import validate

    started = time.perf_counter()
    if not cfg.model.is_file():
        raise TledgeError(f"ONNX model {cfg.model} {'is a folder, not a file' if cfg.model.is_dir() else 'does not exist'}; run `tledge export` first")
    validate.output_dir(cfg.out_dir, "--out-dir")
    fp32_proto = load_onnx(cfg.model)
    meta = onnx_metadata(cfg.model, fp32_proto)
    finite_onnx_weights(fp32_proto, cfg.model)  # NaN weights would calibrate NaN ranges
    if meta.get("precision", "fp32") != "fp32":
        raise TledgeError(f"{cfg.model} is already quantized ({meta['precision']}); quantize the FP32 model from `tledge export`")
    pre = Preprocess.from_dict(meta["preprocess"])
    if cfg.keep_float:
        names = {n.name for n in load_onnx(cfg.model, load_external_data=False).graph.node}
        unknown = [n for n in cfg.keep_float if n not in names]
        if unknown:
            convs = sorted(n for n in names if "Conv" in n or "Gemm" in n)
            raise TledgeError(f"--keep-float names nodes that {cfg.model} does not have: {unknown}; for example {convs[:3]}")
    splits = splits_for(cfg.data, cfg.model.parent, cfg.seed, meta.get("splits_sha256"))
    if splits.classes != meta["classes"]:
        raise TledgeError(f"{cfg.data} has classes {splits.classes}, the model was trained on {meta['classes']}")
    if cfg.calibration is not None:
        calib = load_calibration_set(cfg.calibration, splits.root, meta["classes"], pre.input_shape)
    else:
        calib = sample_calibration_set(splits, cfg.num_images, cfg.seed)
    scan_images([*calib.paths, *(s.path for s in splits.val)])  # what calibration and the drift budget read
    x, _ = load_array([Sample(p, 0) for p in calib.paths], pre)  # labels are not used by calibration
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    validate.start_rewrite(cfg.out_dir, "quantize")

    budget = DriftBudget(cfg, splits, pre)
    # One pass of the calibration images through the FP32 model; every method below is a choice over its statistics.
    key = calibration_key(cfg.model, [digest for _, digest in calib.images])
    stats, stats_reused = calibrate(cfg.model, x, key, cfg.out_dir / STATS_FILE)
    base = _Source(cfg.model, fp32_proto, stats, qat=None)
    rounded = None  # the TensorRT model's source when weight rounding is on: made once, below
    qat_source: list[_Source] = []  # made at most once, by the first model that needs it
    one_batch = ArrayReader(meta["input"], x[: cfg.batch_size], cfg.batch_size)
    outputs = {}
    try:
        for recipe in make_recipes(cfg):
            dst = cfg.out_dir / recipe.path
            info = recipe.prepare(fp32_proto)
            facts: dict[Path, dict] = {}  # per candidate file: the record describes the one chosen
            recipe_base = base
            if recipe.target == "tensorrt" and cfg.weight_rounding:
                if rounded is None:
                    rounded = _rounded_source(cfg, fp32_proto, x, tempfile.mkdtemp(prefix=".tledge-rounding-", dir=cfg.out_dir))
                recipe_base = rounded
                info["weight_rounding"] = rounded.rounding

            def make(keep_float: tuple[str, ...], path: Path, method: str, source: _Source = recipe_base, recipe=recipe, facts=facts):
                """Quantize with ``keep_float`` in float, check the result against its runtime's rules, label it."""
                recipe.quantize(source.path, path, one_batch, source.stats.ranges(method, recipe.symmetric_activations), keep_float)
                proto, facts[path] = recipe.finish(onnx.load(str(path)), source.proto, keep_float)
                if source.rounding and keep_float:
                    restore_float_layers(proto, fp32_proto, keep_float)
                if cfg.bias_correction:
                    facts[path]["bias_correction"] = correct_bias(proto, source.proto, source.stats.channel_mean)
                set_metadata(proto, {**meta, "precision": f"int8-{recipe.target}", "calibration": "calibration.json",
                                     "calibration_method": method, "kept_float": list(keep_float), **recipe.metadata(),
                                     **({"weights": "quantization-aware fine-tuned"} if source.qat else {}),
                                     **({"weights": "int8 levels chosen by output error"} if source.rounding else {})})
                onnx.save(proto, str(path))
                return proto

            # Candidates live in a private folder; only the chosen model replaces dst, in one rename.
            with tempfile.TemporaryDirectory(prefix=".tledge-quantize-", dir=cfg.out_dir) as work:
                methods = [cfg.method]
                if cfg.method == "auto":
                    methods, info["method_choice"] = _rank_methods(make, budget, Path(work), tuple(cfg.keep_float))
                # auto: the fallback starts from the method closest to FP32; only if even that misses the budget does
                # the next one get a search. Searching every method for the fewest float layers chose a model that
                # met the budget on validation by luck (digits: percentile, 2 layers, test agreement 0.978).
                outcomes = []
                for method in methods:
                    (Path(work) / method).mkdir()
                    outcome = budget.meet(lambda keep, path, method=method: make(keep, path, method), Path(work) / method, fp32_proto, recipe.target)
                    outcomes.append((method, *outcome))
                    if outcome[2]["met"]:
                        break
                method, chosen, keep_float, info["drift"], fallback = max(outcomes, key=lambda o: (o[3]["met"], score(o[3])))
                if cfg.method == "auto":
                    info["method_choice"]["budget_search"] = [{"method": m, "layers_in_float": len(k) - len(cfg.keep_float), **{key: d[key] for key in TRIED_KEYS}}
                                                              for m, _, k, d, _ in outcomes]
                    info["method_choice"]["chosen"] = method
                info["calibration_method"] = method
                source = base  # the implicit path builds from the FP32 model: its cache takes that model's ranges
                added = len(keep_float) - len(cfg.keep_float)
                # QAT when post-training misses the budget, or meets it only by keeping many layers in float.
                wants_qat = not info["drift"]["met"] or (cfg.qat_over_float_layers is not None and added > cfg.qat_over_float_layers)
                if wants_qat and cfg.checkpoint is not None and cfg.qat_epochs > 0:
                    if not qat_source:
                        qat_source.append(_qat_source(cfg, splits, x, Path(tempfile.mkdtemp(prefix=".tledge-qat-", dir=cfg.out_dir))))
                    qat = qat_source[0]
                    (Path(work) / "qat").mkdir()
                    q_chosen, q_keep, q_drift, q_fallback = budget.meet(
                        lambda keep, path: make(keep, path, method, source=qat), Path(work) / "qat", qat.proto, recipe.target)
                    if info["drift"]["met"]:  # both within the budget: the one with fewer float layers ships
                        better = q_drift["met"] and len(q_keep) < len(keep_float)
                        why = f"post-training met the budget with {added} layers in float, over qat_over_float_layers ({cfg.qat_over_float_layers})"
                    else:
                        better = q_drift["met"] or score(q_drift) > score(info["drift"])
                        why = "post-training missed the budget"
                    info["qat"] = {**qat.qat, "why": why, "post_training_drift": info["drift"],
                                   "post_training_float_layers": added, "drift": q_drift, "float_layers": len(q_keep) - len(cfg.keep_float),
                                   "chosen": better}
                    if better:
                        chosen, keep_float, info["drift"], fallback, source = q_chosen, q_keep, q_drift, q_fallback, qat
                if fallback:
                    info["fallback"] = fallback
                chosen_facts = dict(facts.get(chosen, {}))
                if "bias_correction" in chosen_facts:
                    info["bias_correction"] = chosen_facts.pop("bias_correction")
                if "narrowing" in info:
                    info["narrowing"].update(chosen_facts)
                with atomic_path(dst) as tmp:
                    shutil.copyfile(chosen, tmp)
                    info.update(recipe.validate(tmp, budget.images()))
            info.update(recipe.companions(cfg, dst, source.stats.ranges(method, recipe.symmetric_activations), keep_float))
            proto = onnx.load(str(dst))
            ops = [n.op_type for n in proto.graph.node]
            if recipe.target == "tensorrt":  # float layers cost an engine more than their MACs: say how much
                info["engine_cost"] = estimate_float_cost(proto)
            outputs[recipe.target] = {
                "path": dst.name,
                "activations": recipe.activations,
                "weights": recipe.weights,
                "quantize_nodes": ops.count("QuantizeLinear"),
                "dequantize_nodes": ops.count("DequantizeLinear"),
                "kept_float": list(keep_float),
                **info,
            }
        if any(o.get("qat", {}).get("chosen") for o in outputs.values()):  # the weights the shipped INT8 models came from
            with atomic_path(cfg.out_dir / QAT_CHECKPOINT) as tmp:
                shutil.copyfile(qat_source[0].checkpoint, tmp)
        else:  # never leave an earlier run's QAT weights beside models that did not come from them
            (cfg.out_dir / QAT_CHECKPOINT).unlink(missing_ok=True)
    finally:
        if qat_source:
            shutil.rmtree(qat_source[0].path.parent, ignore_errors=True)
        if rounded is not None:
            shutil.rmtree(rounded.path.parent, ignore_errors=True)
    warnings = [f"{target}: INT8 DRIFT BUDGET MISSED: {describe_drift(o['drift'])}" for target, o in outputs.items() if not o["drift"]["met"]]
    for target, o in outputs.items():
        versus = o.get("fallback", {}).get("latency_cost", {}).get("speedup_vs_fp32", {})
        if versus and min(versus.values()) < 1.0:
            warnings.append(f"{target}: with {len(o['kept_float'])} layer(s) in float the INT8 model is slower than FP32 on this CPU "
                            f"({versus['one_thread']:.2f}x FP32's speed on one thread, {versus['all_cores']:.2f}x on every core): "
                            f"ship FP32 here, or loosen the drift budget")
    warnings += calibration_warnings(calib, meta["classes"])
    one_image_pp = 100 / max(1, len(budget.samples))
    if 0 < cfg.max_top1_drop_pp < one_image_pp:
        warnings.append(f"the drift budget is judged on {len(budget.samples)} validation images, where one image is {one_image_pp:.2f} pt of "
                        f"top-1: a budget of {cfg.max_top1_drop_pp:g} pt allows no lost image (more validation images make it finer)")
    # Written after the models it describes exist, so it never names images that calibrated nothing on disk.
    write_json(cfg.out_dir / "calibration.json", calib.to_dict(meta["classes"], pre.input_shape))
    record = {
        "stage": "quantize",
        "artifacts": [o["path"] for o in outputs.values()] + [o["calibration_cache"]["path"] for o in outputs.values() if "calibration_cache" in o]
        + ["calibration.json", STATS_FILE] + ([QAT_CHECKPOINT] if (cfg.out_dir / QAT_CHECKPOINT).is_file() else []) + ["quantize.json"],
        "config": cfg.to_dict(),
        "calibration": {"path": "calibration.json", "images": len(calib.images), "method": cfg.method, "sampling": calib.sampling,
                        "statistics": {"path": STATS_FILE, "tensors": len(stats.names), "reused": stats_reused}},
        "budget": {"max_top1_drop_pp": cfg.max_top1_drop_pp, "min_agreement": cfg.min_agreement, "split": budget.split_name},
        "models": outputs,
        "warnings": warnings,
        "seconds": round(time.perf_counter() - started, 2),
    }
    record["sha256"] = validate.digests(cfg.out_dir, [n for n in record["artifacts"] if n != "quantize.json"])
    write_json(cfg.out_dir / "quantize.json", record)
    return record
