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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from tledge.errors import TledgeError
from tledge.data.images import scan_images
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


@dataclass
class _Accumulator:
    correct: int = 0
    correct_top5: int = 0
    agree: int = 0
    count: int = 0
    abs_logit_diff: float = 0.0
    kl_divergence: float = 0.0  # of this variant's softmax from the reference's, summed over images
    per_class_correct: dict = field(default_factory=dict)
    confusion: np.ndarray | None = None  # [true class, predicted class] counts


ACCURACY_METHODS = {
    "int8-tensorrt": "simulated: Q/DQ run as float ops (ONNX Runtime, graph optimizations off), the arithmetic of "
                     "TensorRT's int32-accumulating INT8 kernels up to float rounding; not this CPU's int8 kernels",
    "int8-cpu": "this CPU's int8 kernels (ONNX Runtime, optimized); the simulated arithmetic is given beside it",
    "other": "ONNX Runtime on this CPU",
    "engine": "the TensorRT engine itself, on this device's GPU (or DLA)",
}


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64) - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _accumulate(a: _Accumulator, logits: np.ndarray, ref_logits: np.ndarray, y: np.ndarray) -> None:
    from tledge.validate import finite_array

    finite_array(logits, "a model's logits")
    pred = logits.argmax(1)
    classes = logits.shape[1]
    a.correct += int((pred == y).sum())
    top5 = np.argsort(-logits, axis=1)[:, : min(5, classes)]
    a.correct_top5 += int((top5 == y[:, None]).any(axis=1).sum())
    a.agree += int((pred == ref_logits.argmax(1)).sum())
    a.count += len(y)
    a.abs_logit_diff += float(np.abs(logits - ref_logits).mean()) * len(y)
    log_p, log_q = _log_softmax(ref_logits), _log_softmax(logits)
    a.kl_divergence += float((np.exp(log_p) * (log_p - log_q)).sum())
    if a.confusion is None:
        a.confusion = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(a.confusion, (y, pred), 1)
    for label, ok in zip(y.tolist(), (pred == y).tolist()):
        hit, total = a.per_class_correct.get(label, (0, 0))
        a.per_class_correct[label] = (hit + int(ok), total + 1)


def _int8_checks(name: str, precision: str, meta: dict, cpu: dict, sim: _Accumulator | None, logits: tuple | None,
                 fused: _Accumulator, ref_top1: float) -> dict:
    """The simulated figures of an INT8 variant and, for a CPU model, whether this CPU computes it as meant."""
    from tledge.cpu_isa import CPU_TARGETS
    from tledge.quant.quantize import fused_matches_simulation, fused_vs_simulated_figures

    if sim is None:
        return {}
    out = {"simulated": {"top1": round(sim.correct / sim.count, 5), "top1_delta_pp": round((sim.correct / sim.count - ref_top1) * 100, 3),
                         "agreement": round(sim.agree / sim.count, 5)}}
    if precision != "int8-cpu":
        return out
    warnings = []
    check = fused_vs_simulated_figures(np.concatenate(logits[0]), np.concatenate(logits[1]))
    out["fused_vs_simulated"] = {k: v for k, v in check.items() if k != "images"}
    target_name = meta.get("cpu_target")
    target = CPU_TARGETS.get(target_name)
    inside = target.covers(cpu["class"]) if target else None
    out["cpu_target"] = {"name": target_name or "unrecorded", "this_cpu": cpu["class"], "inside_target": inside,
                         "valid_on": sorted(target.classes) if target else None}
    if target is None:
        warnings.append(f"{name}: the model records no CPU target (made before tledge 0.1 tracked them); on CPUs without "
                        "VNNI its full 8-bit weights can saturate int16. Re-quantize with --cpu-target portable")
    elif not inside:
        warnings.append(
            f"{name}: THIS CPU ({cpu['class']}) IS OUTSIDE THE MODEL'S CPU TARGET '{target.name}' (valid on "
            f"{', '.join(sorted(target.classes))}). Its accuracy here ({fused.correct / fused.count:.4f}) is not what the model "
            f"computes on its target (simulated: {sim.correct / sim.count:.4f}); do not ship it to CPUs like this one. "
            "Rebuild with --cpu-target portable for every CPU"
        )
    if (inside or target is None) and not fused_matches_simulation(check):
        warnings.append(
            f"{name}: THIS CPU COMPUTES THE MODEL WRONGLY: its int8 kernels agree with the model's arithmetic on "
            f"{check['top1_agreement']:.1%} of the images (logits off by {check['mean_abs_logit_diff_relative']:.0%} of their spread)"
        )
    if warnings:
        out["warnings"] = warnings
    return out


def _class_drift(a: _Accumulator, ref: _Accumulator, classes: list[str]) -> dict:
    """How the variant's errors moved against the reference's: per-class top-1 change, the classes that lost most,
    and the confusion-matrix cells that changed most (true -> predicted: count change)."""
    per_class = {}
    for k, name in enumerate(classes):
        hit, total = a.per_class_correct.get(k, (0, 0))
        ref_hit, _ = ref.per_class_correct.get(k, (0, 0))
        if total:
            per_class[name] = round((hit - ref_hit) / total * 100, 3)
    shift = a.confusion - ref.confusion if a.confusion is not None and ref.confusion is not None else np.zeros((0, 0), int)
    cells = sorted(((int(shift[i, j]), i, j) for i in range(shift.shape[0]) for j in range(shift.shape[1]) if i != j and shift[i, j]),
                   key=lambda c: -abs(c[0]))
    return {
        "per_class_top1_delta_pp": per_class,
        "lost_most": [{"class": n, "top1_delta_pp": d} for n, d in sorted(per_class.items(), key=lambda kv: kv[1])[:3] if d < 0],
        "confusion_shift": [{"true": classes[i], "predicted": classes[j], "change": c} for c, i, j in cells[:5]],
        "changed_errors": int(np.abs(shift).sum() // 2) if shift.size else 0,
    }


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

    from tledge.artifacts import write_json
    from tledge.data.images import Preprocess, iter_batches, load_array
    from tledge.data.splits import splits_for
    from tledge.cpu_isa import this_cpu
    from tledge.machine import machine_info
    from tledge.runners.ort_runner import OrtRunner
    from tledge.bench.backends import backend_unavailable, make_runner

    from tledge import validate

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
    acc = {name: _Accumulator() for name in runners}
    simulated = {name: _Accumulator() for name in simulators}
    fused_vs_simulated = {name: ([], []) for name in simulators if precisions[name] == "int8-cpu"}  # fused, simulated logits
    batches = math.ceil(len(samples) / 32)
    for x, y in tqdm(iter_batches(samples, pre, 32), total=batches, desc="bench: accuracy", unit="batch", leave=False):
        ref_logits = accuracy_runners[reference](x)
        outputs = {name: ref_logits if name == reference else runner(x) for name, runner in accuracy_runners.items()}
        for name, logits in outputs.items():
            _accumulate(acc[name], logits, ref_logits, y)
        for name, simulator in simulators.items():
            sim_logits = outputs[name] if accuracy_runners[name] is simulator else simulator(x)
            _accumulate(simulated[name], sim_logits, ref_logits, y)
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
        checks = _int8_checks(name, precisions[name], metas[name], cpu, simulated.get(name), fused_vs_simulated.get(name), a, ref_top1)
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
            "drift": _class_drift(a, acc[reference], classes),
            "latency_ms": {"batch": cfg.batch_size, **percentiles(latency[name]), "samples_ms": [round(t, 4) for t in latency[name]]},
            "throughput": {"batch": batches[0], "images_per_s": round(batches[0] / (wide_ms / 1000.0), 2), "median_batch_ms": round(wide_ms, 4),
                           "by_batch": {str(b): {"images_per_s": round(b / (ms / 1000.0), 2), "median_batch_ms": round(ms, 4)} for b, ms in by_batch.items()}},
        }
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
