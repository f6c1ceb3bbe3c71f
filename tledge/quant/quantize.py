"""INT8 quantization with real calibration images, as two artifacts for two runtimes.

* ``model.int8.qdq.onnx`` for TensorRT (explicit quantization, TensorRT 8.5 and later): symmetric int8
  activations and per-channel int8 weights (axis 0), zero points 0, FP32 weights behind Q->DQ pairs, float bias.
  Q/DQ sit on the inputs of Conv/Gemm and Add, never between a Conv and its activation, so TensorRT fuses bias
  and ReLU6 into the convolution (a Conv feeding another Conv or an Add is followed by that consumer's Q/DQ).
* ``model.int8.cpu.onnx`` for ONNX Runtime on CPUs: uint8 activations with int8 per-channel weights (U8S8),
  which the VNNI/AVX2 kernels run about 2x faster than FP32, where S8S8 runs no faster than FP32. Its CPU target
  (:mod:`tledge.cpu_isa`) says which CPUs it computes correctly on: ``portable`` (the default) narrows the weights
  of exactly those channels whose int8 pairs could saturate the int16 step of x86 kernels without VNNI
  (:mod:`tledge.quant.saturation`); ``vnni`` keeps full 8-bit weights for CPUs that accumulate in int32.

The accuracy of a Q/DQ model is judged by simulating its quantized arithmetic (:class:`tledge.runners.backends.OrtRunner`
with ``simulate_int8=True``), never by this machine's int8 kernels alone.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tledge.cpu_isa import CPU_TARGET_CHOICES
from tledge.data.images import scan_images
from tledge.errors import TledgeError, require
from tledge.export.onnx_io import finite_onnx_weights, onnx_metadata
from tledge.quant.calibration_cache import version_code
from tledge.quant.engine_cost import estimate_float_cost
from tledge.quant.recipes import TARGETS, ArrayReader, make_recipes
from tledge.quant.sources import QAT_CHECKPOINT, Source, make_qat_source, make_rounded_source
from tledge.quant.weight_rounding import restore_float_layers

CALIBRATION_METHODS = ("minmax", "entropy", "percentile", "mse", "auto")
# What "auto" chooses between, per model, by validation drift (entropy lost to these on every set in bench/RESULTS.md;
# mse was the only method to meet the budget with every layer in INT8 on clothing-small's TensorRT model).
AUTO_CANDIDATES = ("minmax", "percentile", "mse")


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
    method: str = "auto"  # per model, the candidate closest to FP32 on validation (bench/RESULTS.md: mse met the budget where minmax could not)
    targets: tuple[str, ...] = ("tensorrt", "cpu")
    keep_float: tuple[str, ...] = ()
    batch_size: int = 16
    cpu_target: str = "portable"
    trt_version: str = "10.3.0"  # header of calibration.cache (JetPack 6.1/6.2); retarget it for another version
    # Drift budget, checked on the validation split by simulating each model's INT8 arithmetic.
    max_top1_drop_pp: float = 0.3
    min_agreement: float = 0.99
    fallback_layers: int = 16  # most layers kept in float to meet the budget; 0 checks and reports only
    # The CPU fallback leaves in INT8 a layer whose float copy slows the model by more than this share (1: no price).
    fallback_max_slowdown: float = 0.15  # bench/RESULTS.md: at 0.15 digits met the budget at 1.78x FP32, not 1.33x
    sensitivity_images: int = 32  # validation images that rank the layers
    budget_images: int = 1000  # most validation images the budget is judged on (evenly spaced; bounds memory)
    bias_correction: bool = True  # shift each quantized layer's bias by its mean weight-rounding error (bench/RESULTS.md: it helped on all three sets)
    # int8 weight levels chosen by each layer's output error on calibration images (weight_rounding.py), for both models
    weight_rounding: bool = True
    rounding_images: int = 64  # calibration images whose layer inputs choose the levels
    # Quantization-aware fine-tuning when post-training quantization misses the budget (needs the checkpoint).
    checkpoint: Path | None = None
    qat_epochs: int = 2  # 0: never
    # QAT also when post-training meets the budget only with more float layers than this (None: only when it
    # misses): each costs an INT8 engine reformats that cannot be timed without the target. Off by default: for the
    # default build's 16-layer TensorRT model it cost 2.5 minutes and missed the budget (bench/RESULTS.md).
    qat_over_float_layers: int | None = None
    qat_lr: float = 2e-5
    qat_images: int = 2048  # training images per QAT epoch at most

    def __post_init__(self):
        for name in ("model", "data", "out_dir"):
            object.__setattr__(self, name, Path(getattr(self, name)))
        for name in ("calibration", "checkpoint"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))
        if self.qat_epochs < 0 or self.qat_images < 1 or not self.qat_lr > 0 or (self.qat_over_float_layers or 0) < 0:
            raise TledgeError("QAT needs epochs >= 0 (0: off), images >= 1, a positive learning rate and qat_over_float_layers >= 0")
        if self.checkpoint is not None and self.qat_epochs and not self.checkpoint.is_file():
            raise TledgeError(f"checkpoint {self.checkpoint} (for quantization-aware fine-tuning) does not exist")
        if self.method not in CALIBRATION_METHODS:
            raise TledgeError(f"calibration method must be one of {CALIBRATION_METHODS}, got {self.method!r}")
        unknown = sorted(set(self.targets) - set(TARGETS))
        if unknown or not self.targets:
            raise TledgeError(f"quantization targets must be among {sorted(TARGETS)}, got {list(self.targets)}")
        if self.cpu_target not in CPU_TARGET_CHOICES:
            raise TledgeError(f"--cpu-target must be one of {list(CPU_TARGET_CHOICES)}, got {self.cpu_target!r}")
        if "tensorrt" in self.targets:
            version_code(self.trt_version)  # a bad or unsupported version fails before calibration
        if not 0 <= self.max_top1_drop_pp <= 100 or not 0 <= self.min_agreement <= 1:
            raise TledgeError("the drift budget needs 0 <= max top-1 drop <= 100 (points) and 0 <= min agreement <= 1")
        from tledge import validate as V

        V.number("--seed", self.seed, minimum=0)  # numpy refuses negative seeds, deep inside a stage
        if self.fallback_layers < 0:
            raise TledgeError(f"--fallback-layers must be 0 or more, got {self.fallback_layers}")
        if not 0 <= self.fallback_max_slowdown <= 1:
            raise TledgeError(f"--fallback-max-slowdown must be between 0 and 1 (a share of the latency), got {self.fallback_max_slowdown}")
        for name, flag in (("num_images", "--num-calib"), ("sensitivity_images", "sensitivity_images"), ("budget_images", "budget_images"),
                           ("batch_size", "batch_size"), ("rounding_images", "rounding_images")):
            if getattr(self, name) < 1:
                raise TledgeError(f"{flag} (calibration setting {name}) must be at least 1, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


def rank_methods(make, budget, work: Path, keep_float: tuple[str, ...]) -> tuple[list[str], dict]:
    """``auto``: the calibration methods in the order the budget search tries them (:func:`order_methods`), from
    each one's model before any fallback, on validation."""
    figures = {}
    for method in AUTO_CANDIDATES:
        path = work / f"auto-{method}.onnx"
        make(keep_float, path, method)
        figures[method] = {k: v for k, v in budget.evaluate(path).items() if k in ("top1", "top1_drop_pp", "agreement", "expected_agreement", "met")}
        path.unlink()
    ranked = order_methods(figures, len(budget.images()))
    return ranked, {"candidates": figures, "order": ranked,
                    "by": "expected agreement with FP32 minus top-1 lost, validation, simulated, before any fallback; "
                          "first a candidate within one image of the closest that meets the budget with every layer in INT8"}


def order_methods(figures: dict[str, dict], images: int) -> list[str]:
    """The methods closest to FP32 first (:func:`~tledge.quant.drift_budget.score`), except that one which meets
    the budget with every layer in INT8 and is within one validation image of the closest goes before them all.

    A float layer must earn its cost: on clothing-small the closest candidate (expected agreement 0.9942) missed the
    count by one image and its fallback kept a depthwise layer in float (1.59x FP32 instead of 1.97x on one thread),
    where the next (0.9940) met the budget with none (bench/RESULTS.md). A lead of under one image is noise; a
    larger one still wins, and then the fallback starts from it.
    """
    from tledge.quant.drift_budget import score

    by_score = sorted(figures, key=lambda m: (-score(figures[m]), AUTO_CANDIDATES.index(m) if m in AUTO_CANDIDATES else len(AUTO_CANDIDATES)))  # a tie goes to min-max
    best = score(figures[by_score[0]])
    free = [m for m in by_score if figures[m].get("met") and score(figures[m]) >= best - 1.0 / max(images, 1) - 1e-9]
    return free[:1] + [m for m in by_score if m not in free[:1]]


def quantize(cfg: QuantizeConfig) -> dict:
    """Calibrate on real training images and write the INT8 models, ``calibration.json`` and ``quantize.json``.

    >>> quantize(QuantizeConfig(model="out/model.fp32.onnx", data="my_images", out_dir="out"))  # doctest: +SKIP
    """
    require("onnxruntime.quantization", "pip install onnxruntime")
    import onnx

    from tledge import validate
    from tledge.artifacts import atomic_path, write_json
    from tledge.data.images import Preprocess, Sample, load_array
    from tledge.data.splits import splits_for
    from tledge.export.onnx_io import load_onnx, set_metadata
    from tledge.quant.bias_correction import correct_bias
    from tledge.quant.calibration import calibration_warnings, load_calibration_set, sample_calibration_set
    from tledge.quant.drift_budget import TRIED_KEYS, DriftBudget, describe_drift, score
    from tledge.quant.statistics import STATS_FILE, calibrate, calibration_key

    started = time.perf_counter()
    if not cfg.model.is_file():
        raise TledgeError(f"ONNX model {cfg.model} {'is a folder, not a file' if cfg.model.is_dir() else 'does not exist'}; run `tledge export` first")
    validate.output_dir(cfg.out_dir, "--out-dir")
    fp32_proto = load_onnx(cfg.model)
    meta = onnx_metadata(cfg.model, fp32_proto)
    finite_onnx_weights(fp32_proto, cfg.model)  # NaN weights would calibrate NaN ranges
    if meta.get("precision", "fp32") != "fp32":
        raise TledgeError(f"{cfg.model} is already quantized ({meta['precision']}); quantize the FP32 model from `tledge export`")
    pre = Preprocess.from_dict(meta["preprocess"])
    if cfg.keep_float:
        names = {n.name for n in load_onnx(cfg.model, load_external_data=False).graph.node}
        unknown = [n for n in cfg.keep_float if n not in names]
        if unknown:
            convs = sorted(n for n in names if "Conv" in n or "Gemm" in n)
            raise TledgeError(f"--keep-float names nodes that {cfg.model} does not have: {unknown}; for example {convs[:3]}")
    splits = splits_for(cfg.data, cfg.model.parent, cfg.seed, meta.get("splits_sha256"))
    if splits.classes != meta["classes"]:
        raise TledgeError(f"{cfg.data} has classes {splits.classes}, the model was trained on {meta['classes']}")
    if cfg.calibration is not None:
        calib = load_calibration_set(cfg.calibration, splits.root, meta["classes"], pre.input_shape)
    else:
        calib = sample_calibration_set(splits, cfg.num_images, cfg.seed)
    scan_images([*calib.paths, *(s.path for s in splits.val)])  # what calibration and the drift budget read
    x, _ = load_array([Sample(p, 0) for p in calib.paths], pre)  # labels are not used by calibration
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    validate.start_rewrite(cfg.out_dir, "quantize")

    budget = DriftBudget(cfg, splits, pre)
    # One pass of the calibration images through the FP32 model; every method below is a choice over its statistics.
    key = calibration_key(cfg.model, [digest for _, digest in calib.images])
    stats, stats_reused = calibrate(cfg.model, x, key, cfg.out_dir / STATS_FILE)
    base = Source(cfg.model, fp32_proto, stats, qat=None)
    rounded: dict[bool, Source] = {}  # weight rounding's sources, one per grid (pair-safe or not): made once, below
    qat_source: list[Source] = []  # made at most once, by the first model that needs it
    one_batch = ArrayReader(meta["input"], x[: cfg.batch_size], cfg.batch_size)
    outputs = {}
    try:
        for recipe in make_recipes(cfg):
            dst = cfg.out_dir / recipe.path
            info = recipe.prepare(fp32_proto)
            facts: dict[Path, dict] = {}  # per candidate file: the record describes the one chosen
            recipe_base = base
            if cfg.weight_rounding:
                grid = recipe.pair_safe_weights
                if grid not in rounded:
                    rounded[grid] = make_rounded_source(cfg, fp32_proto, x, tempfile.mkdtemp(prefix=".tledge-rounding-", dir=cfg.out_dir), pair_safe=grid)
                recipe_base = rounded[grid]
                info["weight_rounding"] = recipe_base.rounding

            def make(keep_float: tuple[str, ...], path: Path, method: str, source: Source = recipe_base, recipe=recipe, facts=facts):
                """Quantize with ``keep_float`` in float, check the result against its runtime's rules, label it."""
                recipe.quantize(source.path, path, one_batch, source.stats.ranges(method, recipe.symmetric_activations), keep_float)
                proto, facts[path] = recipe.finish(onnx.load(str(path)), source.proto, keep_float)
                if source.rounding and keep_float:
                    restore_float_layers(proto, fp32_proto, keep_float)
                if cfg.bias_correction:
                    facts[path]["bias_correction"] = correct_bias(proto, source.proto, source.stats.channel_mean)
                set_metadata(proto, {**meta, "precision": f"int8-{recipe.target}", "calibration": "calibration.json",
                                     "calibration_method": method, "kept_float": list(keep_float), **recipe.metadata(),
                                     **({"weights": "quantization-aware fine-tuned"} if source.qat else {}),
                                     **({"weights": "int8 levels chosen by output error"} if source.rounding else {})})
                onnx.save(proto, str(path))
                return proto

            # Candidates live in a private folder; only the chosen model replaces dst, in one rename.
            with tempfile.TemporaryDirectory(prefix=".tledge-quantize-", dir=cfg.out_dir) as work:
                methods = [cfg.method]
                if cfg.method == "auto":
                    methods, info["method_choice"] = rank_methods(make, budget, Path(work), tuple(cfg.keep_float))
                # auto: the fallback starts from the method closest to FP32; only if even that misses the budget does
                # the next one get a search. Searching every method for the fewest float layers chose a model that
                # met the budget on validation by luck (digits: percentile, 2 layers, test agreement 0.978).
                outcomes = []
                for method in methods:
                    (Path(work) / method).mkdir()
                    outcome = budget.meet(lambda keep, path, method=method: make(keep, path, method), Path(work) / method, fp32_proto, recipe.target)
                    outcomes.append((method, *outcome))
                    if outcome[2]["met"]:
                        break
                method, chosen, keep_float, info["drift"], fallback = max(outcomes, key=lambda o: (o[3]["met"], score(o[3])))
                if cfg.method == "auto":
                    info["method_choice"]["budget_search"] = [{"method": m, "layers_in_float": len(k) - len(cfg.keep_float), **{key: d[key] for key in TRIED_KEYS}}
                                                              for m, _, k, d, _ in outcomes]
                    info["method_choice"]["chosen"] = method
                info["calibration_method"] = method
                source = base  # the implicit path builds from the FP32 model: its cache takes that model's ranges
                added = len(keep_float) - len(cfg.keep_float)
                # QAT when post-training misses the budget, or meets it only by keeping many layers in float.
                wants_qat = not info["drift"]["met"] or (cfg.qat_over_float_layers is not None and added > cfg.qat_over_float_layers)
                if wants_qat and cfg.checkpoint is not None and cfg.qat_epochs > 0:
                    if not qat_source:
                        qat_source.append(make_qat_source(cfg, splits, x, Path(tempfile.mkdtemp(prefix=".tledge-qat-", dir=cfg.out_dir))))
                    qat = qat_source[0]
                    (Path(work) / "qat").mkdir()
                    q_chosen, q_keep, q_drift, q_fallback = budget.meet(
                        lambda keep, path: make(keep, path, method, source=qat), Path(work) / "qat", qat.proto, recipe.target)
                    if info["drift"]["met"]:  # both within the budget: the one with fewer float layers ships
                        better = q_drift["met"] and len(q_keep) < len(keep_float)
                        why = f"post-training met the budget with {added} layers in float, over qat_over_float_layers ({cfg.qat_over_float_layers})"
                    else:
                        better = q_drift["met"] or score(q_drift) > score(info["drift"])
                        why = "post-training missed the budget"
                    info["qat"] = {**qat.qat, "why": why, "post_training_drift": info["drift"],
                                   "post_training_float_layers": added, "drift": q_drift, "float_layers": len(q_keep) - len(cfg.keep_float),
                                   "chosen": better}
                    if better:
                        chosen, keep_float, info["drift"], fallback, source = q_chosen, q_keep, q_drift, q_fallback, qat
                if fallback:
                    info["fallback"] = fallback
                chosen_facts = dict(facts.get(chosen, {}))
                for key in ("bias_correction", "kernel_layout"):
                    if key in chosen_facts:
                        info[key] = chosen_facts.pop(key)
                if "narrowing" in info:
                    info["narrowing"].update(chosen_facts)
                with atomic_path(dst) as tmp:
                    shutil.copyfile(chosen, tmp)
                    info.update(recipe.validate(tmp, budget.images()))
            info.update(recipe.companions(cfg, dst, source.stats.ranges(method, recipe.symmetric_activations), keep_float))
            proto = onnx.load(str(dst))
            ops = [n.op_type for n in proto.graph.node]
            if recipe.target == "tensorrt":  # float layers cost an engine more than their MACs: say how much
                info["engine_cost"] = estimate_float_cost(proto)
            outputs[recipe.target] = {
                "path": dst.name,
                "activations": recipe.activations,
                "weights": recipe.weights,
                "quantize_nodes": ops.count("QuantizeLinear"),
                "dequantize_nodes": ops.count("DequantizeLinear"),
                "kept_float": list(keep_float),
                **info,
            }
        if any(o.get("qat", {}).get("chosen") for o in outputs.values()):  # the weights the shipped INT8 models came from
            with atomic_path(cfg.out_dir / QAT_CHECKPOINT) as tmp:
                shutil.copyfile(qat_source[0].checkpoint, tmp)
        else:  # never leave an earlier run's QAT weights beside models that did not come from them
            (cfg.out_dir / QAT_CHECKPOINT).unlink(missing_ok=True)
    finally:
        if qat_source:
            shutil.rmtree(qat_source[0].path.parent, ignore_errors=True)
        for made in rounded.values():
            shutil.rmtree(made.path.parent, ignore_errors=True)
    warnings = [f"{target}: INT8 DRIFT BUDGET MISSED: {describe_drift(o['drift'])}" for target, o in outputs.items() if not o["drift"]["met"]]
    for target, o in outputs.items():
        versus = o.get("fallback", {}).get("latency_cost", {}).get("speedup_vs_fp32", {})
        if versus and min(versus.values()) < 1.0:
            warnings.append(f"{target}: with {len(o['kept_float'])} layer(s) in float the INT8 model is slower than FP32 on this CPU "
                            f"({versus['one_thread']:.2f}x FP32's speed on one thread, {versus['all_cores']:.2f}x on every core): "
                            f"ship FP32 here, or loosen the drift budget")
    warnings += calibration_warnings(calib, meta["classes"])
    one_image_pp = 100 / max(1, len(budget.samples))
    if 0 < cfg.max_top1_drop_pp < one_image_pp:
        warnings.append(f"the drift budget is judged on {len(budget.samples)} validation images, where one image is {one_image_pp:.2f} pt of "
                        f"top-1: a budget of {cfg.max_top1_drop_pp:g} pt allows no lost image (more validation images make it finer)")
    # Written after the models it describes exist, so it never names images that calibrated nothing on disk.
    write_json(cfg.out_dir / "calibration.json", calib.to_dict(meta["classes"], pre.input_shape))
    record = {
        "stage": "quantize",
        "artifacts": [o["path"] for o in outputs.values()] + [o["calibration_cache"]["path"] for o in outputs.values() if "calibration_cache" in o]
        + ["calibration.json", STATS_FILE] + ([QAT_CHECKPOINT] if (cfg.out_dir / QAT_CHECKPOINT).is_file() else []) + ["quantize.json"],
        "config": cfg.to_dict(),
        "calibration": {"path": "calibration.json", "images": len(calib.images), "method": cfg.method, "sampling": calib.sampling,
                        "statistics": {"path": STATS_FILE, "tensors": len(stats.names), "reused": stats_reused}},
        "budget": {"max_top1_drop_pp": cfg.max_top1_drop_pp, "min_agreement": cfg.min_agreement, "split": budget.split_name},
        "models": outputs,
        "warnings": warnings,
        "seconds": round(time.perf_counter() - started, 2),
    }
    record["sha256"] = validate.digests(cfg.out_dir, [n for n in record["artifacts"] if n != "quantize.json"])
    write_json(cfg.out_dir / "quantize.json", record)
    return record
