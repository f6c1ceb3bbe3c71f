"""Quantization-aware fine-tuning vs post-training quantization, side by side on one build.

Quantizes a build's FP32 model twice in one run, both with min-max ranges and every layer in INT8 (no per-layer
fallback), so the comparison isolates what QAT buys: post-training (PTQ) and QAT (tledge's fallback, forced here
by an unmeetable budget). Drift is the simulated INT8 arithmetic against the original FP32 model, on the
validation split (what the budget judges) and the test split (held out from everything).

    python bench/qat.py --build /work/runs/default --data ~/.cache/tledge/datasets/digits-v1 --epochs 2
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from tledge.data.images import Preprocess, load_array
from tledge.data.splits import load_splits
from tledge.export.onnx_io import read_metadata
from tledge.machine import machine_info
from tledge.quant.quantize import QuantizeConfig, quantize
from tledge.quant.recipes import TARGETS
from tledge.runners.ort_runner import OrtRunner


def drift(path: Path, x, y, ref) -> dict:
    out = OrtRunner(path, simulate_int8=True).run_batches(x)
    return {"top1": round(float(np.mean(out.argmax(1) == y)), 4),
            "drop_pp": round(float((np.mean(ref.argmax(1) == y) - np.mean(out.argmax(1) == y)) * 100), 2),
            "agreement": round(float(np.mean(out.argmax(1) == ref.argmax(1))), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    fp32 = args.build / "model.fp32.onnx"
    pre = Preprocess.from_dict(read_metadata(fp32)["preprocess"])
    splits = load_splits(args.data)
    x, y = load_array(splits.test or splits.val, pre)
    ref = OrtRunner(fp32).run_batches(x)
    work = Path(tempfile.mkdtemp(prefix="tledge-bench-qat-"))
    t0 = time.perf_counter()
    record = quantize(QuantizeConfig(model=fp32, data=args.data, out_dir=work, calibration=args.build / "calibration.json",
                                     checkpoint=args.build / "model.pt", fallback_layers=0, max_top1_drop_pp=0.0, min_agreement=1.0,
                                     qat_epochs=args.epochs))
    seconds = time.perf_counter() - t0
    rows = []
    for target, m in record["models"].items():
        qat = m.get("qat")
        if qat is None:  # met an unmeetable budget: nothing to compare
            continue
        rows.append({"target": target, "val_ptq": qat["post_training_drift"], "val_qat": qat["drift"], "qat_chosen": qat["chosen"],
                     "test_shipped": drift(work / TARGETS[target], x, y, ref)})
    qat = next(m["qat"] for m in record["models"].values() if "qat" in m)
    info = machine_info()
    print(f"machine: {info['cpu']}, {info['usable_cpus']} cores; versions {json.dumps(info['versions'])}")
    print(f"QAT: {qat['epochs']} epochs x {qat['images_per_epoch']} images, lr {qat['lr']}, KL per epoch {qat['loss_per_epoch']}, "
          f"{qat['seconds']} s; quantize in all {seconds:.0f} s; test split {len(x)} images, FP32 top-1 {np.mean(ref.argmax(1) == y):.4f}\n")
    print("| model | val PTQ drop (pt) | val PTQ agreement | val QAT drop (pt) | val QAT agreement | shipped | test drop (pt) | test agreement |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        p, q, t = r["val_ptq"], r["val_qat"], r["test_shipped"]
        print(f"| {r['target']} | {p['top1_drop_pp']:+.2f} | {p['agreement']:.4f} | {q['top1_drop_pp']:+.2f} | {q['agreement']:.4f} | "
              f"{'QAT' if r['qat_chosen'] else 'PTQ'} | {t['drop_pp']:+.2f} | {t['agreement']:.4f} |")
    if args.out:
        args.out.write_text(json.dumps({"machine": info, "qat": {k: v for k, v in qat.items() if k not in ("drift", "post_training_drift")},
                                        "rows": rows, "quantize_s": round(seconds, 1)}, indent=2) + "\n")


if __name__ == "__main__":
    main()
