"""Compare INT8 calibration methods side by side on one FP32 model: accuracy drift and CPU latency.

Usage (after a build):
    python bench/calibration_methods.py --build tledge-out --data ~/.cache/tledge/datasets/digits-v1
    python bench/calibration_methods.py --build runs/clothing --data ../shared/data/clothing-small

Quantizes the build's model.fp32.onnx with each method on the same calibration images (the build's
calibration.json), then benchmarks FP32 and every INT8 variant in one run. Prints a Markdown table and the machine.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from tledge.bench.benchmark import BenchConfig, bench
from tledge.quant.quantize import CALIBRATION_METHODS, QuantizeConfig, quantize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build", type=Path, required=True, help="a tledge build folder")
    parser.add_argument("--data", type=Path, required=True, help="the dataset the build used")
    parser.add_argument("--methods", nargs="+", default=list(CALIBRATION_METHODS))
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--json", type=Path, help="also write the bench record here")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="tledge-calib-bench-"))
    models = {"fp32": args.build / "model.fp32.onnx"}
    seconds = {}
    for method in args.methods:
        out = work / method
        record = quantize(QuantizeConfig(model=models["fp32"], data=args.data, out_dir=out, calibration=args.build / "calibration.json", method=method))
        seconds[method] = record["seconds"]
        models[f"trt-qdq/{method}"] = out / "model.int8.qdq.onnx"
        models[f"cpu/{method}"] = out / "model.int8.cpu.onnx"
    result = bench(BenchConfig(models=models, data=args.data, out_dir=work, iterations=args.iterations))
    m = result["machine"]
    print(f"machine: {m['cpu']}, {m['usable_cpus']} cores, {m['os']}; versions: {json.dumps(m['versions'])}")
    print(f"evaluation: {result['evaluation']}; input {result['input_shape']}; calibration images: {args.build / 'calibration.json'}\n")
    print("| variant | top-1 | Δ top-1 (pp) | agreement with fp32 | mean abs logit diff | p50 ms | speed-up | quantize s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, v in result["variants"].items():
        method = name.split("/")[-1]
        print(f"| {name} | {v['top1']:.4f} | {v['top1_delta_pp']:+.2f} | {v['agreement']:.4f} | {v['mean_abs_logit_diff']:.4f} | "
              f"{v['latency_ms']['p50']:.2f} | {v['speedup_vs_reference_p50']:.2f}x | {seconds.get(method, '')} |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
