"""How often `tledge monitor` raises a false alarm on unseen in-distribution images, and how often it detects shifts.

Per dataset: fine-tune EfficientNet-Lite0 (linear probe: its signals need a real classifier, not a good one) and
export it. The validation and test splits are pooled and cut in two halves at random (seeded), so both halves come
from one distribution: the reference is built from one half (`tledge.monitor.build_reference`, as
`write_reference` builds it from the validation split), and the trials draw N images at random from the other half,
as it is and under each shift made here (brightness +25%, brightness -25%, Gaussian blur radius 2, contrast x0.6,
and a class mix of only the two largest classes). The false-alarm rate is the share of clean trials with verdict
drift, a shift's detection rate the share of its trials with verdict drift; we count which signals moved.

Beside it, the dataset's own splits as given: the reference `write_reference` makes from the validation split
against the whole test split (one verdict: does the given test split look like the validation split?). Also the
split hygiene of the set and the FP32 model's failure behaviour on test (ECE, high-confidence errors).

    python bench/monitor_drift.py --data ../shared/data/neu-surface-defects --out bench/monitor_drift-neu.json
    python bench/monitor_drift.py --data ../shared/data/clothing-small --out bench/monitor_drift-clothing.json
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from tledge.bench.reliability import failure_summary
from tledge.cpu_isa import this_cpu
from tledge.data.hygiene import split_hygiene
from tledge.data.images import Preprocess, Sample
from tledge.data.splits import load_splits
from tledge.export.onnx_export import ExportConfig, export_onnx
from tledge.export.onnx_io import read_metadata
from tledge.machine import machine_info
from tledge.monitor import ModelTap, ReferenceConfig, build_reference, compare, load_reference, write_reference
from tledge.monitor.stage import run_model
from tledge.train.finetune import FinetuneConfig, finetune

SHIFTS = {
    "brightness +25%": lambda im: ImageEnhance.Brightness(im).enhance(1.25),
    "brightness -25%": lambda im: ImageEnhance.Brightness(im).enhance(0.75),
    "blur (radius 2)": lambda im: im.filter(ImageFilter.GaussianBlur(2)),
    "contrast x0.6": lambda im: ImageEnhance.Contrast(im).enhance(0.6),
}


def shifted(samples, edit, folder: Path):
    out = []
    for i, s in enumerate(samples):
        path = folder / f"{i:05d}.png"
        edit(Image.open(s.path).convert("RGB")).save(path)
        out.append(Sample(path, s.label))
    return out


def trials(reference, stats, emb, logits, n: int, count: int, rng, pool=None) -> dict:
    pool = np.arange(len(logits)) if pool is None else pool
    drift, moved = 0, Counter()
    for _ in range(count):
        idx = rng.choice(pool, size=min(n, len(pool)), replace=False)
        record = compare(reference, {k: v[idx] for k, v in stats.items()}, emb[idx], logits[idx])
        drift += record["verdict"] == "drift"
        moved.update(record["moved"])
    return {"trials": count, "images_per_trial": int(min(n, len(pool))), "drift_verdicts": drift, "rate": round(drift / count, 3),
            "signals_moved": dict(moved.most_common())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--images-per-trial", type=int, default=100)
    ap.add_argument("--trials", type=int, default=50)
    args = ap.parse_args()

    started = time.perf_counter()
    splits = load_splits(args.data)
    hygiene = split_hygiene(splits)
    with tempfile.TemporaryDirectory(prefix="tledge-monitor-bench-") as work:
        work = Path(work)
        t = time.perf_counter()
        finetune(FinetuneConfig(data=args.data, out=work, strategy="linear", epochs=args.epochs, image_size=args.image_size, allow_duplicates=True))
        export_onnx(ExportConfig(checkpoint=work / "model.pt", out=work / "model.fp32.onnx", data=args.data))
        train_seconds = time.perf_counter() - t
        ref_record = write_reference(ReferenceConfig(out_dir=work, data=args.data))
        given_reference = load_reference(work / "monitor.reference.json")
        meta = read_metadata(work / "model.fp32.onnx")
        pre = Preprocess.from_dict(meta["preprocess"])
        tap = ModelTap(work / "model.fp32.onnx")
        test = splits.test or splits.val
        clean_test = run_model(tap, test, pre)
        y = np.array([s.label for s in test])
        failure = failure_summary(clean_test[2], y, [str(s.path.relative_to(args.data)) for s in test], meta["classes"], target_accuracy=0.99)
        failure["high_confidence_errors"] = failure["high_confidence_errors"][:10]
        given = compare(given_reference, *clean_test)
        given = {"verdict": given["verdict"], "moved": given["moved"], "test_images": len(test),
                 "signals": {k: {"value": v["value"], "threshold": v["threshold"], "status": v["status"]} for k, v in given["signals"].items()}}

        # One distribution on both sides: val and test pooled, halved at random.
        pool = list(splits.val) + list(test if splits.test else [])
        order = np.random.default_rng(0).permutation(len(pool))
        ref_half, held_half = [pool[i] for i in order[: len(pool) // 2]], [pool[i] for i in order[len(pool) // 2:]]
        r_stats, r_emb, r_logits = run_model(tap, ref_half, pre)
        reference = build_reference(r_stats, r_emb, r_logits, meta["classes"])
        clean = run_model(tap, held_half, pre)
        y_held = np.array([s.label for s in held_half])
        rng = np.random.default_rng(0)
        result = {"clean (false alarms)": trials(reference, *clean, args.images_per_trial, args.trials, rng)}
        for name, edit in SHIFTS.items():
            folder = work / name.replace(" ", "_").replace("%", "pct")
            folder.mkdir()
            result[name] = trials(reference, *run_model(tap, shifted(held_half, edit, folder), pre), args.images_per_trial, args.trials, rng)
        largest = [k for k, _ in Counter(y_held.tolist()).most_common(2)]
        mix_pool = np.flatnonzero(np.isin(y_held, largest))
        result[f"class mix: only {', '.join(meta['classes'][k] for k in largest)}"] = trials(
            reference, *clean, args.images_per_trial, args.trials, rng, pool=mix_pool)

    record = {
        "dataset": str(args.data), "classes": meta["classes"], "image_size": args.image_size,
        "model": f"efficientnet_lite0, linear probe, {args.epochs} epochs (fine-tune + export {train_seconds:.0f} s)",
        "reference_from_val": {k: ref_record[k] for k in ("images", "bytes", "embedding_tensor")},
        "halves": {"reference_images": len(ref_half), "held_images": len(held_half)},
        "results": result,
        "given_test_split_vs_val_reference": given,
        "fp32_failure_behaviour_on_test": {k: failure[k] for k in ("top1", "ece", "mce", "high_confidence_error_count", "high_confidence_errors")}
                                          | {"selective_prediction": {k: failure["selective_prediction"][k] for k in ("aurc", "target")}},
        "split_hygiene": {k: hygiene[k] for k in ("images", "exact_within_split", "near_across_splits_total", "label_conflicts", "class_balance", "warnings")}
                         | {"exact_across_splits": len(hygiene["exact_across_splits"])},
        "machine": machine_info(), "cpu": this_cpu(), "python": platform.python_version(),
        "seconds": round(time.perf_counter() - started, 1),
    }
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    for name, r in result.items():
        print(f"{name:<34} drift in {r['drift_verdicts']:>3}/{r['trials']} trials of {r['images_per_trial']} images  {r['signals_moved']}")
    print(f"given splits: test vs the validation reference: {given['verdict']} {given['moved']}")
    print(f"ECE {failure['ece']:.4f}, {failure['high_confidence_error_count']} high-confidence errors of {len(test)}; wrote {args.out}")


if __name__ == "__main__":
    main()
