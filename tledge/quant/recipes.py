"""How each target's INT8 model is made: a recipe quantizes the FP32 model with given ranges and float layers (ONNX
Runtime's ``quantize_static`` with tledge's own ranges), checks the result against its runtime's rules, and writes
the files that go with it (TensorRT's calibration cache)."""

from __future__ import annotations

import abc
import contextlib
import io
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tledge.cpu_isa import CpuTarget, resolve_cpu_target
from tledge.errors import TledgeError
from tledge.quant.calibration_cache import version_code
from tledge.quant.checks import check_tensorrt_qdq, validate_on_this_cpu
from tledge.quant.cpu_weights import check_int16_saturation, make_weights_pair_safe, pair_safe_weight_overrides

if TYPE_CHECKING:  # the config is quantize.py's; a recipe only reads it
    from tledge.quant.quantize import QuantizeConfig


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
    pair_safe_weights = False  # weight rounding's grid: no int16 pair that can saturate (the portable CPU model)
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
        self.pair_safe_weights = not cpu_target.full_range_weights
        self.weight_overrides: dict = {}
        self.weights = ("int8 symmetric per-channel" if cpu_target.full_range_weights
                        else "int8 symmetric per-channel, narrowed where an int16 pair could saturate")

    def prepare(self, fp32_proto):
        from tledge.quant.cpu_kernels import with_padded_stem

        info = {"cpu_target": cpu_target_record(self.cpu_target, self.reason)}
        if not self.cpu_target.full_range_weights:
            # the scales are chosen for the layout the kernels will see: the stem padded to four input channels
            self.weight_overrides, info["narrowing"] = pair_safe_weight_overrides(with_padded_stem(fp32_proto))
        return info

    def quantize(self, src, dst, reader, ranges, keep_float):
        from onnxruntime.quantization import QuantType

        _quantize_static(src, dst, reader, {**_activation_overrides(ranges), **self.weight_overrides}, keep_float,
                         activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, extra_options={"WeightSymmetric": True})

    def finish(self, proto, fp32_proto, keep_float):
        from tledge.quant.cpu_kernels import CHANNEL_MULTIPLE, pad_input_channels
        from tledge.quant.sensitivity import bypass_quantization

        facts = {}
        # Before the int16 pairs are made safe, so that they are made safe in the layout the kernels run; every
        # candidate the drift budget judges is padded, so the budget judges what ships.
        padded = pad_input_channels(proto)
        if padded:
            facts["kernel_layout"] = {"padded_input_channels": padded, "to": CHANNEL_MULTIPLE,
                                      "why": "ONNX Runtime's fast x86 int8 convolution needs input channels in fours"}
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
        return {"validation": validate_on_this_cpu(path, images, self.cpu_target)}


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


def cpu_target_record(target: CpuTarget, reason: str) -> dict:
    return {"name": target.name, "requested": reason, "description": target.description, "valid_on": sorted(target.classes)}
