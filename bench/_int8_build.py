"""What the INT8 experiments in bench/ share: one `tledge build` folder's FP32 model, its validation and test splits
as arrays with their FP32 logits, its calibration statistics, and INT8 models made from them by tledge's recipes.

Imported by the scripts next to it (``python bench/<script>.py`` puts this folder on the path).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Split:
    x: np.ndarray
    y: np.ndarray
    reference: np.ndarray  # FP32 logits


@dataclass
class Int8Build:
    model: Path  # model.fp32.onnx
    fp32: object  # its ONNX proto
    val: Split
    test: Split
    stats: object  # CalibrationStats of the build
    reader: object  # one batch for ONNX Runtime's quantizer (every range is given)

    def make(self, recipe, path: Path, method: str = "minmax", keep_float=(), bias_correction: bool = True):
        """Quantize with ``recipe`` (its runtime's checks included), write ``path``, return the proto."""
        return make_int8(recipe, self.model, self.fp32, self.stats, self.reader, path, method, keep_float, bias_correction)


def make_int8(recipe, model: Path, fp32, stats, reader, path: Path, method: str = "minmax", keep_float=(), bias_correction: bool = True):
    """``model`` (its proto ``fp32``, its calibration statistics ``stats``) quantized by ``recipe`` into ``path``."""
    import onnx

    from tledge.quant.bias_correction import correct_bias

    keep_float = tuple(keep_float)
    recipe.quantize(model, path, reader, stats.ranges(method, recipe.symmetric_activations), keep_float)
    proto, _ = recipe.finish(onnx.load(str(path)), fp32, keep_float)
    if bias_correction:
        correct_bias(proto, fp32, stats.channel_mean)
    onnx.save(proto, str(path))
    return proto


def load_build(build: Path, data: Path) -> Int8Build:
    import onnx

    from tledge.data.images import Preprocess, load_array
    from tledge.data.splits import splits_for
    from tledge.export.onnx_io import onnx_metadata
    from tledge.quant.recipes import ArrayReader
    from tledge.quant.statistics import STATS_FILE, CalibrationStats
    from tledge.runners.ort_runner import OrtRunner

    model = build / "model.fp32.onnx"
    fp32 = onnx.load(str(model))
    meta = onnx_metadata(model, fp32)
    pre = Preprocess.from_dict(meta["preprocess"])
    splits = splits_for(data, build, 0, meta.get("splits_sha256"))
    runner = OrtRunner(model)
    parts = {}
    for name in ("val", "test"):
        x, y = load_array(getattr(splits, name), pre)
        parts[name] = Split(x, y, runner.run_batches(x))
    return Int8Build(model, fp32, parts["val"], parts["test"], CalibrationStats.load(build / STATS_FILE),
                     ArrayReader(meta["input"], parts["val"].x[:16], 16))


def portable_cpu_recipe(fp32):
    from tledge.cpu_isa import resolve_cpu_target
    from tledge.quant.recipes import CpuInt8

    recipe = CpuInt8(*resolve_cpu_target("portable"))
    recipe.prepare(fp32)
    return recipe
