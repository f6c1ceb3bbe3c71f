"""Int8 weight levels by output error vs nearest rounding, both INT8 models, every layer in INT8.

For one fine-tuned FP32 model (a `tledge build` folder) and its dataset, in one run: for each calibration method,
tledge's TensorRT Q/DQ and portable CPU models with `weight_rounding` off (nearest levels; the CPU model's only
rounding until 2026-12-04) and on, no float layer (`fallback_layers=0`), bias correction on (the default). Every
variant reads the same calibration images and the first one's statistics for the FP32 model.

Accuracy is the simulated INT8 arithmetic (the same on every machine): top-1, agreement with FP32 and expected
agreement (tledge.quant.drift_budget.expected_agreement: less noisy than a count on a few hundred images) on the
validation split (what the drift budget judges) and on the test split (held out from every choice). The CPU
models' batch-1 speed-up over FP32, one thread, interleaved, depends on this CPU.

    python bench/weight_rounding.py --build tledge-out --data ~/.cache/tledge/datasets/digits-v1 --out bench/weight_rounding-digits.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from int8_budget import logits, p50_ms

from tledge.cpu_isa import this_cpu
from tledge.data.images import Preprocess, load_array
from tledge.data.splits import load_splits
from tledge.export.onnx_io import read_metadata
from tledge.machine import machine_info
from tledge.quant.drift_budget import expected_agreement
from tledge.quant.quantize import QuantizeConfig, quantize
from tledge.quant.statistics import STATS_FILE

FILES = {"tensorrt": "model.int8.qdq.onnx", "cpu": "model.int8.cpu.onnx"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--methods", default="minmax,percentile,mse")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    fp32 = args.build / "model.fp32.onnx"
    pre = Preprocess.from_dict(read_metadata(fp32)["preprocess"])
    splits = load_splits(args.data)
    sets = {name: load_array(getattr(splits, name), pre) for name in ("val", "test") if getattr(splits, name)}
    refs = {name: logits(fp32, x, False) for name, (x, _) in sets.items()}
    work = Path(tempfile.mkdtemp(prefix="tledge-bench-weight-rounding-"))
    rows, cpu_files, stats_file = [], {}, None
    for method in args.methods.split(","):
        for rounding in (False, True):
            name = f"{method}-{'rounded' if rounding else 'nearest'}"
            out = work / name
            if stats_file is not None:
                out.mkdir(parents=True)
                shutil.copyfile(stats_file, out / STATS_FILE)
            t0 = time.perf_counter()
            record = quantize(QuantizeConfig(model=fp32, data=args.data, out_dir=out, calibration=args.build / "calibration.json",
                                             method=method, fallback_layers=0, weight_rounding=rounding))
            seconds = time.perf_counter() - t0
            stats_file = stats_file or out / STATS_FILE
            for target, model in record["models"].items():
                row = {"variant": name, "method": method, "weights": "rounded by output error" if rounding else "nearest", "target": target,
                       "quantize_s": round(seconds, 1), "rounding": model.get("weight_rounding")}
                for split, (x, y) in sets.items():
                    got, ref = logits(out / FILES[target], x, True), refs[split]
                    row[split] = {"top1": round(float(np.mean(got.argmax(1) == y)), 5),
                                  "agreement": round(float(np.mean(got.argmax(1) == ref.argmax(1))), 5),
                                  "expected_agreement": round(expected_agreement(got, ref), 5)}
                rows.append(row)
                if target == "cpu":
                    cpu_files[name] = out / FILES[target]
    latency = p50_ms({"fp32": fp32, **cpu_files}, sets["val"][0][:1])
    for r in rows:
        if r["target"] == "cpu":
            r["speedup_b1"] = round(latency["fp32"] / latency[r["variant"]], 3)

    cpu = {**this_cpu(), "name": machine_info()["cpu"]}
    top1 = {k: round(float(np.mean(refs[k].argmax(1) == y)), 5) for k, (_, y) in sets.items()}
    print(f"CPU: {cpu['name']} class {cpu['class']} flags {cpu['int8_flags']}; onnxruntime {machine_info()['versions']['onnxruntime']}; "
          f"val {len(sets['val'][0])} / test {len(sets.get('test', sets['val'])[0])} images; FP32 top-1 {top1}")
    print("| model | method | weights | val top-1 | val agreement (expected) | test top-1 | test agreement (expected) | CPU speed-up b1, 1 thread |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        v, t = r["val"], r.get("test", r["val"])
        print(f"| {r['target']} | {r['method']} | {r['weights']} | {v['top1']:.4f} | {v['agreement']:.4f} ({v['expected_agreement']:.4f}) | "
              f"{t['top1']:.4f} | {t['agreement']:.4f} ({t['expected_agreement']:.4f}) | {str(r['speedup_b1']) + 'x' if 'speedup_b1' in r else 'n/a'} |")
    if args.out:
        args.out.write_text(json.dumps({"cpu": cpu, "versions": machine_info()["versions"], "fp32_top1": top1, "rows": rows},
                                       indent=2, default=str) + "\n")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
