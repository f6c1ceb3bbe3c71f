"""The ``tledge`` command: a thin typer layer over the stage functions.

Exit codes: 0 success, 1 a user error (one line on stderr, no traceback), 2 bad command-line usage,
3 a failed release gate (``tledge gate``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from tledge.bench.benchmark import BenchConfig
from tledge.pipeline.build import BuildConfig
from tledge.export.onnx_export import ExportConfig
from tledge.train.finetune import FinetuneConfig
from tledge.defaults import default as D
from tledge.pipeline.config import merge
from tledge.errors import TledgeError
from tledge.bench.gate import GateConfig
from tledge.quant.quantize import QuantizeConfig

app = typer.Typer(
    name="tledge",
    help="Fine-tune a pretrained vision model, export it to ONNX, quantize it to INT8 and measure what it costs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _examples(*lines: str) -> str:
    # "\b" keeps click from re-wrapping the example block.
    return "Examples:\n\n\b\n" + "\n".join(f"  {line}" for line in lines)


def _print_warnings(warnings: list[str]) -> None:
    """Warnings about the figures go to stderr, where a CI log shows them even when stdout is parsed (--json)."""
    for warning in warnings:
        print(f"tledge: warning: {warning}", file=sys.stderr)


def _typed(ctx: typer.Context, fields: dict[str, str]) -> set[str]:
    """The settings the user typed on the command line (``fields`` maps setting names to parameter names)."""
    # by name: typer vendors its own click, whose ParameterSource is private
    return {field for field, param in fields.items() if getattr(ctx.get_parameter_source(param), "name", "") == "COMMANDLINE"}


def _parse_unfreeze(text: str) -> tuple[int, ...]:
    if text.strip().lower() in ("", "none", "0"):
        return ()
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise TledgeError(f"--unfreeze takes comma-separated block counts such as 3 or 3,6 (or none), got {text!r}") from None


@app.command(epilog=_examples(
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
    qat_epochs: int = typer.Option(D(BuildConfig, "qat_epochs"), help="When post-training INT8 misses the drift budget, or meets it only with more than --qat-over-float-layers layers in float, epochs of quantization-aware fine-tuning to try (0: never)."),
    qat_over_float_layers: Optional[int] = typer.Option(None, help="Try QAT also when post-training needs more float layers than this to meet the budget (default: only when it misses); the QAT model then ships if it meets the budget with fewer."),
    bench_iterations: int = typer.Option(D(BuildConfig, "bench_iterations"), help="Timed runs per variant."),
    threads: Optional[int] = typer.Option(None, help="CPU threads for ONNX Runtime (default: all)."),
    seed: int = typer.Option(D(BuildConfig, "seed"), help="Seed for splits, sampling and training."),
    as_json: bool = typer.Option(False, "--json", help="Print the report summary as JSON instead of a table."),
    config: Optional[Path] = typer.Option(None, "--config", help="A tledge.toml whose [build] sets any of this command's settings; flags typed here win."),
):
    """Run the whole pipeline: finetune, export, quantize, bench, report, manifest."""
    from tledge.pipeline.build import build as run_build, format_table

    given = dict(
        out=out, data=data, model=model, weights=weights, image_size=image_size, resize=resize,
        unfreeze=_parse_unfreeze(unfreeze), strategy=strategy, scratch=scratch, scratch_epochs=scratch_epochs,
        epochs=epochs, patience=patience, calibration=calibration,
        num_calib=num_calib, calib_method=calib_method, cpu_target=cpu_target, trt_version=trt_version,
        max_top1_drop_pp=max_top1_drop, min_agreement=min_agreement, fallback_layers=fallback_layers, fallback_max_slowdown=fallback_max_slowdown, bias_correction=bias_correction,
        qat_epochs=qat_epochs, qat_over_float_layers=qat_over_float_layers, bench_iterations=bench_iterations, threads=threads, seed=seed,
    )
    typed = _typed(ctx, {k: {"max_top1_drop_pp": "max_top1_drop"}.get(k, k) for k in given})
    summary = run_build(BuildConfig(**merge(config, "build", given, typed)))
    _print_warnings(summary.get("warnings", []))
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_table(summary))
        print(f"\nResults in {out}/: report.md, report.json, manifest.json, model.fp32.onnx, model.int8.qdq.onnx and calibration.cache (TensorRT), model.int8.cpu.onnx")


@app.command(epilog=_examples(
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
    config: Optional[Path] = typer.Option(None, "--config", help="A tledge.toml whose [finetune] sets any of this command's settings; flags typed here win."),
):
    """Fine-tune a pretrained backbone with a strategy that must earn each thawed layer on validation; optionally prove transfer beat training from scratch."""
    from tledge.train.finetune import finetune as run

    given = dict(data=data, out=out, model=model, weights=weights, image_size=image_size, resize=resize,
                 unfreeze=_parse_unfreeze(unfreeze), epochs=epochs, patience=patience, lr=lr, lr_decay=lr_decay,
                 full_lr=full_lr, batch_size=batch_size, strategy=strategy, augment=augment, hflip=hflip, views=views, scratch=scratch,
                 scratch_epochs=scratch_epochs, curve=curve, device=device, amp=amp, resume=resume, seed=seed)
    record = run(FinetuneConfig(**merge(config, "finetune", given, _typed(ctx, {k: k for k in given}))))
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun rank 0 speaks for all
    from tledge.train.finetune import format_summary

    print(format_summary(record))
    print(f"wrote {out / 'model.pt'} and {out / 'finetune.json'}: " + ", ".join(f"{k} {v}" for k, v in record["result"].items()))


@app.command(epilog=_examples(
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
    record = export_onnx(ExportConfig(**merge(config, "export", given, _typed(ctx, {k: k for k in given}))))
    p = record["parity"]
    print(f"wrote {out}: opset {record['onnx']['opset']}, max |logit diff| {p['max_abs_diff']:.2e}, top-1 agreement {p['top1_agreement']:.4f} ({p['inputs']})")


@app.command(epilog=_examples(
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
        max_top1_drop_pp=max_top1_drop, min_agreement=min_agreement, fallback_layers=fallback_layers, fallback_max_slowdown=fallback_max_slowdown, bias_correction=bias_correction,
        checkpoint=checkpoint, qat_epochs=qat_epochs, qat_over_float_layers=qat_over_float_layers, seed=seed,
    )
    renames = {"num_images": "num_calib", "targets": "target", "max_top1_drop_pp": "max_top1_drop"}
    record = run(QuantizeConfig(**merge(config, "quantize", given, _typed(ctx, {k: renames.get(k, k) for k in given}))))
    _print_warnings(record["warnings"])
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


def _parse_variants(specs: list[str], threads: int | None) -> list:
    """``PATH``, ``NAME=PATH`` or either with ``@BACKEND``: the variants to measure, in order."""
    from tledge.bench.benchmark import default_backend
    from tledge.bench.backends import Variant

    variants, names = [], set()
    for spec in specs:
        spec, at, backend = spec.rpartition("@") if "@" in spec else (spec, "", "")
        name, sep, path = spec.partition("=")
        if not sep:
            path = spec
            stem = Path(spec).stem  # (no str.removeprefix: the device install runs on Python 3.8)
            stem = stem[len("model."):] if stem.startswith("model.") else stem
            name = stem if stem and stem != "model" else (backend or default_backend(Path(spec)))
        if name in names:
            raise TledgeError(f"two models are named {name!r}; name them: NAME=PATH")
        names.add(name)
        backend = backend or default_backend(Path(path))
        options = {"threads": threads} if backend == "onnxruntime-cpu" else {}
        variants.append(Variant(name, Path(path), backend, options))
    return variants


@app.command(epilog=_examples(
    "tledge bench out/model.fp32.onnx out/model.int8.cpu.onnx --data my_images --out-dir out",
    "tledge bench fp32=a.onnx int8=b.onnx --data my_images --out-dir out --batch-size 8 --threads 2",
    "tledge bench out/model.fp32.onnx torch=out/model.pt@torch-cpu gpu=out/model.fp32.onnx@onnxruntime-cuda --data my_images --out-dir out",
))
def bench(
    ctx: typer.Context,
    models: List[str] = typer.Argument(..., help="Model files, or NAME=PATH, each optionally @BACKEND (onnxruntime-cpu, onnxruntime-cuda, onnxruntime-tensorrt, tensorrt, torch-cpu, torch-cuda; default from the file: .onnx onnxruntime-cpu, .pt torch-cpu); the first is the reference. A backend that cannot run here is skipped with its reason."),
    data: Path = typer.Option(..., "--data", "-d", help="ImageFolder root; accuracy on its test split (else val)."),
    out_dir: Path = typer.Option(..., "--out-dir", "-o", help="Folder for bench.json and the report."),
    batch_size: int = typer.Option(D(BenchConfig, "batch_size"), help="Batch size for latency."),
    throughput_batch: List[int] = typer.Option([D(BenchConfig, "throughput_batch")], help="Batch size for throughput; repeat for several (e.g. --throughput-batch 8 --throughput-batch 32)."),
    iterations: int = typer.Option(D(BenchConfig, "iterations"), help="Timed runs per variant."),
    threads: Optional[int] = typer.Option(None, help="CPU threads (default: all)."),
    max_images: Optional[int] = typer.Option(None, help="Cap on accuracy images."),
    config: Optional[Path] = typer.Option(None, "--config", help="A tledge.toml whose [bench] sets any of this command's settings; flags typed here win."),
):
    """Measure top-1, agreement with the reference, latency percentiles and throughput, side by side."""
    from tledge.bench.benchmark import bench as run
    from tledge.pipeline.build import format_table
    from tledge.report.summary import write_report

    given = dict(data=data, out_dir=out_dir, batch_size=batch_size, throughput_batch=tuple(throughput_batch), iterations=iterations,
                 threads=threads, max_images=max_images)
    settings = merge(config, "bench", given, _typed(ctx, {k: k for k in given}))
    run(BenchConfig(**{"models": {}, **settings, "variants": _parse_variants(models, settings["threads"])}))
    summary = write_report(out_dir)
    _print_warnings(summary.get("warnings", []))
    print(format_table(summary))
    print(f"\nwrote {out_dir / 'bench.json'}, {out_dir / 'report.json'} and {out_dir / 'report.md'}")


@app.command(name="gate", epilog=_examples(
    "tledge gate new/model.int8.cpu.onnx release/model.int8.cpu.onnx --data my_images --out-dir gate",
    "tledge gate new/model.int8.cpu.onnx release/gate.json --data my_images --max-latency-regression 10",
    "tledge gate cand.onnx base.onnx --data my_images --summary \"$GITHUB_STEP_SUMMARY\"   # in a GitHub Actions step",
))
def gate_cmd(
    ctx: typer.Context,
    candidate: Path = typer.Argument(..., help="The model to release (ONNX, or a TensorRT .engine built by `tledge engine`, timed on this GPU)."),
    baseline: Path = typer.Argument(..., help="The model it must not regress from (ONNX or engine, timed here interleaved), or a gate.json recorded earlier."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="ImageFolder root: accuracy on its test split (else val). Without it, latency only."),
    out_dir: Optional[Path] = typer.Option(None, "--out-dir", "-o", help="Write gate.json (the verdict; also a stored baseline for later runs) and gate.md here."),
    max_latency_regression: float = typer.Option(D(GateConfig, "max_latency_regression_pct"), help="Most latency increase allowed, in percent; a regression needs the whole confidence interval above it."),
    max_top1_drop: float = typer.Option(D(GateConfig, "max_top1_drop_pp"), help="Most top-1 the candidate may lose against the baseline, in points."),
    min_agreement: float = typer.Option(D(GateConfig, "min_agreement"), help="Least share of predictions the candidate must share with the baseline."),
    confidence: float = typer.Option(D(GateConfig, "confidence"), help="Confidence of the latency interval."),
    blocks: int = typer.Option(D(GateConfig, "blocks"), help="Timed blocks per model (more: a narrower interval)."),
    calls_per_block: int = typer.Option(D(GateConfig, "calls_per_block"), help="Calls per block (the block's time is their median); 0 fills about 50 ms a block."),
    batch_size: int = typer.Option(D(GateConfig, "batch_size"), help="Batch size for latency."),
    threads: int = typer.Option(D(GateConfig, "threads"), help="CPU threads per model (0: every core). One repeats best on shared runners."),
    max_images: Optional[int] = typer.Option(None, help="Cap on accuracy images."),
    summary: Optional[Path] = typer.Option(None, help="Append the Markdown summary to this file (e.g. $GITHUB_STEP_SUMMARY)."),
    as_json: bool = typer.Option(False, "--json", help="Print the verdict as JSON."),
    config: Optional[Path] = typer.Option(None, "--config", help="A tledge.toml whose [gate] sets any of this command's settings; flags typed here win."),
):
    """Fail a release whose latency or accuracy regressed beyond the thresholds (exit 3), noise-aware."""
    from tledge.bench.gate import format_markdown, gate

    given = dict(
        candidate=candidate, baseline=baseline, data=data, out_dir=out_dir, max_latency_regression_pct=max_latency_regression,
        max_top1_drop_pp=max_top1_drop, min_agreement=min_agreement, confidence=confidence, blocks=blocks,
        calls_per_block=calls_per_block, batch_size=batch_size, threads=threads, max_images=max_images,
    )
    renames = {"max_latency_regression_pct": "max_latency_regression", "max_top1_drop_pp": "max_top1_drop"}
    if summary is not None:
        from tledge.validate import output_file

        output_file(summary, "--summary")  # before the minutes of timing, not after
    verdict = gate(GateConfig(**merge(config, "gate", given, _typed(ctx, {k: renames.get(k, k) for k in given}))))
    text = format_markdown(verdict)
    if summary is not None:
        try:
            with open(summary, "a", encoding="utf-8") as f:
                f.write(text)
        except OSError as exc:
            raise TledgeError(f"cannot append the summary to {summary}: {exc.strerror}") from None
    _print_warnings(verdict["notes"])
    if as_json:
        print(json.dumps({**{k: v for k, v in verdict.items() if k != "candidate"}, "candidate": {
            k: v for k, v in verdict["candidate"].items() if k not in ("latency_samples_ms", "predictions")}}, indent=2))
    else:
        for c in verdict["checks"]:
            print(f"{'pass' if c['passed'] else 'FAIL'}  {c['check']:<9} {c['why']}")
        print(f"gate {'PASSED' if verdict['passed'] else 'FAILED'}" + (f"; wrote {out_dir / 'gate.json'} and {out_dir / 'gate.md'}" if out_dir else ""))
    if not verdict["passed"]:
        raise typer.Exit(verdict["exit_code"])


@app.command(name="bundle", epilog=_examples("tledge bundle tledge-out", "tledge bundle tledge-out --archive release.tar.gz   # one file to copy to the device"))
def bundle_cmd(out_dir: Path = typer.Argument(..., help="A build folder."),
               archive: Optional[Path] = typer.Option(None, help="Also write one archive (.tar.gz, .tar.xz, .tar) of manifest.json and every file it signs.")):
    """Write manifest.json: every artifact with sha256 and size, input spec, preprocessing, labels, versions."""
    from tledge.release.bundle import bundle

    manifest = bundle(out_dir)
    print(f"wrote {out_dir / 'manifest.json'} ({len(manifest['artifacts'])} artifacts)")
    if archive is not None:
        from tledge.release.verify import write_archive

        write_archive(out_dir, archive)
        print(f"wrote {archive}")


def _parse_batch(text: Optional[str]):
    if text is None:
        return None
    try:
        parts = tuple(int(p) for p in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) == 1:
        parts = parts * 3
    if len(parts) != 3:
        raise TledgeError(f"--batch takes N or min,opt,max such as 1,4,8, got {text!r}")
    return parts


@app.command(name="engine", epilog=_examples(
    "tledge engine release                                  # INT8 from the Q/DQ model, batch 1..max",
    "tledge engine release --precision fp16 --batch 1,8,16",
    "tledge engine release --dla 0 --batch 1                # Jetson AGX/NX DLA core 0, GPU fallback",
    "tledge engine release --int8-path implicit             # from calibration.cache (TensorRT 8.5-10.x)",
    "tledge engine release --time 200                       # then time the engine here",
))
def engine_cmd(
    bundle: Path = typer.Argument(..., help="A bundle folder (manifest.json and the ONNX models), on the device that will run the engine."),
    precision: str = typer.Option("int8", help="int8, fp16 or fp32."),
    int8_path: str = typer.Option("auto", help="INT8 from the Q/DQ model (explicit; TensorRT 8.5+, the only one on 11.x), from calibration.cache (implicit; 8.5-10.x), or auto: explicit, except DLA on TensorRT 8.x."),
    batch: Optional[str] = typer.Option(None, help="Optimization profile of the batch axis: N, or min,opt,max (default 1,1,the model's max batch)."),
    dla: Optional[int] = typer.Option(None, "--dla", help="Build for this DLA core (Jetson AGX/NX), layers DLA cannot run fall back to the GPU; needs a static batch."),
    workspace: int = typer.Option(1024, help="Builder workspace limit in MiB."),
    hardware_compatible: bool = typer.Option(False, help="One engine for every Ampere-or-newer datacenter GPU (TensorRT 8.6+, not Jetson; may be slower)."),
    version_compatible: bool = typer.Option(False, help="Loadable by later TensorRT releases of the same major (8.6+)."),
    timing_cache_dir: Optional[Path] = typer.Option(None, help="Where timing caches are kept, one per GPU model and TensorRT version (default $TLEDGE_CACHE/trt-timing)."),
    time_iterations: int = typer.Option(0, "--time", help="After building, time this many runs of the engine at the profile's opt batch and print p50/p90/p99."),
    as_json: bool = typer.Option(False, "--json", help="Print the engine's record as JSON."),
):
    """Build a TensorRT engine from a bundle with this device's TensorRT; record and sign it in the bundle."""
    from tledge.release.engines import build_engine
    from tledge.trt.plan import EngineConfig

    cfg = EngineConfig(bundle, precision=precision, int8_path=int8_path, batch=_parse_batch(batch), dla_core=dla,
                       workspace_mib=workspace, hardware_compatible=hardware_compatible, version_compatible=version_compatible,
                       timing_cache_dir=timing_cache_dir)
    record = build_engine(cfg)
    _print_warnings(record["notes"])
    timing = None
    if time_iterations > 0:
        from tledge.trt.runner import time_engine

        timing = time_engine(bundle / record["path"], time_iterations)
    if as_json:
        print(json.dumps({**record, **({"timing": timing} if timing else {})}, indent=2))
    else:
        p = record["profile"]
        print(f"wrote {bundle / record['path']}: TensorRT {record['tensorrt']}, {record['gpu']} (compute capability {record['compute_capability']})"
              f"{', DLA core %d' % record['dla_core'] if record['dla_core'] is not None else ''}, {record['precision']}"
              f"{' (' + record['int8_path'] + ')' if record['int8_path'] else ''}, batch {p['min'][0]}/{p['opt'][0]}/{p['max'][0]}, "
              f"{record['build_seconds']:.0f} s{' (timing cache reused)' if record['timing_cache_reused'] else ''}; manifest.json re-signed")
        if timing:
            t = timing
            print(f"latency at batch {t['batch']}: p50 {t['p50_ms']:.3f} ms, p90 {t['p90_ms']:.3f} ms, p99 {t['p99_ms']:.3f} ms ({t['iterations']} runs)")


@app.command(name="verify", epilog=_examples(
    "tledge verify release                       # on the device: hashes, and whether its engines run here",
    "tledge verify release.tar.gz                # extracts it safely beside it (release/) first",
    "tledge verify release --hashes-only         # before flashing, on a machine without TensorRT",
    "tledge verify release --engine model.int8.orin-sm87.trt10.3.0.engine",
))
def verify_cmd(
    bundle: Path = typer.Argument(..., help="A bundle folder, or an archive of one (.tar.gz, .tar.xz, .tar)."),
    hashes_only: bool = typer.Option(False, help="Check only the files' sha256, not whether this machine can run the engines."),
    engine: List[str] = typer.Option([], help="An engine that must run here (repeatable); default: at least one engine must."),
    extract_to: Optional[Path] = typer.Option(None, help="Where to extract an archive (a new folder; default: beside it, named after it)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
):
    """Check every file of a bundle against manifest.json, and whether this device can run its engines."""
    from tledge.release.verify import verify

    report = verify(bundle, check_device=not hashes_only, engines=engine or None, extract_to=extract_to)
    if as_json:
        print(json.dumps(report, indent=2))
        return
    if report["extracted_from"]:
        print(f"extracted {report['extracted_from']} to {report['bundle']}")
    print(f"{report['files_checked']} files match manifest.json")
    for e in report["engines"]:
        print(f"{'runs here' if e['runs_here'] else 'not here '}  {e['path']}" + (f"  ({e['why_not']})" if not e["runs_here"] else ""))
    if not hashes_only and not report["engines"]:
        print("no engine in the bundle yet: build one on the device with `tledge engine " + str(bundle) + "`")
    print("bundle OK")


@app.command(name="models", epilog=_examples("tledge models"))
def models_cmd():
    """List the backbones tledge can fine-tune and where their pretrained weights come from."""
    from tledge.models import list_models

    for spec in list_models():
        pre = spec.preprocess
        print(f"{spec.name:<24} {'offline' if spec.offline else 'online '}  input {pre.size}  {spec.description}")
        print(f"{'':<24} weights: {spec.weights_source}")


def main() -> None:
    # Typer handles usage errors (exit 2) and --help itself; a TledgeError from a stage becomes one line and exit 1.
    import signal

    signal.signal(signal.SIGTERM, _terminated)  # CI cancels a job with SIGTERM: unwind (temporary files go), one line
    try:
        app()
    except Terminated:
        print("\ntledge: terminated; no manifest vouches for the unfinished run: run the command again", file=sys.stderr)
        sys.exit(143)
    except TledgeError as exc:
        print(f"tledge: error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        _say_interrupted()
        sys.exit(130)
    except SystemExit as exc:
        if exc.code == 130 and _caused_by_interrupt(exc):  # typer turns Ctrl-C into a silent exit 130
            _say_interrupted()
        raise
    except OSError as exc:  # the machine's refusal mid-run (disk full, a folder removed): its reason, not a traceback
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"tledge: error: {exc.strerror or exc}{where}", file=sys.stderr)
        sys.exit(1)


class Terminated(BaseException):
    """SIGTERM, raised where the program is, so that ``finally`` blocks run; not an Exception, so nothing swallows it."""


def _terminated(signum, frame):
    raise Terminated()


def _caused_by_interrupt(exc: BaseException) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def _say_interrupted() -> None:
    # atomic writes leave no half file and the manifest goes first, so what is left vouches for nothing half-done
    print("\ntledge: interrupted; no manifest vouches for the unfinished run: run the command again", file=sys.stderr)

