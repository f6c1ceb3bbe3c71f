"""Accuracy and latency of each model variant, side by side, on the same images and the same machine.

Accuracy: top-1 on the held-out split (test if the dataset has one, else val) and prediction agreement with the
FP32 reference. How each figure was computed depends on what the model is for:

* a TensorRT Q/DQ model (``int8-tensorrt``): by simulating its quantized arithmetic (Q/DQ as float ops), which is
  what TensorRT's int32-accumulating kernels compute; this CPU's int8 kernels would add their own errors;
* a CPU INT8 model (``int8-cpu``): with this CPU's real int8 kernels (what a user of this CPU gets), next to the
  simulation; when this CPU is outside the model's CPU target, or its kernels disagree with the simulation, the
  record carries a warning;
* anything else: as ONNX Runtime runs it.

Latency: wall time of one ``run`` call at a fixed batch, measured in interleaved rounds so that
every variant sees the same machine conditions; p50/p90/p99 in milliseconds, plus throughput at a larger batch.
"""

from __future__ import annotations

import math
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from tledge.bench.accuracy import ACCURACY_METHODS, Accumulator, accumulate, class_drift, int8_checks
from tledge.data.images import scan_images
from tledge.errors import TledgeError
from tledge.runners.timing import percentiles, time_calls


@dataclass(frozen=True)
class BenchConfig:
    """Settings for :func:`bench`. ``models`` maps variant names to model files, run by the backend their kind
    implies (``.onnx``: onnxruntime-cpu, ``.pt``: torch-cpu, ``.engine``: tensorrt); ``variants`` name a backend
    and its options explicitly. The first of them all is the reference."""

    models: dict[str, Path]
    data: Path
    out_dir: Path
    batch_size: int = 1
    throughput_batch: int | tuple[int, ...] = 16  # one batch size or several; the first is the headline figure
    warmup: int = 10
    iterations: int = 200
    rounds: int = 5
    threads: int | None = None  # None: ONNX Runtime's default (all cores)
    max_images: int | None = None  # cap the accuracy set (None: the whole split)
    seed: int = 0
    variants: tuple = ()  # tledge.runners.backends.Variant, after the models
    # Failure behaviour: wrong answers at least this confident are listed; target_accuracy asks for the confidence
    # threshold below which a device should abstain to reach it (recorded per variant).
    high_confidence: float = 0.9
    target_accuracy: float | None = None
    # Fit one temperature per variant on the validation split and report calibration after it beside the raw
    # figures (never applied to the logits); costs one more pass over the validation images.
    temperature_scaling: bool = False

    def __post_init__(self):
        object.__setattr__(self, "models", {k: Path(v) for k, v in self.models.items()})
        object.__setattr__(self, "variants", tuple(self.variants))
        object.__setattr__(self, "data", Path(self.data))
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        if not self.models and not self.variants:
            raise TledgeError("bench needs at least one model")
        names = list(self.models) + [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise TledgeError(f"two variants share a name: {sorted({n for n in names if names.count(n) > 1})}")
        batches = self.throughput_batch if isinstance(self.throughput_batch, (tuple, list)) else (self.throughput_batch,)
        object.__setattr__(self, "throughput_batch", tuple(int(b) for b in batches) if len(batches) > 1 else int(batches[0]))
        if not batches or min(self.batch_size, *batches, self.iterations, self.rounds) < 1 or self.warmup < 0:
            raise TledgeError("batch sizes, iterations and rounds must be at least 1")
        from tledge import validate as V

        V.number("--threads", self.threads, minimum=1, optional=True)
        V.number("--seed", self.seed, minimum=0)  # numpy refuses negative seeds, deep inside a stage
        V.number("--max-images", self.max_images, minimum=1, optional=True)
        V.number("--high-confidence", self.high_confidence, above=0, maximum=1)
        V.number("--target-accuracy", self.target_accuracy, above=0, maximum=1, optional=True)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(models={k: str(v) for k, v in self.models.items()}, data=str(self.data), out_dir=str(self.out_dir),
                 variants=[{"name": v.name, "path": str(v.path), "backend": v.backend, "options": v.options} for v in self.variants])
        return d

    def all_variants(self) -> list:
        from tledge.bench.backends import Variant

        return [Variant(name, path, default_backend(path), {"threads": self.threads}) for name, path in self.models.items()] + list(self.variants)


def default_backend(path: Path) -> str:
    """The backend a model file runs on unless told otherwise."""
    return {".pt": "torch-cpu", ".engine": "tensorrt", ".plan": "tensorrt"}.get(Path(path).suffix, "onnxruntime-cpu")


def variant_metadata(path: Path) -> dict | None:
    """Classes, preprocessing and precision of a model file: ONNX metadata, or a checkpoint's; None if missing."""
    if not Path(path).is_file():
        return None
    if Path(path).suffix == ".pt":
        from tledge.models import load_checkpoint

        _, meta = load_checkpoint(path)
        import json

        # as ONNX metadata holds it (JSON: lists, not tuples), so the two kinds compare equal
        return {"classes": meta["classes"], "preprocess": json.loads(json.dumps(meta["preprocess"].to_dict())), "precision": "fp32",
                **({"splits_sha256": meta["extra"]["splits_sha256"]} if "splits_sha256" in meta.get("extra", {}) else {})}
    if Path(path).suffix in (".engine", ".plan"):
        from tledge.trt.engine import engine_record

        record = engine_record(path)  # an engine has no metadata of its own: tledge engine recorded its ONNX's
        if record is None:
            raise TledgeError(f"{path} has no record in engine.json beside it; build engines with `tledge engine`")
        return record["model"]
    from tledge.export.onnx_io import onnx_metadata

    return onnx_metadata(path)


def _rss_mb() -> float:
    """This process's resident memory now, in MB (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            import os

            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


def bench(cfg: BenchConfig) -> dict:
    """Measure every model in ``cfg.models``; writes ``bench.json`` into ``cfg.out_dir`` and returns its record.

    >>> bench(BenchConfig(models={"fp32": "out/model.fp32.onnx", "int8-cpu": "out/model.int8.cpu.onnx"},
    ...                   data="my_images", out_dir="out"))  # doctest: +SKIP
    """
    from tqdm import tqdm

    from tledge import validate
    from tledge.artifacts import write_json
    from tledge.bench.backends import backend_unavailable, make_runner
    from tledge.cpu_isa import this_cpu
    from tledge.data.images import Preprocess, iter_batches, load_array
    from tledge.data.splits import splits_for
    from tledge.machine import machine_info
    from tledge.runners.ort_runner import OrtRunner

    started = time.perf_counter()
    validate.output_dir(cfg.out_dir, "--out-dir")
    candidates = cfg.all_variants()
    skipped = {}
    for v in candidates:
        reason = backend_unavailable(v.backend)
        if reason:
            skipped[v.name] = {"path": str(v.path), "backend": v.backend, "reason": reason}
    variants = [v for v in candidates if v.name not in skipped]
    if not variants:
        raise TledgeError("no variant can run here: " + "; ".join(f"{n}: {s['reason']}" for n, s in skipped.items()))
    metas = {v.name: variant_metadata(v.path) for v in variants}
    missing = [str(v.path) for v in variants if metas[v.name] is None]
    if missing:
        raise TledgeError(f"model file(s) not found: {', '.join(missing)}")
    paths = {v.name: v.path for v in variants}
    reference = variants[0].name
    ref_meta = metas[reference]
    for name, meta in metas.items():
        if meta["classes"] != ref_meta["classes"] or meta["preprocess"] != ref_meta["preprocess"]:
            raise TledgeError(f"{paths[name]} was made for other classes or preprocessing than {paths[reference]}")
    pre = Preprocess.from_dict(ref_meta["preprocess"])
    splits = splits_for(cfg.data, paths[reference].parent, cfg.seed, ref_meta.get("splits_sha256"))
    if splits.classes != ref_meta["classes"]:
        raise TledgeError(f"{cfg.data} has classes {splits.classes}, the models were trained on {ref_meta['classes']}")
    samples = splits.evaluation[: cfg.max_images] if cfg.max_images else splits.evaluation
    scan_images(s.path for s in samples)

    # Latency always times the backend as deployed (ONNX Runtime fuses Q/DQ into int8 kernels); accuracy uses
    # the method fit for the model.
    runners, memory_mb = {}, {}
    for v in variants:  # resident memory a runner adds when loaded and run once (first-order; shared libraries count once)
        before = _rss_mb()
        runners[v.name] = make_runner(v)
        runners[v.name](np.zeros((cfg.batch_size, *pre.input_shape), np.float32))
        memory_mb[v.name] = round(_rss_mb() - before, 1)
    precisions = {name: metas[name].get("precision", "unknown") for name in runners}
    simulators = {v.name: OrtRunner(v.path, threads=cfg.threads, simulate_int8=True)
                  for v in variants if precisions[v.name] in ("int8-tensorrt", "int8-cpu") and v.path.suffix == ".onnx"}
    accuracy_runners = {name: simulators[name] if precisions[name] == "int8-tensorrt" and name in simulators else runners[name] for name in runners}

    # Accuracy: every batch goes through every variant before the next is decoded (one pass over the images).
    acc = {name: Accumulator() for name in runners}
    simulated = {name: Accumulator() for name in simulators}
    fused_vs_simulated = {name: ([], []) for name in simulators if precisions[name] == "int8-cpu"}  # fused, simulated logits
    logit_parts = {name: [] for name in runners}  # every variant's accuracy logits, for its failure behaviour
    label_parts = []
    batches = math.ceil(len(samples) / 32)
    for x, y in tqdm(iter_batches(samples, pre, 32), total=batches, desc="bench: accuracy", unit="batch", leave=False):
        ref_logits = accuracy_runners[reference](x)
        outputs = {name: ref_logits if name == reference else runner(x) for name, runner in accuracy_runners.items()}
        label_parts.append(y)
        for name, logits in outputs.items():
            accumulate(acc[name], logits, ref_logits, y)
            logit_parts[name].append(logits)
        for name, simulator in simulators.items():
            sim_logits = outputs[name] if accuracy_runners[name] is simulator else simulator(x)
            accumulate(simulated[name], sim_logits, ref_logits, y)
            if name in fused_vs_simulated:
                fused_vs_simulated[name][0].append(outputs[name])
                fused_vs_simulated[name][1].append(sim_logits)

    # Latency: the same real images for every variant, interleaved rounds.
    batches = cfg.throughput_batch if isinstance(cfg.throughput_batch, tuple) else (cfg.throughput_batch,)
    largest = max(cfg.batch_size, *batches)
    lat_x, _ = load_array(samples[:largest], pre)
    lat_x = np.resize(lat_x, (largest, *lat_x.shape[1:])).astype(np.float32)
    single = lat_x[: cfg.batch_size]
    latency = {name: [] for name in runners}
    through = {name: {b: [] for b in batches} for name in runners}
    for runner in runners.values():
        time_calls(runner, single, cfg.warmup)
        for b in batches:
            time_calls(runner, lat_x[:b], max(1, cfg.warmup // 2))
    per_round = max(1, cfg.iterations // cfg.rounds)
    wide_per_round = max(1, per_round // 4)
    for _ in tqdm(range(cfg.rounds), desc="bench: latency", unit="round", leave=False):
        for name, runner in runners.items():
            latency[name] += time_calls(runner, single, per_round)
            for b in batches:
                through[name][b] += time_calls(runner, lat_x[:b], wide_per_round)

    classes = ref_meta["classes"]
    ref_top1 = acc[reference].correct / acc[reference].count
    cpu = this_cpu()
    variants_out, warnings = {}, []
    for name, path in paths.items():
        a = acc[name]
        top1 = a.correct / a.count
        by_batch = {b: float(np.median(t)) for b, t in through[name].items()}
        wide_ms = by_batch[batches[0]]
        checks = int8_checks(name, precisions[name], metas[name], cpu, simulated.get(name), fused_vs_simulated.get(name), a, ref_top1)
        warnings += checks.get("warnings", [])
        variants_out[name] = {
            "path": path.name,
            "precision": precisions[name],
            "backend": runners[name].describe(),
            "runtime": runners[name].describe()["runtime"],
            "accuracy_method": ACCURACY_METHODS[precisions[name] if precisions[name] in ACCURACY_METHODS
                                                else "engine" if str(precisions[name]).startswith("tensorrt-") else "other"],
            **checks,
            "bytes": path.stat().st_size,
            "memory_mb_at_load": memory_mb[name],
            "top1": round(top1, 5),
            "top1_delta_pp": round((top1 - ref_top1) * 100, 3),
            "agreement": round(a.agree / a.count, 5),
            "mean_abs_logit_diff": round(a.abs_logit_diff / a.count, 6),
            "kl_divergence_from_reference": round(a.kl_divergence / a.count, 6),
            **({"top5": round(a.correct_top5 / a.count, 5)} if len(classes) > 5 else {}),
            "per_class_top1": {classes[k]: round(hit / total, 4) for k, (hit, total) in sorted(a.per_class_correct.items())},
            "drift": class_drift(a, acc[reference], classes),
            "latency_ms": {"batch": cfg.batch_size, **percentiles(latency[name]), "samples_ms": [round(t, 4) for t in latency[name]]},
            "throughput": {"batch": batches[0], "images_per_s": round(batches[0] / (wide_ms / 1000.0), 2), "median_batch_ms": round(wide_ms, 4),
                           "by_batch": {str(b): {"images_per_s": round(b / (ms / 1000.0), 2), "median_batch_ms": round(ms, 4)} for b, ms in by_batch.items()}},
        }
    temperatures = None
    if cfg.temperature_scaling and splits.test and splits.val:
        temperatures = fit_temperatures(accuracy_runners, splits.val[: cfg.max_images] if cfg.max_images else splits.val, pre)
    failures = failure_behaviour(cfg, {n: np.concatenate(parts) for n, parts in logit_parts.items()}, np.concatenate(label_parts),
                                 [_shown_path(s.path, cfg.data) for s in samples], classes, reference, temperatures)
    for name, failure in failures.items():
        variants_out[name]["failure"] = failure
    ref_p50 = variants_out[reference]["latency_ms"]["p50"]
    for v in variants_out.values():
        v["speedup_vs_reference_p50"] = round(ref_p50 / v["latency_ms"]["p50"], 3)

    record = {
        "stage": "bench",
        "artifacts": ["bench.json"],
        "config": cfg.to_dict(),
        "reference": reference,
        "evaluation": {"split": splits.evaluation_name, "images": len(samples), "classes": len(classes)},
        "input_shape": [cfg.batch_size, *pre.input_shape],
        "threads": cfg.threads or "onnxruntime default",
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "machine": machine_info(),
        "warnings": warnings + [f"{n}: skipped: {s['reason']}" for n, s in skipped.items()],
        "variants": variants_out,
        "skipped": skipped,
        "seconds": round(time.perf_counter() - started, 2),
    }
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    validate.start_rewrite(cfg.out_dir, "bench")
    write_json(cfg.out_dir / "bench.json", record)
    return record


LISTED_HIGH_CONFIDENCE_ERRORS = 50  # per variant in bench.json; the count is always exact


def _shown_path(path: Path, root: Path) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(path)


def fit_temperatures(runners: dict, samples, pre) -> dict:
    """Per variant, the temperature fitted on ``samples`` (the validation split): logits it never scores."""
    from tledge.bench.temperature import fit_temperature
    from tledge.data.images import iter_batches

    logits, labels = {name: [] for name in runners}, []
    for x, y in iter_batches(samples, pre, 32):
        labels.append(y)
        for name, runner in runners.items():
            logits[name].append(runner(x))
    y = np.concatenate(labels)
    return {name: fit_temperature(np.concatenate(parts), y) for name, parts in logits.items()}


def failure_behaviour(cfg: BenchConfig, logits: dict, labels: np.ndarray, files: list[str], classes: list[str], reference: str,
                      temperatures: dict | None = None) -> dict:
    """Per variant: calibration (ECE), the high-confidence errors, the accuracy-coverage curve and, with a target
    accuracy, the confidence below which to abstain; for an INT8 variant also how much quantization moved its ECE.
    With ``temperatures`` (fitted on validation) the same figures after scaling, beside the raw ones."""
    from tledge.bench.reliability import failure_summary

    out = {}
    for name, z in logits.items():
        fit = (temperatures or {}).get(name)
        record = failure_summary(z, labels, files, classes, threshold=cfg.high_confidence, target_accuracy=cfg.target_accuracy,
                                 temperature=fit["temperature"] if fit else None)
        if fit:
            record["temperature_scaled"]["fitted_on"] = {"split": "val", **fit}
        record["high_confidence_errors"] = record["high_confidence_errors"][:LISTED_HIGH_CONFIDENCE_ERRORS]
        out[name] = record
    for name, record in out.items():
        if name != reference:
            record["ece_change_vs_reference"] = round(record["ece"] - out[reference]["ece"], 5)
    return out
