"""INT8 drift side by side: ONNX Runtime's plain defaults vs tledge's calibration methods vs tledge's drift budget.

For one fine-tuned FP32 model (a `tledge build` folder) and its dataset, in one run:

* `ort-defaults`: `onnxruntime.quantization.quantize_static` with its defaults (QDQ, per-tensor, MinMax, U8S8) on
  the same calibration images: the plain approach;
* `tledge-<method>`: tledge's TensorRT Q/DQ and portable CPU models for each fixed method, no fallback, no bias
  correction (`+bc`: with it);
* `tledge-budget`: tledge's defaults, as `tledge build` runs them: the method chosen per model on validation
  (`auto`), bias correction, the drift budget with per-layer fallback and, when that still misses it,
  quantization-aware fine-tuning from the build's `model.pt`;
* `tledge-minmax-budget`: the same with min-max ranges (the default until 2026-12-01);
* `tledge-unpriced-budget`: tledge's defaults with the CPU fallback chosen by sensitivity alone
  (`fallback_max_slowdown=1`, the default until 2026-12-02) instead of priced by measured latency;
* `tledge-nearest-budget`: tledge's defaults with every int8 weight rounded to its nearest level
  (`weight_rounding=False`; the CPU model's default until 2026-12-04) instead of chosen by output error.

Every tledge variant reuses the first one's calibration statistics (one pass of the images through the model).

Every accuracy figure is the simulated INT8 arithmetic (the same on every machine): drift against FP32 on the
validation split (what the budget judges) and on the test split (held out from every choice). The CPU models'
batch-1 speed-up over FP32 is timed here, interleaved, one thread per model and then every core per model (thread
pools told not to spin, so one session's idle threads do not steal the cores from the next), and depends on this CPU.

    python bench/int8_budget.py --build tledge-out --data ~/.cache/tledge/datasets/digits-v1 --out bench/int8_budget-digits.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from tledge.cpu_isa import this_cpu
from tledge.data.images import Preprocess, load_array
from tledge.data.splits import load_splits
from tledge.export.onnx_io import read_metadata
from tledge.machine import machine_info
from tledge.quant.quantize import QuantizeConfig, quantize
from tledge.quant.recipes import ArrayReader, quiet_onnxruntime
from tledge.quant.statistics import STATS_FILE
from tledge.runners.ort_runner import OrtRunner
from tledge.runners.timing import interleaved_p50


def logits(path: Path, x: np.ndarray, simulate: bool) -> np.ndarray:
    return OrtRunner(path, simulate_int8=simulate).run_batches(x)


def drift(out: np.ndarray, ref: np.ndarray, y: np.ndarray) -> dict:
    return {"top1": float(np.mean(out.argmax(1) == y)), "drop_pp": float((np.mean(ref.argmax(1) == y) - np.mean(out.argmax(1) == y)) * 100),
            "agreement": float(np.mean(out.argmax(1) == ref.argmax(1)))}


def p50_ms(paths: dict[str, Path], x: np.ndarray, threads: int | None = 1, rounds: int = 10, per_round: int = 40) -> dict[str, float]:
    # Spinning off: a dozen sessions timed in turn with every core and spinning pools stole the cores from one another
    # (identical files came out at 1.69x and 3.33x in one run); single-threaded ratios repeat (bench/RESULTS.md, gate).
    runners = {k: OrtRunner(p, threads=threads, spinning=False) for k, p in paths.items()}
    return interleaved_p50(runners, x, rounds=rounds, per_round=per_round, warmup=5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--methods", default="minmax,percentile,entropy,mse", help="fixed methods to compare")
    ap.add_argument("--bc-methods", default="minmax,mse", help="fixed methods also run with bias correction")
    ap.add_argument("--only", default="", help="comma-separated variant names to run (default: all)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    fp32 = args.build / "model.fp32.onnx"
    meta = read_metadata(fp32)
    pre = Preprocess.from_dict(meta["preprocess"])
    splits = load_splits(args.data)
    sets = {name: load_array(getattr(splits, name), pre) for name in ("val", "test") if getattr(splits, name)}
    refs = {name: logits(fp32, x, False) for name, (x, _) in sets.items()}
    calibration = args.build / "calibration.json"
    calib_paths = {e["path"] for e in json.loads(calibration.read_text())["images"]}
    calib_x, _ = load_array([s for s in splits.train if s.path.relative_to(splits.root).as_posix() in calib_paths], pre)
    work = Path(tempfile.mkdtemp(prefix="tledge-bench-int8-budget-"))

    variants: dict[str, dict] = {}  # name -> {"files": {target: path}, "seconds": s, "kept": {target: n}}
    only = set(filter(None, args.only.split(",")))
    t0 = time.perf_counter()
    from onnxruntime.quantization import QuantFormat, quantize_static

    if not only or "ort-defaults" in only:
        with quiet_onnxruntime():
            quantize_static(str(fp32), str(work / "ort-defaults.onnx"), ArrayReader(meta["input"], calib_x, 16), quant_format=QuantFormat.QDQ)
        variants["ort-defaults"] = {"files": {"cpu": work / "ort-defaults.onnx"}, "seconds": time.perf_counter() - t0, "kept": {"cpu": 0}}
    runs = [(f"tledge-{m}", dict(method=m, fallback_layers=0, bias_correction=False)) for m in args.methods.split(",")]
    runs += [(f"tledge-{m}+bc", dict(method=m, fallback_layers=0, bias_correction=True)) for m in filter(None, args.bc_methods.split(","))]
    checkpoint = args.build / "model.pt"
    qat = dict(checkpoint=checkpoint) if checkpoint.is_file() else {}  # as build: QAT when post-training misses the budget
    runs += [("tledge-budget", qat), ("tledge-minmax-budget", dict(method="minmax", **qat)),
             ("tledge-unpriced-budget", dict(fallback_max_slowdown=1.0, **qat)),
             ("tledge-nearest-budget", dict(weight_rounding=False, **qat))]
    runs = [r for r in runs if not only or r[0] in only]
    stats_file = None
    for name, options in runs:
        if stats_file is not None:
            (work / name).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(stats_file, work / name / STATS_FILE)
        t0 = time.perf_counter()
        record = quantize(QuantizeConfig(model=fp32, data=args.data, out_dir=work / name, calibration=calibration, **options))
        variants[name] = {
            "files": {"tensorrt": work / name / "model.int8.qdq.onnx", "cpu": work / name / "model.int8.cpu.onnx"},
            "seconds": time.perf_counter() - t0,
            "kept": {t: len(m["kept_float"]) for t, m in record["models"].items()},
            "methods": {t: m["calibration_method"] for t, m in record["models"].items()},
            "qat": {t: m["qat"]["chosen"] for t, m in record["models"].items() if "qat" in m},
        }
        stats_file = stats_file or work / name / STATS_FILE

    rows = []
    for name, v in variants.items():
        for target, path in v["files"].items():
            method = v.get("methods", {}).get(target, "ort minmax per-tensor")
            if target in v.get("qat", {}):
                method += " + QAT (shipped)" if v["qat"][target] else " (QAT tried, not better)"
            row = {"variant": name, "target": target, "method": method,
                   "layers_in_float": v["kept"][target], "quantize_s": round(v["seconds"], 1)}
            for split, (x, y) in sets.items():
                row[split] = drift(logits(path, x, True), refs[split], y)
            rows.append(row)
    cpu_files = {f"{r['variant']}": variants[r["variant"]]["files"]["cpu"] for r in rows if r["target"] == "cpu"}
    latency = p50_ms({"fp32": fp32, **cpu_files}, sets["val"][0][:1])
    latency_all = p50_ms({"fp32": fp32, **cpu_files}, sets["val"][0][:1], threads=None)
    for r in rows:
        if r["target"] == "cpu":
            r["speedup_b1"] = round(latency["fp32"] / latency[r["variant"]], 3)
            r["speedup_b1_all_cores"] = round(latency_all["fp32"] / latency_all[r["variant"]], 3)

    cpu = {**this_cpu(), "name": machine_info()["cpu"]}
    print(f"CPU: {cpu['name']} class {cpu['class']} flags {cpu['int8_flags']}; onnxruntime {machine_info()['versions']['onnxruntime']}; "
          f"val {len(sets['val'][0])} / test {len(sets.get('test', sets['val'])[0])} images, input {list(pre.input_shape)}; "
          f"FP32 top-1 " + ", ".join(f"{k} {np.mean(refs[k].argmax(1) == y):.4f}" for k, (_, y) in sets.items()))
    print("| variant | model | method | layers in float | val drop (pt) | val agreement | test top-1 | test drop (pt) | test agreement | CPU speed-up b1, 1 thread | all cores | quantize s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        test = r.get("test", r["val"])
        print(f"| {r['variant']} | {r['target']} | {r['method']} | {r['layers_in_float']} | {r['val']['drop_pp']:+.2f} | {r['val']['agreement']:.4f} | "
              f"{test['top1']:.4f} | {test['drop_pp']:+.2f} | {test['agreement']:.4f} | "
              f"{str(r['speedup_b1']) + 'x' if 'speedup_b1' in r else 'n/a'} | "
              f"{str(r['speedup_b1_all_cores']) + 'x' if 'speedup_b1_all_cores' in r else 'n/a'} | {r['quantize_s']} |")
    if args.out:
        args.out.write_text(json.dumps({"cpu": cpu, "versions": machine_info()["versions"], "rows": rows}, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
