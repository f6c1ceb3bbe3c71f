"""The FP32 model a recipe quantizes: the exported one, the same with int8 weight levels chosen by output error
(weight rounding), or its quantization-aware fine-tune; each calibrated on the same images."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # quantize.py's config; a source only reads it
    from tledge.quant.quantize import QuantizeConfig


QAT_CHECKPOINT = "model.qat.pt"


@dataclass
class Source:
    """The FP32 model a recipe quantizes: the exported one, or its quantization-aware fine-tune."""

    path: Path
    proto: object
    stats: object
    qat: dict | None
    checkpoint: Path | None = None
    rounding: dict | None = None  # what weight rounding did, for a source whose weights it chose


def make_qat_source(cfg: "QuantizeConfig", splits, calibration_x: np.ndarray, work: Path) -> Source:
    """Fine-tune the checkpoint quantization-aware, export it and calibrate it (in ``work``)."""
    import onnx

    from tledge.export.onnx_export import ExportConfig, export_onnx
    from tledge.quant.qat import QatConfig, qat_finetune
    from tledge.quant.statistics import calibrate

    checkpoint, onnx_path = work / QAT_CHECKPOINT, work / "model.qat.fp32.onnx"
    record = qat_finetune(QatConfig(checkpoint=cfg.checkpoint, out=checkpoint, epochs=cfg.qat_epochs, lr=cfg.qat_lr,
                                    max_images=cfg.qat_images, seed=cfg.seed), splits.train, calibration_x)
    record["export_parity"] = export_onnx(ExportConfig(checkpoint=checkpoint, out=onnx_path, data=cfg.data))["parity"]["max_abs_diff"]
    stats, _ = calibrate(onnx_path, calibration_x, {"qat": True})
    return Source(onnx_path, onnx.load(str(onnx_path)), stats, qat=record, checkpoint=checkpoint)


def make_rounded_source(cfg: "QuantizeConfig", fp32_proto, calibration_x: np.ndarray, work: str, pair_safe: bool = False) -> Source:
    """The FP32 model with weights on the int8 levels its layers' output error chose, calibrated (in ``work``);
    ``pair_safe``: on the portable CPU model's grid (:func:`tledge.quant.weight_rounding.round_weights`)."""
    import onnx

    from tledge.quant.statistics import calibrate
    from tledge.quant.weight_rounding import round_weights

    proto, record = round_weights(fp32_proto, calibration_x[: cfg.rounding_images], pair_safe=pair_safe)
    path = Path(work) / "model.rounded.fp32.onnx"
    onnx.save(proto, str(path))
    stats, _ = calibrate(path, calibration_x, {"weight_rounding": "pair-safe" if pair_safe else True})
    return Source(path, proto, stats, qat=None, rounding=record)
