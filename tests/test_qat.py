"""Quantization-aware fine-tuning: the fallback when post-training INT8 misses the drift budget."""

from __future__ import annotations

import onnx
import pytest
import torch

from tledge.errors import TledgeError
from tledge.export.onnx_io import read_metadata
from tledge.quant.checks import check_tensorrt_qdq
from tledge.quant.qat import _fake_quant_weight, _input_amax, _QuantAware
from tledge.quant.quantize import QuantizeConfig, quantize
from tledge.quant.sources import QAT_CHECKPOINT


def test_fake_quantized_weights_are_the_int8_grid_per_channel_and_pass_gradients():
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    q = _fake_quant_weight(w)
    scale = w.detach().abs().reshape(4, -1).amax(1) / 127
    levels = q.detach() / scale[:, None, None, None]
    assert torch.allclose(levels, levels.round(), atol=1e-4) and levels.abs().max() <= 127 + 1e-4
    q.sum().backward()
    assert torch.all(w.grad == 1)  # straight through


def test_quantization_aware_forward_is_removed_cleanly(tiny_pipeline):
    from tledge.models import load_checkpoint

    model, meta = load_checkpoint(tiny_pipeline / "model.pt")
    x = torch.randn(4, *meta["preprocess"].input_shape)
    with torch.no_grad():
        before = model(x)
        quant = _QuantAware(model, _input_amax(model, x.numpy(), 4))
        rounded = model(x)
        quant.remove()
        after = model(x)
    assert not torch.equal(rounded, before)  # the forward really rounds
    assert torch.equal(after, before)  # and leaves a plain FP32 model with the same weights
    assert not any("parametrizations" in k for k in model.state_dict())


def test_qat_rescues_a_model_that_post_training_quantization_cannot_bring_within_budget(tiny_pipeline, tiny_dataset, tmp_path):
    """A budget no post-training model meets (no fallback allowed): QAT runs, its model is checked against the same
    TensorRT rules and the same FP32 reference, and the better of the two ships, with its weights beside it."""
    record = quantize(QuantizeConfig(model=tiny_pipeline / "model.fp32.onnx", data=tiny_dataset, out_dir=tmp_path,
                                     calibration=tiny_pipeline / "calibration.json", checkpoint=tiny_pipeline / "model.pt",
                                     targets=("tensorrt",), fallback_layers=0, max_top1_drop_pp=0.0, min_agreement=1.0, qat_epochs=2,
                                     bias_correction=False, weight_rounding=False))  # the premise: plain post-training rounding
    trt = record["models"]["tensorrt"]
    ptq, qat = trt["qat"]["post_training_drift"], trt["qat"]["drift"]
    assert not ptq["met"]  # the premise: post-training quantization misses this budget
    assert len(trt["qat"]["loss_per_epoch"]) == 2 and trt["qat"]["export_parity"] < 1e-3
    from tledge.quant.drift_budget import score

    assert trt["qat"]["chosen"] == (qat["met"] or score(qat) > score(ptq))  # score: expected agreement less the top-1 lost
    assert trt["qat"]["chosen"], "QAT did not improve on post-training quantization of the tiny model"
    model = onnx.load(str(tmp_path / "model.int8.qdq.onnx"))
    assert check_tensorrt_qdq(model) == []
    assert read_metadata(model)["weights"] == "quantization-aware fine-tuned"
    assert trt["drift"] == qat and (tmp_path / QAT_CHECKPOINT).is_file()
    assert not list(tmp_path.glob(".tledge-qat-*"))  # its scratch folder is gone


def test_qat_is_never_run_when_the_budget_is_met_and_bad_settings_fail_early(tiny_pipeline, tiny_dataset, tmp_path):
    (tmp_path / QAT_CHECKPOINT).write_bytes(b"left by an earlier run")
    record = quantize(QuantizeConfig(model=tiny_pipeline / "model.fp32.onnx", data=tiny_dataset, out_dir=tmp_path, targets=("tensorrt",),
                                     calibration=tiny_pipeline / "calibration.json", checkpoint=tiny_pipeline / "model.pt",
                                     fallback_layers=0, max_top1_drop_pp=100, min_agreement=0.0))
    assert "qat" not in record["models"]["tensorrt"]
    assert not (tmp_path / QAT_CHECKPOINT).exists()  # weights that made no shipped model are not left beside them
    with pytest.raises(TledgeError, match="does not exist"):
        QuantizeConfig(model=tiny_pipeline / "model.fp32.onnx", data=tiny_dataset, out_dir=tmp_path, checkpoint=tmp_path / "nope.pt")
    with pytest.raises(TledgeError, match="QAT needs"):
        QuantizeConfig(model=tiny_pipeline / "model.fp32.onnx", data=tiny_dataset, out_dir=tmp_path, qat_epochs=-1)


def test_qat_is_tried_when_post_training_needs_many_float_layers(tiny_pipeline, tiny_dataset, tmp_path):
    """Post-training meets the budget only with layers in float (more than ``qat_over_float_layers``, here 0): QAT is
    tried too, and its model ships only if it meets the budget with fewer float layers."""
    from tledge.report.markdown import quantized_model_lines

    common = dict(model=tiny_pipeline / "model.fp32.onnx", data=tiny_dataset, calibration=tiny_pipeline / "calibration.json",
                  checkpoint=tiny_pipeline / "model.pt", targets=("tensorrt",), max_top1_drop_pp=100, bias_correction=False, weight_rounding=False)
    # A budget that only a fallback meets: the agreement of the first fallback step that beats no fallback.
    probe = quantize(QuantizeConfig(out_dir=tmp_path / "probe", min_agreement=1.0, qat_epochs=0, **common))
    tried = probe["models"]["tensorrt"]["fallback"]["tried"]
    floor = [min(t["agreement"], t["expected_agreement"]) for t in tried]
    step = next((i for i in range(1, len(tried)) if floor[i] > floor[0]), None)
    assert step is not None, f"no fallback step of the tiny model beats none: {tried}"
    record = quantize(QuantizeConfig(out_dir=tmp_path / "qat", min_agreement=floor[step], qat_epochs=1, qat_over_float_layers=0, **common))
    trt = record["models"]["tensorrt"]
    qat = trt["qat"]
    assert qat["post_training_drift"]["met"] and qat["post_training_float_layers"] == tried[step]["layers"]
    assert "over qat_over_float_layers (0)" in qat["why"]
    assert qat["chosen"] == (qat["drift"]["met"] and qat["float_layers"] < qat["post_training_float_layers"])
    assert len(trt["kept_float"]) == (qat["float_layers"] if qat["chosen"] else qat["post_training_float_layers"])
    assert "Quantization-aware fine-tuning (post-training met the budget" in "\n".join(quantized_model_lines("tensorrt", trt))


def test_qat_is_not_tried_when_post_training_needs_few_float_layers(tiny_pipeline, tiny_dataset, tmp_path):
    record = quantize(QuantizeConfig(model=tiny_pipeline / "model.fp32.onnx", data=tiny_dataset, out_dir=tmp_path,
                                     calibration=tiny_pipeline / "calibration.json", checkpoint=tiny_pipeline / "model.pt",
                                     targets=("tensorrt",), max_top1_drop_pp=100, min_agreement=0.0, qat_epochs=1))
    trt = record["models"]["tensorrt"]
    assert trt["drift"]["met"] and trt["kept_float"] == [] and "qat" not in trt
