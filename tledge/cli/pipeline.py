"""The commands of the pipeline: build, finetune, export, quantize (each parses its flags and calls one stage function)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Optional

import typer

from tledge.cli.app import app, examples, print_warnings, typed_flags
from tledge.defaults import default as D
from tledge.errors import TledgeError
from tledge.export.onnx_export import ExportConfig
from tledge.pipeline.build import BuildConfig
from tledge.pipeline.config import merge
from tledge.quant.quantize import QuantizeConfig
from tledge.train.finetune import FinetuneConfig


def _parse_unfreeze(text: str) -> tuple[int, ...]:
    if text.strip().lower() in ("", "none", "0"):
        return ()
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise TledgeError(f"--unfreeze takes comma-separated block counts such as 3 or 3,6 (or none), got {text!r}") from None


@app.command(epilog=examples(
    "tledge build                                  # offline default: EfficientNet-Lite0 on real digits",
    "tledge build --data my_images --out release   # your ImageFolder tree",
    "tledge build --data my_images --model mobilenet_v3_large --unfreeze 3,6",
))
def build(
    ctx: typer.Context,
    out: Path = typer.Option(D(BuildConfig, "out"), "--out", "-o", help="Folder for every artifact (created)."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="ImageFolder root (train/ + val/ [+ test/], or one folder per class). Default: scikit-learn's digits, offline."),
    model: str = typer.Option(D(BuildConfig, "model"), "--model", "-m", help="Backbone name (see `tledge models`)."),
    weights: str = typer.Option(D(BuildConfig, "weights"), help="'pretrained', 'none' (from scratch) or a state-dict file."),
    image_size: Optional[int] = typer.Option(None, help="Network input size (default: the model's; 128 for the digits)."),
    resize: Optional[int] = typer.Option(None, help="Shorter side before the center crop (default keeps the model's ratio)."),
    unfreeze: str = typer.Option(",".join(map(str, D(BuildConfig, "unfreeze"))), help="Blocks thawed by each fine-tuning stage after feature extraction (strategy staged, the build's default), e.g. 3 or 3,6; 'none' for feature extraction only."),
    strategy: str = typer.Option(D(BuildConfig, "strategy"), help="Fine-tuning strategy: auto, linear, staged or full (see `tledge finetune --help`)."),
    scratch: bool = typer.Option(D(BuildConfig, "scratch"), "--scratch/--no-scratch", help="Train a cheap from-scratch baseline and report the transfer gain (--no-scratch skips it)."),
    scratch_epochs: int = typer.Option(D(BuildConfig, "scratch_epochs"), help="Epochs of that baseline (0 skips it too)."),
    epochs: int = typer.Option(D(BuildConfig, "epochs"), help="Most epochs per stage (early stopping ends sooner)."),
    patience: int = typer.Option(D(BuildConfig, "patience"), help="Epochs without validation improvement before a stage stops."),
    calibration: Optional[Path] = typer.Option(None, help="Calibration definition (JSON image list with sha256) to reuse."),
    num_calib: int = typer.Option(D(BuildConfig, "num_calib"), help="Calibration images to sample when no definition is given."),
    calib_method: str = typer.Option(D(BuildConfig, "calib_method"), help="Calibration method, a choice over one pass of statistics: minmax, percentile (99.999th), entropy (KL, as TensorRT), mse (least squared error) or auto (default: per model, whichever of minmax, percentile and mse has the highest expected agreement with FP32 on validation; the next one if even its fallback misses the budget)."),
    cpu_target: str = typer.Option(D(BuildConfig, "cpu_target"), help="CPU INT8 model's target: portable (right on every x86 and ARM CPU; default), vnni (full 8-bit weights, only for CPUs with VNNI/AMX or ARM) or native (this machine's class)."),
    trt_version: str = typer.Option(D(BuildConfig, "trt_version"), help="TensorRT version named in calibration.cache (implicit INT8, 8.5 to 10.x): 8.5.2 JetPack 5.1, 8.6.2 JetPack 6.0, 10.3.0 JetPack 6.1/6.2."),
    max_top1_drop: float = typer.Option(D(BuildConfig, "max_top1_drop_pp"), help="Drift budget: most top-1 an INT8 model may lose against FP32 on the validation split, in points."),
    min_agreement: float = typer.Option(D(BuildConfig, "min_agreement"), help="Drift budget: least share of validation predictions an INT8 model must share with FP32."),
    fallback_layers: int = typer.Option(D(BuildConfig, "fallback_layers"), help="Most layers kept in float to meet the drift budget (0: check and report only)."),
    fallback_max_slowdown: float = typer.Option(D(BuildConfig, "fallback_max_slowdown"), help="CPU model: leave in INT8 any layer whose float copy would slow it by more than this share, measured here (0.15: 15%; 1: keep by sensitivity alone)."),
    bias_correction: bool = typer.Option(D(BuildConfig, "bias_correction"), help="Shift each quantized layer's bias by the mean error its int8 weights add (from the calibration statistics); on by default."),
    weight_rounding: bool = typer.Option(D(BuildConfig, "weight_rounding"), help="Both INT8 models: choose each layer's int8 weight levels by the error they add to its output on calibration images, instead of rounding to nearest (the portable CPU model on its pair-safe grid); on by default."),
    qat_epochs: int = typer.Option(D(BuildConfig, "qat_epochs"), help="When post-training INT8 misses the drift budget, or meets it only with more than --qat-over-float-layers layers in float, epochs of quantization-aware fine-tuning to try (0: never)."),
    qat_over_float_layers: Optional[int] = typer.Option(None, help="Try QAT also when post-training needs more float layers than this to meet the budget (default: only when it misses); the QAT model then ships if it meets the budget with fewer."),
    bench_iterations: int = typer.Option(D(BuildConfig, "bench_iterations"), help="Timed runs per variant."),
    target_accuracy: Optional[float] = typer.Option(None, help="Find each variant's confidence threshold that reaches this test accuracy on the images it accepts (a device abstains below it); recorded in bench.json and the report."),
    threads: Optional[int] = typer.Option(None, help="CPU threads for ONNX Runtime (default: all)."),
    seed: int = typer.Option(D(BuildConfig, "seed"), help="Seed for splits, sampling and training."),
    allow_duplicates: bool = typer.Option(False, "--allow-duplicates", help="Keep going when byte-identical images sit in more than one split (otherwise an error: the model would be scored on images it trained on)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report summary as JSON instead of a table."),
    config: Optional[Path] = typer.Option(None, "--config", help="A tledge.toml whose [build] sets any of this command's settings; flags typed here win."),
):
    """Run the whole pipeline: finetune, export, quantize, bench, report, manifest."""
    from tledge.pipeline.build import build as run_build
    from tledge.pipeline.build import format_table

    given = dict(
        out=out, data=data, model=model, weights=weights, image_size=image_size, resize=resize,
        unfreeze=_parse_unfreeze(unfreeze), strategy=strategy, scratch=scratch, scratch_epochs=scratch_epochs,
        epochs=epochs, patience=patience, calibration=calibration,
        num_calib=num_calib, calib_method=calib_method, cpu_target=cpu_target, trt_version=trt_version,
        max_top1_drop_pp=max_top1_drop, min_agreement=min_agreement, fallback_layers=fallback_layers, fallback_max_slowdown=fallback_max_slowdown, bias_correction=bias_correction, weight_rounding=weight_rounding,
        qat_epochs=qat_epochs, qat_over_float_layers=qat_over_float_layers, bench_iterations=bench_iterations, target_accuracy=target_accuracy, threads=threads, seed=seed,
        allow_duplicates=allow_duplicates,
    )
    typed = typed_flags(ctx, {k: {"max_top1_drop_pp": "max_top1_drop"}.get(k, k) for k in given})
    summary = run_build(BuildConfig(**merge(config, "build", given, typed)))
    print_warnings(summary.get("warnings", []))
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_table(summary))
        print(f"\nResults in {out}/: report.md, report.json, manifest.json, model.fp32.onnx, model.int8.qdq.onnx and calibration.cache (TensorRT), model.int8.cpu.onnx")


@app.command(epilog=examples(
    "tledge finetune --data my_images --out runs/1",
    "tledge finetune --data my_images --out runs/2 --model resnet18 --strategy staged --unfreeze 1,2",
    "tledge finetune --data my_images --out runs/3 --strategy linear   # feature extraction only",
    "tledge finetune --data my_images --out runs/4 --scratch --curve   # transfer gain over scratch, sample efficiency",
    "torchrun --nproc_per_node 4 -m tledge.cli finetune --data my_images --out runs/5   # DDP, one process per GPU",
))
def finetune(
    ctx: typer.Context,
    data: Path = typer.Option(..., "--data", "-d", help="ImageFolder root."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for model.pt and finetune.json."),
    model: str = typer.Option(D(FinetuneConfig, "model"), "--model", "-m", help="Backbone name (see `tledge models`)."),
    weights: str = typer.Option(D(FinetuneConfig, "weights"), help="'pretrained', 'none' or a state-dict file."),
    image_size: Optional[int] = typer.Option(None, help="Network input size (default: the model's)."),
    resize: Optional[int] = typer.Option(None, help="Shorter side before the center crop."),
    unfreeze: str = typer.Option("3", help="Strategy staged: blocks thawed per stage after feature extraction, e.g. 3,6; 'none'."),
    epochs: int = typer.Option(D(FinetuneConfig, "epochs"), help="Most epochs per stage."),
    patience: int = typer.Option(D(FinetuneConfig, "patience"), help="Early-stopping patience in epochs."),
    lr: float = typer.Option(D(FinetuneConfig, "lr"), help="Learning rate of feature extraction; staged: step k uses lr * lr_decay^k."),
    lr_decay: float = typer.Option(D(FinetuneConfig, "lr_decay"), help="Learning-rate factor per unfreezing stage (staged)."),
    full_lr: float = typer.Option(D(FinetuneConfig, "full_lr"), help="Peak learning rate when every layer trains (full, and auto after the classifier); a block d places below the top takes 0.8^d of it."),
    batch_size: int = typer.Option(D(FinetuneConfig, "batch_size"), help="Training batch size (in all: under torchrun each process takes its share)."),
    strategy: str = typer.Option(D(FinetuneConfig, "strategy"), help="auto (classifier on frozen features, then every layer if validation pays), linear (frozen backbone, cached features), staged (head, then the --unfreeze steps), full (every layer at --full-lr after a warm-up)."),
    augment: str = typer.Option(D(FinetuneConfig, "augment"), help="Train-time augmentation: none, light or strong (random resized crop, colour jitter)."),
    hflip: bool = typer.Option(D(FinetuneConfig, "hflip"), "--hflip/--no-hflip", help="Add horizontal flips (only for classes a mirror keeps: not digits or text)."),
    views: int = typer.Option(D(FinetuneConfig, "views"), help="Views per image in the activation cache of frozen layers (1: plain; more add augmented ones)."),
    scratch: bool = typer.Option(D(FinetuneConfig, "scratch"), "--scratch/--no-scratch", help="Also train from scratch on the same loop and report the transfer gain."),
    scratch_epochs: Optional[int] = typer.Option(None, help="Epochs of the from-scratch baseline (default: --epochs)."),
    curve: bool = typer.Option(D(FinetuneConfig, "curve"), "--curve", help="Sample-efficiency curve: transfer vs scratch at 10/25/50/100% of the training labels (implies --scratch)."),
    device: str = typer.Option(D(FinetuneConfig, "device"), help="auto, cpu, cuda or cuda:N (under torchrun: each process its LOCAL_RANK GPU)."),
    amp: str = typer.Option(D(FinetuneConfig, "amp"), help="Mixed precision on CUDA: auto (bf16, else fp16), bf16, fp16, off."),
    resume: bool = typer.Option(D(FinetuneConfig, "resume"), "--resume/--no-resume", help="Continue an interrupted run from OUT/finetune.resume.pt (same settings and data only)."),
    seed: int = typer.Option(D(FinetuneConfig, "seed"), help="Seed for splits and training."),
    allow_duplicates: bool = typer.Option(False, "--allow-duplicates", help="Keep going when byte-identical images sit in more than one split (otherwise an error: the model would be scored on images it trained on)."),
    config: Optional[Path] = typer.Option(None, "--config", help="A tledge.toml whose [finetune] sets any of this command's settings; flags typed here win."),
):
    """Fine-tune a pretrained backbone with a strategy that must earn each thawed layer on validation; optionally prove transfer beat training from scratch."""
    from tledge.train.finetune import finetune as run

    given = dict(data=data, out=out, model=model, weights=weights, image_size=image_size, resize=resize,
                 unfreeze=_parse_unfreeze(unfreeze), epochs=epochs, patience=patience, lr=lr, lr_decay=lr_decay,
                 full_lr=full_lr, batch_size=batch_size, strategy=strategy, augment=augment, hflip=hflip, views=views, scratch=scratch,
                 scratch_epochs=scratch_epochs, curve=curve, device=device, amp=amp, resume=resume, seed=seed,
                 allow_duplicates=allow_duplicates)
    record = run(FinetuneConfig(**merge(config, "finetune", given, typed_flags(ctx, {k: k for k in given}))))
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun rank 0 speaks for all
    from tledge.train.diagnostics import format_summary

    print(format_summary(record))
    print(f"wrote {out / 'model.pt'} and {out / 'finetune.json'}: " + ", ".join(f"{k} {v}" for k, v in record["result"].items()))


@app.command(epilog=examples(
    "tledge export runs/1/model.pt --out runs/1/model.fp32.onnx --data my_images",
    "tledge export runs/1/model.pt --out model.onnx --opset 17 --atol 1e-4",
))
def export(
    ctx: typer.Context,
    checkpoint: Path = typer.Argument(..., help="model.pt written by `tledge finetune`."),
    out: Path = typer.Option(..., "--out", "-o", help="ONNX file to write."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Images for the parity check (default: random inputs)."),
    opset: int = typer.Option(D(ExportConfig, "opset"), help="ONNX opset; 17 is what TensorRT 8.5/8.6 (JetPack 5/6.0) read."),
    atol: float = typer.Option(D(ExportConfig, "atol"), help="Parity: absolute tolerance on logits."),
    rtol: float = typer.Option(D(ExportConfig, "rtol"), help="Parity: relative tolerance on logits."),
    config: Optional[Path] = typer.Option(None, "--config", help="A tledge.toml whose [export] sets any of this command's settings; flags typed here win."),
):
    """Export to ONNX with a dynamic batch axis and prove ONNX Runtime matches PyTorch."""
    from tledge.export.onnx_export import export_onnx

    given = dict(checkpoint=checkpoint, out=out, data=data, opset=opset, atol=atol, rtol=rtol)
    record = export_onnx(ExportConfig(**merge(config, "export", given, typed_flags(ctx, {k: k for k in given}))))
    p = record["parity"]
    print(f"wrote {out}: opset {record['onnx']['opset']}, max |logit diff| {p['max_abs_diff']:.2e}, top-1 agreement {p['top1_agreement']:.4f} ({p['inputs']})")


@app.command(epilog=examples(
    "tledge quantize out/model.fp32.onnx --data my_images --out-dir out",
    "tledge quantize out/model.fp32.onnx --data my_images --out-dir out --calibration calibration/release-1.json",
    "tledge quantize model.onnx --data my_images --out-dir out --target cpu --keep-float /blocks.0/blocks.0.0/Conv",
    "tledge quantize model.onnx --data my_images --out-dir out --target cpu --cpu-target vnni   # VNNI/ARM fleet only",
    "tledge quantize model.onnx --data my_images --out-dir out --max-top1-drop 0.5 --min-agreement 0.98",
    "tledge quantize out/model.fp32.onnx --data my_images --out-dir out --method mse   # reuses out/calibration.stats.npz",
    "tledge quantize out/model.fp32.onnx --data my_images --out-dir out --checkpoint out/model.pt   # QAT if the budget is missed",
    "tledge quantize out/model.fp32.onnx --data my_images --out-dir out --target cpu --fallback-max-slowdown 1   # float layers by sensitivity alone",
))
def quantize(
    ctx: typer.Context,
    model: Path = typer.Argument(..., help="FP32 ONNX written by `tledge export`."),
    data: Path = typer.Option(..., "--data", "-d", help="ImageFolder root; calibration images come from its train split."),
    out_dir: Path = typer.Option(..., "--out-dir", "-o", help="Folder for the INT8 models and calibration.json."),
    calibration: Optional[Path] = typer.Option(None, help="Calibration definition to reuse (verified by sha256)."),
    num_calib: int = typer.Option(D(QuantizeConfig, "num_images"), help="Images to sample when no definition is given."),
    method: str = typer.Option(D(QuantizeConfig, "method"), help="Calibration method, a choice over one pass of statistics: minmax, percentile (99.999th), entropy (KL, as TensorRT), mse (least squared error) or auto (default: per model, whichever of minmax, percentile and mse has the highest expected agreement with FP32 on validation; the next one if even its fallback misses the budget)."),
    target: List[str] = typer.Option(["tensorrt", "cpu"], help="tensorrt (Q/DQ S8S8) and/or cpu (U8S8); repeatable."),
    keep_float: List[str] = typer.Option([], help="ONNX node name to leave in float (per-layer fallback); repeatable."),
    cpu_target: str = typer.Option(D(QuantizeConfig, "cpu_target"), help="CPU INT8 model's target: portable (right on every x86 and ARM CPU; default), vnni (full 8-bit weights, only for CPUs with VNNI/AMX or ARM) or native (this machine's class)."),
    trt_version: str = typer.Option(D(QuantizeConfig, "trt_version"), help="TensorRT version named in calibration.cache (implicit INT8, 8.5 to 10.x): 8.5.2 JetPack 5.1, 8.6.2 JetPack 6.0, 10.3.0 JetPack 6.1/6.2."),
    max_top1_drop: float = typer.Option(D(QuantizeConfig, "max_top1_drop_pp"), help="Drift budget: most top-1 an INT8 model may lose against FP32 on the validation split, in points."),
    min_agreement: float = typer.Option(D(QuantizeConfig, "min_agreement"), help="Drift budget: least share of validation predictions an INT8 model must share with FP32."),
    fallback_layers: int = typer.Option(D(QuantizeConfig, "fallback_layers"), help="Most layers kept in float to meet the drift budget (0: check and report only)."),
    fallback_max_slowdown: float = typer.Option(D(QuantizeConfig, "fallback_max_slowdown"), help="CPU model: leave in INT8 any layer whose float copy would slow it by more than this share, measured here (0.15: 15%; 1: keep by sensitivity alone)."),
    bias_correction: bool = typer.Option(D(QuantizeConfig, "bias_correction"), help="Shift each quantized layer's bias by the mean error its int8 weights add (from the calibration statistics); on by default."),
    weight_rounding: bool = typer.Option(D(QuantizeConfig, "weight_rounding"), help="Both INT8 models: choose each layer's int8 weight levels by the error they add to its output on calibration images, instead of rounding to nearest (the portable CPU model on its pair-safe grid); on by default."),
    checkpoint: Optional[Path] = typer.Option(None, help="The model.pt the ONNX came from; enables quantization-aware fine-tuning when the budget is missed."),
    qat_epochs: int = typer.Option(D(QuantizeConfig, "qat_epochs"), help="When post-training INT8 misses the drift budget, or meets it only with more than --qat-over-float-layers layers in float, epochs of quantization-aware fine-tuning to try (0: never)."),
    qat_over_float_layers: Optional[int] = typer.Option(None, help="Try QAT also when post-training needs more float layers than this to meet the budget (default: only when it misses); the QAT model then ships if it meets the budget with fewer."),
    seed: int = typer.Option(D(QuantizeConfig, "seed"), help="Sampling seed."),
    config: Optional[Path] = typer.Option(None, "--config", help="A tledge.toml whose [quantize] sets any of this command's settings; flags typed here win."),
):
    """Calibrate on real images; write a TensorRT Q/DQ INT8 ONNX and a CPU INT8 ONNX."""
    from tledge.quant.quantize import quantize as run

    given = dict(
        model=model, data=data, out_dir=out_dir, calibration=calibration, num_images=num_calib, method=method,
        targets=tuple(target), keep_float=tuple(keep_float), cpu_target=cpu_target, trt_version=trt_version,
        max_top1_drop_pp=max_top1_drop, min_agreement=min_agreement, fallback_layers=fallback_layers, fallback_max_slowdown=fallback_max_slowdown, bias_correction=bias_correction, weight_rounding=weight_rounding,
        checkpoint=checkpoint, qat_epochs=qat_epochs, qat_over_float_layers=qat_over_float_layers, seed=seed,
    )
    renames = {"num_images": "num_calib", "targets": "target", "max_top1_drop_pp": "max_top1_drop"}
    record = run(QuantizeConfig(**merge(config, "quantize", given, typed_flags(ctx, {k: renames.get(k, k) for k in given}))))
    print_warnings(record["warnings"])
    for t, info in record["models"].items():
        print(f"wrote {out_dir / info['path']} ({t}: activations {info['activations']}, weights {info['weights']})")
        if "cpu_target" in info:
            val = info["validation"]
            print(f"  CPU target {info['cpu_target']['name']} (valid on {', '.join(info['cpu_target']['valid_on'])}); "
                  f"this CPU ({val['cpu_class']}) {'computes it as simulated' if val['inside_target'] else 'is outside the target: not checked here'}"
                  f" (agreement {val['top1_agreement']:.4f} on {val['images']} images)")
        d = info["drift"]
        print(f"  drift on {d['images']} {d['split']} images (simulated): top-1 {-d['top1_drop_pp']:+.2f} pt, agreement {d['agreement']:.4f}"
              f" (expected {d['expected_agreement']:.4f}) -> budget {'met' if d['met'] else 'MISSED'}" + (f"; kept in float: {', '.join(info['kept_float'])}" if info["kept_float"] else ""))
        if "calibration_cache" in info:
            c = info["calibration_cache"]
            print(f"wrote {out_dir / c['path']} (TensorRT {c['trt_version']} implicit INT8, {c['tensors']} tensors)")
    print(f"calibration: {record['calibration']['images']} images listed in {out_dir / 'calibration.json'}")
