"""Calibration cost: one streamed pass of N images through the FP32 model, then every method over its statistics.

Side by side in one run: tledge's calibrate-once statistics vs ONNX Runtime's own calibrators (which run the
model again for every method). Prints wall time and this process's peak RSS after each step, the machine and the
versions.

    python bench/calibration_speed.py --model runs/clothing/model.fp32.onnx --data ../shared/data/clothing-small --images 512
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

from tledge.cpu_isa import this_cpu
from tledge.data.images import Preprocess, Sample, load_array
from tledge.data.splits import load_splits
from tledge.export.onnx_io import read_metadata
from tledge.machine import machine_info
from tledge.quant.calibration import sample_calibration_set
from tledge.quant.statistics import METHODS, calibrate


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def ort_ranges(model: Path, input_name: str, x, method: str) -> None:
    """ONNX Runtime's calibrator for one method (2048 bins for the histogram methods), streamed in chunks of 32."""
    from onnxruntime.quantization import CalibrationMethod, create_calibrator

    from tledge.quant.recipes import ArrayReader, quiet_onnxruntime

    ort_method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}[method]
    extra = {"symmetric": True, **({"num_bins": 2048, "num_quantized_bins": 256} if method == "entropy" else {}),
             **({"num_bins": 2048, "percentile": 99.999} if method == "percentile" else {})}
    with tempfile.TemporaryDirectory() as tmp, quiet_onnxruntime():
        calibrator = create_calibrator(str(model), None, augmented_model_path=str(Path(tmp) / "a.onnx"), calibrate_method=ort_method, extra_options=extra)
        for start in range(0, len(x), 32):
            calibrator.collect_data(ArrayReader(input_name, x[start : start + 32], 8))
        calibrator.compute_data()
        del calibrator


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--ort-methods", default="minmax,percentile", help="ONNX Runtime calibrators to time for comparison ('' for none)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    meta = read_metadata(args.model)
    pre = Preprocess.from_dict(meta["preprocess"])
    calib = sample_calibration_set(load_splits(args.data), args.images, seed=0)
    t0 = time.perf_counter()
    x, _ = load_array([Sample(p, 0) for p in calib.paths], pre)
    rows = [{"step": f"decode {len(x)} images {list(x.shape[1:])}", "seconds": round(time.perf_counter() - t0, 1), "peak_rss_mb": round(peak_rss_mb())}]
    t0 = time.perf_counter()
    stats, _ = calibrate(args.model, x, {"bench": True})
    pass_s = time.perf_counter() - t0
    rows.append({"step": f"tledge: one pass, statistics of {len(stats.names)} tensors", "seconds": round(pass_s, 1), "peak_rss_mb": round(peak_rss_mb())})
    for method in METHODS:
        for symmetric in (True, False):
            t0 = time.perf_counter()
            stats.ranges(method, symmetric)
            s = time.perf_counter() - t0
            rows.append({"step": f"tledge: {method} ranges ({'int8 symmetric' if symmetric else 'uint8'}); pass + ranges",
                         "seconds": round(s, 2), "total_s": round(pass_s + s, 1), "peak_rss_mb": round(peak_rss_mb())})
    for method in filter(None, args.ort_methods.split(",")):
        t0 = time.perf_counter()
        ort_ranges(args.model, meta["input"], x, method)
        rows.append({"step": f"onnxruntime calibrator: {method} (its own pass)", "seconds": round(time.perf_counter() - t0, 1), "peak_rss_mb": round(peak_rss_mb())})

    info = machine_info()
    cpu = this_cpu()
    print(f"machine: {info['cpu']}, {info['usable_cpus']} cores, class {cpu['class']} {cpu['int8_flags']}; versions: {json.dumps(info['versions'])}")
    print(f"model {args.model} input {list(pre.input_shape)}; peak RSS is this process's high-water mark after each step\n")
    print("| step | seconds | pass + ranges (s) | peak RSS MB |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['step']} | {r['seconds']} | {r.get('total_s', '')} | {r['peak_rss_mb']} |")
    if args.out:
        args.out.write_text(json.dumps({"machine": info, "cpu": cpu, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
