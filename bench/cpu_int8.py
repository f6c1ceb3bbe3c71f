"""INT8 accuracy and speed on this CPU: TensorRT simulation vs this CPU's fused kernels, and CPU recipes side by side.

For one fine-tuned FP32 model (a `tledge build` folder) this re-quantizes with the build's calibration images and
measures, on the evaluation split:

* the TensorRT Q/DQ model: simulated (Q/DQ as float ops: what TensorRT computes) vs this CPU's fused kernels;
* CPU models: tledge `portable` (default), tledge `vnni` (full 8-bit weights), and ONNX Runtime's own
  `reduce_range` recipe (7-bit weights everywhere), each fused and simulated, every layer quantized (no fallback);
* batch-1 and batch-8 latency (p50 of interleaved rounds) and the speed-up over FP32 in the same run.

    python bench/cpu_int8.py --build tledge-out --data ~/.cache/tledge/datasets/digits-v1 --out bench/cpu_int8-digits.json
"""

from __future__ import annotations

import argparse
import json
import platform
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
from tledge.runners.ort_runner import OrtRunner
from tledge.runners.timing import interleaved_p50


def evaluate(path: Path, x: np.ndarray, simulate: bool) -> np.ndarray:
    return OrtRunner(path, simulate_int8=simulate).run_batches(x)


def latency_p50(paths: dict[str, Path], x: np.ndarray, batch: int, rounds: int = 5, per_round: int = 40) -> dict[str, float]:
    runners = {name: OrtRunner(p) for name, p in paths.items()}
    return interleaved_p50(runners, np.ascontiguousarray(x[:batch]), rounds=rounds, per_round=per_round, warmup=5)


def ort_reduce_range(fp32: Path, dst: Path, input_name: str, calib: np.ndarray) -> None:
    """ONNX Runtime's documented remedy for CPUs without VNNI: U8S8 with 7-bit weights everywhere."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    with quiet_onnxruntime():
        quantize_static(str(fp32), str(dst), ArrayReader(input_name, calib, 16), quant_format=QuantFormat.QDQ, per_channel=True,
                        reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", type=Path, required=True, help="a tledge build folder (model.fp32.onnx, calibration.json)")
    ap.add_argument("--data", type=Path, required=True, help="the dataset the build used")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args()

    fp32 = args.build / "model.fp32.onnx"
    meta = read_metadata(fp32)
    pre = Preprocess.from_dict(meta["preprocess"])
    splits = load_splits(args.data)
    x, y = load_array(splits.evaluation, pre)
    calibration = args.build / "calibration.json"
    work = Path(tempfile.mkdtemp(prefix="tledge-bench-cpu-int8-"))
    models: dict[str, Path] = {"fp32": fp32}
    quantize_seconds = {}
    for target in ("portable", "vnni"):
        t0 = time.perf_counter()
        # fallback_layers=0: the recipes bare, every layer quantized (bench/int8_budget.py measures the fallback)
        quantize(QuantizeConfig(model=fp32, data=args.data, out_dir=work / target, calibration=calibration, cpu_target=target,
                                targets=("tensorrt", "cpu") if target == "portable" else ("cpu",), fallback_layers=0))
        quantize_seconds[target] = round(time.perf_counter() - t0, 1)
        models[f"cpu-{target}"] = work / target / "model.int8.cpu.onnx"
    models["tensorrt-qdq"] = work / "portable" / "model.int8.qdq.onnx"
    calib_x, _ = load_array([s for s in splits.train if str(s.path.relative_to(splits.root)) in
                             {e["path"] for e in json.loads(calibration.read_text())["images"]}], pre)
    ort_reduce_range(fp32, work / "reduce_range.onnx", meta["input"], calib_x)
    models["cpu-ort-reduce-range"] = work / "reduce_range.onnx"

    ref = evaluate(fp32, x, simulate=False)
    rows = {}
    for name, path in models.items():
        fused = ref if name == "fp32" else evaluate(path, x, simulate=False)
        simulated = ref if name == "fp32" else evaluate(path, x, simulate=True)
        rows[name] = {
            "fused_top1": float(np.mean(fused.argmax(1) == y)),
            "simulated_top1": float(np.mean(simulated.argmax(1) == y)),
            "fused_agreement": float(np.mean(fused.argmax(1) == ref.argmax(1))),
            "simulated_agreement": float(np.mean(simulated.argmax(1) == ref.argmax(1))),
            "fused_vs_simulated": float(np.mean(fused.argmax(1) == simulated.argmax(1))),
        }
    timed = {k: v for k, v in models.items() if k != "tensorrt-qdq"}  # a GPU model's CPU latency means nothing
    for batch in (1, 8):
        p50 = latency_p50(timed, x, batch)
        for name, ms in p50.items():
            rows[name][f"p50_ms_b{batch}"] = round(ms, 3)
            rows[name][f"speedup_b{batch}"] = round(p50["fp32"] / ms, 3)

    portable = json.loads((work / "portable" / "quantize.json").read_text())["models"]["cpu"]
    result = {
        "build": str(args.build), "data": str(args.data), "images": len(x), "split": splits.evaluation_name,
        "input": [1, *pre.input_shape], "cpu": {**this_cpu(), "name": machine_info()["cpu"], "platform": platform.platform()},
        "versions": machine_info()["versions"], "quantize_seconds": quantize_seconds,
        "portable_narrowing": {k: v for k, v in portable["narrowing"].items() if k != "layers"}, "rows": rows,
    }
    print(f"CPU: {result['cpu']['name']} class {result['cpu']['class']} flags {result['cpu']['int8_flags']}; "
          f"onnxruntime {result['versions']['onnxruntime']}; {len(x)} {splits.evaluation_name} images, input {result['input']}")
    print(f"portable narrowing: {result['portable_narrowing']}")
    print("| variant | top-1 fused (this CPU) | top-1 simulated | agreement fused | agreement simulated | fused vs simulated | speed-up b1 | speed-up b8 |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        sp1 = f"{r['speedup_b1']:.2f}x" if "speedup_b1" in r else "n/a"
        sp8 = f"{r['speedup_b8']:.2f}x" if "speedup_b8" in r else "n/a"
        print(f"| {name} | {r['fused_top1']:.4f} | {r['simulated_top1']:.4f} | {r['fused_agreement']:.4f} | "
              f"{r['simulated_agreement']:.4f} | {r['fused_vs_simulated']:.4f} | {sp1} | {sp8} |")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
