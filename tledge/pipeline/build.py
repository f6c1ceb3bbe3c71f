"""``tledge build``: finetune -> export -> quantize -> bench -> report -> bundle, into one folder.

The build only resolves defaults and chains the stage functions; each stage is usable on its own.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tledge import validate
from tledge.bench.benchmark import BenchConfig
from tledge.data.images import scan_images
from tledge.defaults import default as D
from tledge.errors import TledgeError
from tledge.quant.quantize import QuantizeConfig
from tledge.train.finetune import FinetuneConfig

# The offline default: real handwritten digits at 128x128 (no crop: the 8x8 scans fill the frame).
DEFAULT_IMAGE_SIZE = 128
# Package data, so an installed tledge (not only a source checkout) pins the default run's calibration images.
PINNED_CALIBRATION_DIR = Path(__file__).resolve().parents[1] / "calibration_sets"  # tledge/calibration_sets
DEFAULT_CALIBRATION = "digits-efficientnet_lite0-128.json"
# The build's from-scratch baseline is a cheap one: a few epochs bound its cost (a positive gain is then an
# upper bound, a gain <= 0 conclusive); `tledge finetune --scratch` gives it the full epoch budget.
BUILD_SCRATCH_EPOCHS = 2


@dataclass(frozen=True)
class BuildConfig:
    """Settings for :func:`build`. ``data=None`` builds the offline default (scikit-learn's digits).

    The defaults and the checks of every stage setting are the stage's own (:class:`FinetuneConfig`,
    :class:`QuantizeConfig`, :class:`BenchConfig`): build only chooses which of them it exposes, and asks the stage
    configs to check them before any work starts.
    """

    out: Path = Path("tledge-out")
    data: Path | None = None
    model: str = D(FinetuneConfig, "model")
    weights: str = D(FinetuneConfig, "weights")
    image_size: int | None = None
    resize: int | None = None
    # staged, not finetune's auto: auto may go on to thaw the whole network, minutes per epoch on a CPU; the
    # build keeps its time (feature extraction, then the top 3 blocks if validation earns them).
    strategy: str = "staged"
    unfreeze: tuple[int, ...] = D(FinetuneConfig, "unfreeze")
    epochs: int = D(FinetuneConfig, "epochs")
    patience: int = D(FinetuneConfig, "patience")
    scratch: bool = True  # the cheap from-scratch baseline: is transfer better at all?
    scratch_epochs: int = BUILD_SCRATCH_EPOCHS
    calibration: Path | None = None
    num_calib: int = D(QuantizeConfig, "num_images")
    calib_method: str = D(QuantizeConfig, "method")
    cpu_target: str = D(QuantizeConfig, "cpu_target")
    trt_version: str = D(QuantizeConfig, "trt_version")
    max_top1_drop_pp: float = D(QuantizeConfig, "max_top1_drop_pp")
    min_agreement: float = D(QuantizeConfig, "min_agreement")
    fallback_layers: int = D(QuantizeConfig, "fallback_layers")
    fallback_max_slowdown: float = D(QuantizeConfig, "fallback_max_slowdown")
    bias_correction: bool = D(QuantizeConfig, "bias_correction")
    weight_rounding: bool = D(QuantizeConfig, "weight_rounding")
    qat_epochs: int = D(QuantizeConfig, "qat_epochs")
    qat_over_float_layers: int | None = D(QuantizeConfig, "qat_over_float_layers")
    bench_iterations: int = D(BenchConfig, "iterations")
    target_accuracy: float | None = D(BenchConfig, "target_accuracy")  # the confidence to abstain below, per variant
    threads: int | None = D(BenchConfig, "threads")
    seed: int = 0
    allow_duplicates: bool = D(FinetuneConfig, "allow_duplicates")

    def __post_init__(self):
        object.__setattr__(self, "out", Path(self.out))
        object.__setattr__(self, "unfreeze", tuple(self.unfreeze))
        if self.data is not None:
            object.__setattr__(self, "data", Path(self.data))
        if self.calibration is not None:
            object.__setattr__(self, "calibration", Path(self.calibration))
        # Fail before minutes of training, not at the stage that would use the setting: each stage checks its own.
        placeholder = Path("data")
        self.finetune_config(placeholder, self.image_size, self.resize)
        self.quantize_config(placeholder, None)
        self.bench_config({"fp32": Path("model.fp32.onnx")}, placeholder)
        if self.image_size is not None and self.image_size < 8:
            raise TledgeError(f"image size must be at least 8 pixels, got {self.image_size}")
        if self.calibration is not None and not self.calibration.is_file():
            raise TledgeError(f"calibration definition {self.calibration} does not exist")

    def finetune_config(self, data: Path, image_size: int | None, resize: int | None) -> FinetuneConfig:
        return FinetuneConfig(data=data, out=self.out, model=self.model, weights=self.weights, image_size=image_size, resize=resize,
                              strategy=self.strategy, unfreeze=self.unfreeze, epochs=self.epochs, patience=self.patience,
                              scratch=self.scratch and self.scratch_epochs > 0, scratch_epochs=self.scratch_epochs or None, seed=self.seed,
                              allow_duplicates=self.allow_duplicates)

    def quantize_config(self, data: Path, calibration: Path | None) -> QuantizeConfig:
        return QuantizeConfig(
            model=self.out / "model.fp32.onnx", data=data, out_dir=self.out, calibration=calibration, num_images=self.num_calib,
            method=self.calib_method, cpu_target=self.cpu_target, trt_version=self.trt_version, seed=self.seed,
            max_top1_drop_pp=self.max_top1_drop_pp, min_agreement=self.min_agreement, fallback_layers=self.fallback_layers,
            fallback_max_slowdown=self.fallback_max_slowdown, bias_correction=self.bias_correction, weight_rounding=self.weight_rounding, checkpoint=self.out / "model.pt" if (self.out / "model.pt").is_file() else None,
            qat_epochs=self.qat_epochs, qat_over_float_layers=self.qat_over_float_layers,
        )

    def bench_config(self, models: dict, data: Path) -> BenchConfig:
        return BenchConfig(models=models, data=data, out_dir=self.out, iterations=self.bench_iterations, threads=self.threads, seed=self.seed,
                           target_accuracy=self.target_accuracy)

    def to_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _check_inputs(cfg: BuildConfig) -> tuple[Path, int | None, int | None, Path | None, bool]:
    """What every stage of the build will need, checked up front: the output folder, the model name, the dataset
    and its images, the input size, and a given calibration definition against that dataset and size.

    Returns what the stages are given: ``(data, image_size, resize, calibration, default_data)``.
    """
    from tledge.data.datasets import digits_dataset
    from tledge.data.splits import load_splits
    from tledge.models import get_spec
    from tledge.quant.calibration import load_calibration_set
    from tledge.train.finetune import resolve_preprocess

    validate.output_dir(cfg.out)
    spec = get_spec(cfg.model)  # an unknown model name fails now, not after the dataset is read
    default_data = cfg.data is None
    data = digits_dataset() if default_data else cfg.data
    image_size, resize = cfg.image_size, cfg.resize
    if default_data and image_size is None:
        image_size = DEFAULT_IMAGE_SIZE
        resize = resize or DEFAULT_IMAGE_SIZE
    calibration = cfg.calibration
    if calibration is None and default_data and cfg.image_size is None and cfg.model == "efficientnet_lite0":
        pinned = PINNED_CALIBRATION_DIR / DEFAULT_CALIBRATION
        calibration = pinned if pinned.is_file() else None  # the package pins the default's calibration images
    ft = cfg.finetune_config(data, image_size, resize)
    splits = load_splits(data, ft.val_fraction, ft.test_fraction, ft.seed)
    scan_images(s.path for s in splits.train + splits.val + splits.test)
    pre = resolve_preprocess(spec.preprocess, image_size, resize)
    if calibration is not None:
        load_calibration_set(calibration, splits.root, splits.classes, pre.input_shape)
    return data, image_size, resize, calibration, default_data


def build(cfg: BuildConfig) -> dict:
    """Run the whole pipeline into ``cfg.out``; returns the report summary. ``manifest.json`` is written last.

    >>> build(BuildConfig(out="tledge-out"))                        # offline default  # doctest: +SKIP
    >>> build(BuildConfig(out="release", data="my_images", model="mobilenet_v3_large"))  # doctest: +SKIP
    """
    from tledge.bench.benchmark import bench
    from tledge.export.onnx_export import ExportConfig, export_onnx
    from tledge.monitor.stage import ReferenceConfig, write_reference
    from tledge.quant.quantize import quantize
    from tledge.quant.recipes import TARGETS
    from tledge.release.bundle import bundle
    from tledge.report.summary import write_report
    from tledge.train.finetune import finetune

    started = time.perf_counter()
    out = cfg.out
    # everything a stage would refuse, before minutes of work and before any file is touched
    data, image_size, resize, calibration, default_data = _check_inputs(cfg)
    # Nothing of the previous build is vouched for from here on: the manifest and every stage record go first (each
    # stage writes its record last), and leftovers of an interrupted run go, so a re-run starts clean.
    validate.start_rewrite(out, "finetune")
    validate.remove_partials(out)
    steps = 5
    timings = {}

    def stage(n: int, name: str):
        _log(f"[{n}/{steps}] {name}")
        return time.perf_counter()

    t = stage(1, f"finetune {cfg.model} on {data}")
    ft = finetune(cfg.finetune_config(data, image_size, resize))
    timings["finetune"] = time.perf_counter() - t
    _log(f"      val top-1 {ft['result']['val_accuracy']:.4f}" + (f", test top-1 {ft['result']['test_accuracy']:.4f}" if "test_accuracy" in ft["result"] else "") + f" ({timings['finetune']:.0f} s)")
    _log(f"      {ft['strategy']['name']}: {ft['strategy']['why']}")
    if ft.get("baseline"):
        b = ft["baseline"]
        _log(f"      transfer gain over a {b['budget']['scratch_epochs']}-epoch from-scratch baseline: {b['transfer_gain_pp']:+.1f} pt ({b['verdict']})")

    t = stage(2, "export ONNX and check parity with PyTorch")
    ex = export_onnx(ExportConfig(checkpoint=out / "model.pt", out=out / "model.fp32.onnx", data=data, seed=cfg.seed))
    timings["export"] = time.perf_counter() - t
    _log(f"      max |logit diff| {ex['parity']['max_abs_diff']:.2e} on {ex['parity']['inputs']} ({timings['export']:.0f} s)")

    t = stage(3, "quantize to INT8 with calibration images" + (f" pinned by {calibration}" if calibration else ""))
    q = quantize(cfg.quantize_config(data, calibration))
    timings["quantize"] = time.perf_counter() - t
    for info in q["models"].values():
        d = info["drift"]
        _log(f"      {info['path']}: val top-1 {-d['top1_drop_pp']:+.2f} pt, agreement {d['agreement']:.4f} (expected {d['expected_agreement']:.4f}, simulated), budget "
             f"{'met' if d['met'] else 'MISSED'}" + (f", {len(info['kept_float'])} layer(s) kept in float" if info["kept_float"] else ""))
    _log(f"      wrote {', '.join(TARGETS.values())}, calibration.cache ({timings['quantize']:.0f} s)")

    t = stage(4, "benchmark accuracy and latency")
    models = {"fp32": out / "model.fp32.onnx", "int8-tensorrt-qdq": out / TARGETS["tensorrt"], "int8-cpu": out / TARGETS["cpu"]}
    bench(cfg.bench_config(models, data))
    # What the device's `tledge monitor` compares production inputs with: the validation split as the model sees it.
    reference = write_reference(ReferenceConfig(out_dir=out, data=data, seed=cfg.seed), required=False)
    if reference.get("skipped"):
        _log(f"      warning: {reference['skipped']}")
    timings["bench"] = time.perf_counter() - t

    t = stage(5, "report and manifest")
    seconds = time.perf_counter() - started
    summary = write_report(out, extra={"build": {
        "config": cfg.to_dict(), "model": cfg.model, "data": "scikit-learn digits (offline default)" if default_data else str(data),
        "seconds": round(seconds, 1), "stage_seconds": {k: round(v, 1) for k, v in timings.items()},
    }})
    bundle(out)
    return summary


def format_table(summary: dict) -> str:
    """The report's main table as plain text for a terminal."""
    rows = [("variant", "top-1", "agree", "p50 ms", "p99 ms", "speed-up")]
    for name, v in summary["variants"].items():
        rows.append((name, f"{v['top1']:.4f}", f"{v['agreement_with_reference']:.4f}", f"{v['latency_ms']['p50']:.2f}", f"{v['latency_ms']['p99']:.2f}", f"{v['speedup_vs_reference_p50']:.2f}x"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)) for r in rows)
