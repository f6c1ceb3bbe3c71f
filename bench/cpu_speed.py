"""CPU INT8 speed at full size: FP32 vs tledge's CPU INT8 model, batch 1, per backbone, and where the time goes.

For each backbone this runs tledge's own stages as a user would, at ``--image-size`` (224 by default):

1. ``finetune`` with the linear strategy (a new head on the frozen pretrained backbone) where pretrained weights
   are available offline; otherwise the randomly initialised network with a new head, said in the output (speed
   does not depend on the weights, accuracy does, so such a model gets no drift budget);
2. ``export`` to ONNX;
3. ``quantize`` the CPU model twice from the same calibration images: with the drift budget and its fallback
   (what a build ships) and with every layer in INT8 (``fallback_layers=0``: the speed INT8 can give);
4. batch-1 latency of FP32 and both INT8 models, interleaved in rounds (every model timed in every round), on one
   thread and on every core, in ``--passes`` passes of new sessions (their mean, and each pass's ratio), and ONNX
   Runtime's profile of each on one thread: kernel time by kind of layer.

    python bench/cpu_speed.py --data ../shared/data/clothing-small --work /tmp/cpu-speed \\
        --models efficientnet_lite0,mobilenet_v2,resnet50 --out bench/cpu_speed-clothing.json

Needs the training extra (torch, torchvision) and onnxruntime. ``--reuse`` keeps finished stages in ``--work``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from cpu_int8_profile import profile  # the sibling benchmark's profiler


def _stage(path: Path, reuse: bool) -> bool:
    """True when this stage must run (its artifact is missing, or reuse is off)."""
    return not (reuse and path.is_file())


def untrained_checkpoint(name: str, data: Path, out: Path, image_size: int) -> None:
    """``model.pt`` and ``splits.json`` for the randomly initialised ``name``, as ``tledge finetune`` writes them."""
    from tledge.data.splits import load_splits, write_splits
    from tledge.models.checkpoint import create_model, save_checkpoint
    from tledge.models.registry import get_spec
    from tledge.train.finetune import resolve_preprocess

    splits = load_splits(data)
    out.mkdir(parents=True, exist_ok=True)
    sha = write_splits(splits, out / "splits.json", 0, 0.15, 0.15)
    model, _ = create_model(name, weights="none", num_classes=len(splits.classes))
    pre = resolve_preprocess(get_spec(name).preprocess, image_size, None)
    save_checkpoint(out / "model.pt", model, name, splits.classes, pre, extra={"splits_sha256": sha})


def prepare(name: str, data: Path, work: Path, image_size: int, epochs: int, reuse: bool) -> dict:
    """Fine-tuned, exported and quantized files for one backbone, with what each stage recorded."""
    from tledge.export.onnx_export import ExportConfig, export_onnx
    from tledge.models.registry import get_spec
    from tledge.quant.quantize import QuantizeConfig, quantize
    from tledge.train.finetune import FinetuneConfig, finetune

    spec = get_spec(name)
    out = work / name
    weights = "pretrained" if spec.offline and spec.load_pretrained is not None else "none"
    record = out / "cpu_speed.stages.json"  # what earlier runs' stages recorded, for --reuse
    info = json.loads(record.read_text()) if reuse and record.is_file() else {}
    info.update({"model": name, "weights": weights if weights == "none" else spec.weights_source, "image_size": image_size})
    t0 = time.perf_counter()
    if _stage(out / "model.pt", reuse):
        if weights == "pretrained":
            ft = finetune(FinetuneConfig(data=data, out=out, model=name, weights=weights, image_size=image_size, strategy="linear",
                                         epochs=epochs, patience=2, allow_duplicates=True))
            info["finetune"] = {**ft["result"], "seconds": round(time.perf_counter() - t0, 1)}
        else:
            # Without pretrained weights a linear head learns nothing and training from scratch at full size takes an
            # hour on two cores: the random-initialised network (with a 10-class head) times the same.
            untrained_checkpoint(name, data, out, image_size)
            info["finetune"] = "none: random initialisation (no pretrained weights offline)"
    if _stage(out / "model.fp32.onnx", reuse):
        export_onnx(ExportConfig(checkpoint=out / "model.pt", out=out / "model.fp32.onnx", data=data))
    # The budget keeps accuracy: a random backbone has none to keep, so it gets only the all-INT8 model. The budgeted
    # run makes both targets' models in the model's own folder, which then reads like a `tledge build` (bench/peers.py).
    variants = {"budget": (out, {}), "all-int8": (out / "all-int8", {"fallback_layers": 0, "targets": ("cpu",)})}
    if weights != "pretrained":
        del variants["budget"]
    for variant, (dst, overrides) in variants.items():
        if _stage(dst / "model.int8.cpu.onnx", reuse):
            # both INT8 models from the same calibration images
            calibration = out / "calibration.json" if variant != "budget" and "budget" in variants else None
            t0 = time.perf_counter()
            q = quantize(QuantizeConfig(model=out / "model.fp32.onnx", data=data, out_dir=dst, qat_epochs=0,
                                             calibration=calibration, **overrides))
            info[variant] = {"seconds": round(time.perf_counter() - t0, 1)}
            for target, m in q["models"].items():
                info[variant][target] = {"float_layers": len(m["kept_float"]), "kept_float": m["kept_float"], "drift": m["drift"],
                                         "method": m.get("calibration_method"), **({"engine_cost": m["engine_cost"]} if "engine_cost" in m else {})}
    info["variants"] = {v: str(dst / "model.int8.cpu.onnx") for v, (dst, _) in variants.items()}
    record.write_text(json.dumps(info, indent=1) + "\n")
    return info


def time_models(paths: dict[str, Path], threads: int, rounds: int, per_round: int) -> dict[str, float]:
    import numpy as np

    from tledge.runners.ort_runner import OrtRunner
    from tledge.runners.timing import interleaved_p50

    runners = {k: OrtRunner(p, threads=threads, spinning=False) for k, p in paths.items()}  # no spinning: sessions timed in turn
    shape = [d if isinstance(d, int) else 1 for d in runners["fp32"].session.get_inputs()[0].shape]
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    try:
        return {k: round(v, 3) for k, v in interleaved_p50(runners, x, rounds=rounds, per_round=per_round, warmup=10).items()}
    finally:
        for r in runners.values():
            r.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="an ImageFolder dataset (train/ val/ [test/] or one folder per class)")
    ap.add_argument("--work", type=Path, required=True, help="folder for the fine-tuned and quantized models")
    ap.add_argument("--models", default="efficientnet_lite0,mobilenet_v2,resnet50")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--epochs", type=int, default=3, help="most epochs of the linear head")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--per-round", type=int, default=20)
    ap.add_argument("--passes", type=int, default=2, help="timing passes, each in new sessions (the mean is reported)")
    ap.add_argument("--profile-runs", type=int, default=100)
    ap.add_argument("--reuse", action="store_true", help="keep the stages already in --work")
    ap.add_argument("--out", type=Path, help="write the results as JSON")
    args = ap.parse_args(argv)
    import onnxruntime as ort
    import torch

    cores = os.cpu_count() or 1
    from tledge.machine import machine_info

    machine = machine_info()
    result = {"machine": {**{k: machine[k] for k in ("cpu", "cpu_class", "cpu_int8_flags", "usable_cpus")}, "python": platform.python_version(),
                          "onnxruntime": ort.__version__, "torch": torch.__version__},
              "data": str(args.data), "image_size": args.image_size, "batch": 1, "rounds": args.rounds, "per_round": args.per_round,
              "models": []}
    print(f"CPU {machine['cpu']}, int8 class {machine['cpu_class']} (flags {machine['cpu_int8_flags']}), {cores} cores; "
          f"onnxruntime {ort.__version__}, torch {torch.__version__}")
    for name in args.models.split(","):
        info = prepare(name, args.data, args.work, args.image_size, args.epochs, args.reuse)
        out = args.work / name
        paths = {"fp32": out / "model.fp32.onnx", **{v: Path(p) for v, p in info["variants"].items()}}
        # Each pass in new sessions: on these VMs one session's placement moved a ratio by up to 20%.
        passes = {t: [time_models(paths, n, args.rounds, args.per_round) for _ in range(args.passes)] for t, n in (("one_thread", 1), ("every_core", cores))}
        info["p50_ms_passes"] = passes
        info["p50_ms"] = {t: {k: round(sum(p[k] for p in v) / len(v), 3) for k in paths} for t, v in passes.items()}
        info["speedup_vs_fp32"] = {t: {k: round(v["fp32"] / v[k], 2) for k in v if k != "fp32"} for t, v in info["p50_ms"].items()}
        info["speedup_vs_fp32_passes"] = {t: [{k: round(p["fp32"] / p[k], 2) for k in p if k != "fp32"} for p in v] for t, v in passes.items()}
        info["profile_one_thread"] = {k: profile(p, 1, args.profile_runs) for k, p in paths.items()}
        result["models"].append(info)
        print(f"\n{name} ({info['weights']}), {args.image_size} px, batch 1: p50 ms and speed-up vs FP32")
        for t, v in info["p50_ms"].items():
            print(f"  {t:10s} fp32 {v['fp32']:7.2f}" + "".join(
                f"   {k} ({info[k]['cpu']['float_layers']} float) {v[k]:7.2f} {info['speedup_vs_fp32'][t][k]:5.2f}x"
                f" (passes {', '.join(f'{p[k]:.2f}x' for p in info['speedup_vs_fp32_passes'][t])})" for k in info["variants"]))
        prof = info["profile_one_thread"]
        kinds = sorted({k for m in prof.values() for k in m["kernel_ms"]}, key=lambda k: -max(m["kernel_ms"].get(k, 0) for m in prof.values()))
        print(f"  {'kernel ms, one thread':32s}" + "".join(f"{k:>20s}" for k in prof))
        for kind in kinds:
            print(f"  {kind:32s}" + "".join(f"{m['kernel_ms'].get(kind, 0):12.3f} ({m['nodes'].get(kind, 0):3d})  " for m in prof.values()))
        print(f"  {'total':32s}" + "".join(f"{m['total_kernel_ms']:12.3f}        " for m in prof.values()))
        if args.out:  # after every model: a long run that stops keeps what it measured
            args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
