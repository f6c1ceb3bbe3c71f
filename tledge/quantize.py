"""INT8 quantization with real calibration images, as two artifacts for two runtimes.

* ``model.int8.qdq.onnx`` for TensorRT (explicit quantization, TensorRT 8.5 and later): symmetric int8
  activations and per-channel int8 weights (axis 0), zero points 0, FP32 weights behind Q->DQ pairs, float bias.
  Q/DQ sit on the inputs of Conv/Gemm and Add, never between a Conv and its activation, so TensorRT fuses bias
  and ReLU6 into the convolution (a Conv feeding another Conv or an Add is followed by that consumer's Q/DQ).
* ``model.int8.cpu.onnx`` for ONNX Runtime on CPUs: uint8 activations with int8 per-channel weights (U8S8),
  which the VNNI/AVX2 kernels run about 2x faster than FP32, where S8S8 runs no faster than FP32.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .errors import TledgeError, require

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
TARGETS = {"tensorrt": "model.int8.qdq.onnx", "cpu": "model.int8.cpu.onnx"}


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
    method: str = "minmax"
    targets: tuple[str, ...] = ("tensorrt", "cpu")
    keep_float: tuple[str, ...] = ()
    batch_size: int = 16

    def __post_init__(self):
        for name in ("model", "data", "out_dir"):
            object.__setattr__(self, name, Path(getattr(self, name)))
        if self.calibration is not None:
            object.__setattr__(self, "calibration", Path(self.calibration))
        if self.method not in CALIBRATION_METHODS:
            raise TledgeError(f"calibration method must be one of {CALIBRATION_METHODS}, got {self.method!r}")
        unknown = sorted(set(self.targets) - set(TARGETS))
        if unknown or not self.targets:
            raise TledgeError(f"quantization targets must be among {sorted(TARGETS)}, got {list(self.targets)}")

    def to_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


class _ArrayReader:
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


def _ort_method(method: str):
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}[method]


def compute_ranges(
    model: Path, input_name: str, x: np.ndarray, method: str, symmetric: bool, chunk: int = 32, bins: int = 2048
) -> dict[str, tuple[float, float]]:
    """Activation ranges ``{tensor: (min, max)}`` of every tensor in ``model`` over the calibration images ``x``.

    The histogram methods use 2048 bins; entropy searches thresholds over 128 levels a side, as TensorRT's
    entropy calibrator does (ONNX Runtime's quantize_static would use 128 bins for 128 levels, which leaves a
    single candidate and makes "entropy" the same as min-max). Images go through in chunks, so memory stays flat.
    """
    from onnxruntime.quantization import create_calibrator

    extra = {"symmetric": symmetric}
    if method == "entropy":
        extra.update(num_bins=bins, num_quantized_bins=256)
    elif method == "percentile":
        extra.update(num_bins=bins, percentile=99.999)
    with tempfile.TemporaryDirectory(prefix="tledge-calib-") as tmp, _quiet_onnxruntime():
        calibrator = create_calibrator(
            str(model), None, augmented_model_path=str(Path(tmp) / "augmented.onnx"),
            calibrate_method=_ort_method(method), extra_options=extra,
        )
        for start in range(0, len(x), chunk):
            calibrator.collect_data(_ArrayReader(input_name, x[start : start + chunk], 8))
        tensors = calibrator.compute_data()
        ranges = {name: (float(np.min(data.range_value[0])), float(np.max(data.range_value[1]))) for name, data in tensors.data.items()}
        del calibrator  # its ONNX Runtime session holds the augmented model open inside tmp
    return ranges


def _quantize_one(target: str, src: Path, dst: Path, reader: _ArrayReader, ranges: dict, cfg: QuantizeConfig) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    # Our ranges override what quantize_static's own (cheap, min-max) calibration pass finds.
    overrides = {name: [{"rmin": np.float32(lo), "rmax": np.float32(hi)}] for name, (lo, hi) in ranges.items()}
    if target == "tensorrt":
        kwargs = dict(
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
            extra_options={
                "ActivationSymmetric": True, "WeightSymmetric": True, "AddQDQPairToWeight": True,
                "QuantizeBias": False, "OpTypesToExcludeOutputQuantization": ["Conv", "Gemm"],
                "TensorQuantOverrides": overrides,
            },
        )
    else:
        kwargs = dict(activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                      extra_options={"WeightSymmetric": True, "TensorQuantOverrides": overrides})
    reader.rewind()
    with _quiet_onnxruntime():
        try:
            quantize_static(
                str(src), str(dst), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=list(cfg.keep_float), **kwargs,
            )
        except TledgeError:
            raise
        except Exception as exc:  # ORT raises bare Exceptions/ValueErrors for unsupported graphs
            raise TledgeError(f"ONNX Runtime could not quantize {src} for {target}: {type(exc).__name__}: {exc}") from None


@contextlib.contextmanager
def _quiet_onnxruntime():
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


def quantize(cfg: QuantizeConfig) -> dict:
    """Calibrate on real training images and write the INT8 models, ``calibration.json`` and ``quantize.json``.

    >>> quantize(QuantizeConfig(model="out/model.fp32.onnx", data="my_images", out_dir="out"))  # doctest: +SKIP
    """
    require("onnxruntime.quantization", "pip install onnxruntime")
    import onnx

    from .artifacts import atomic_path, write_json
    from .calibration import load_calibration_set, sample_calibration_set
    from .data import Preprocess, Sample, load_array, load_splits
    from .export import load_onnx, read_metadata, set_metadata

    started = time.perf_counter()
    if not cfg.model.is_file():
        raise TledgeError(f"ONNX model {cfg.model} does not exist; run `tledge export` first")
    meta = read_metadata(cfg.model)
    pre = Preprocess.from_dict(meta["preprocess"])
    if cfg.keep_float:
        names = {n.name for n in load_onnx(cfg.model, load_external_data=False).graph.node}
        unknown = [n for n in cfg.keep_float if n not in names]
        if unknown:
            convs = sorted(n for n in names if "Conv" in n or "Gemm" in n)
            raise TledgeError(f"--keep-float names nodes that {cfg.model} does not have: {unknown}; for example {convs[:3]}")
    splits = load_splits(cfg.data, seed=cfg.seed)
    if splits.classes != meta["classes"]:
        raise TledgeError(f"{cfg.data} has classes {splits.classes}, the model was trained on {meta['classes']}")
    if cfg.calibration is not None:
        calib = load_calibration_set(cfg.calibration, splits.root, meta["classes"], pre.input_shape)
    else:
        calib = sample_calibration_set(splits, cfg.num_images, cfg.seed)
    x, _ = load_array([Sample(p, 0) for p in calib.paths], pre)  # labels are not used by calibration
    cfg.out_dir.mkdir(parents=True, exist_ok=True)

    outputs = {}
    ranges_by_symmetry: dict[bool, dict] = {}
    for target in cfg.targets:
        dst = cfg.out_dir / TARGETS[target]
        # TensorRT's activations are symmetric int8, the CPU model's asymmetric uint8. Histogram methods must search
        # thresholds for each; min-max ranges are the same raw extremes (the quantizer symmetrizes them): one pass.
        symmetric = target == "tensorrt" and cfg.method != "minmax"
        if symmetric not in ranges_by_symmetry:
            ranges_by_symmetry[symmetric] = compute_ranges(cfg.model, meta["input"], x, cfg.method, symmetric=symmetric)
        ranges = ranges_by_symmetry[symmetric]
        # Quantize, check and label a temporary file; only a model that passed replaces dst, in one rename.
        with atomic_path(dst) as tmp:
            _quantize_one(target, cfg.model, tmp, _ArrayReader(meta["input"], x, cfg.batch_size), ranges, cfg)
            proto = onnx.load(str(tmp))
            problems = check_tensorrt_qdq(proto) if target == "tensorrt" else []
            if problems:
                raise TledgeError(f"the TensorRT Q/DQ model breaks TensorRT's rules: {'; '.join(problems[:5])}")
            set_metadata(proto, {**meta, "precision": f"int8-{target}", "calibration": "calibration.json", "calibration_method": cfg.method})
            onnx.save(proto, str(tmp))
        ops = [n.op_type for n in proto.graph.node]
        outputs[target] = {
            "path": dst.name,
            "activations": "int8 symmetric" if target == "tensorrt" else "uint8 asymmetric",
            "weights": "int8 symmetric per-channel",
            "quantize_nodes": ops.count("QuantizeLinear"),
            "dequantize_nodes": ops.count("DequantizeLinear"),
            "kept_float": list(cfg.keep_float),
        }
    # Written after the models it describes exist, so it never names images that calibrated nothing on disk.
    write_json(cfg.out_dir / "calibration.json", calib.to_dict(meta["classes"], pre.input_shape))
    record = {
        "stage": "quantize",
        "config": cfg.to_dict(),
        "calibration": {"path": "calibration.json", "images": len(calib.images), "method": cfg.method, "sampling": calib.sampling},
        "models": outputs,
        "seconds": round(time.perf_counter() - started, 2),
    }
    write_json(cfg.out_dir / "quantize.json", record)
    return record
