"""How well the drift budget's figures on validation predict the agreement with FP32 on held-out images.

For one `tledge build` folder, many INT8 models of its FP32 model (TensorRT Q/DQ and portable CPU; minmax,
percentile and mse; with and without bias correction; 0, 2 and 6 of the build's most sensitive layers in float),
each simulated on the validation and the test split. For every model: the counted agreement on validation, the
expected agreement on validation (:func:`tledge.quant.drift_budget.expected_agreement`) and the counted agreement on
test, which neither figure saw. A better predictor has the smaller mean absolute error against the test count.

    python bench/expected_agreement.py --build tledge-out --data ~/.cache/tledge/datasets/digits-v1 --out bench/expected_agreement-digits.json

The test count is itself a count of a few flips: its own binomial noise (printed) is the floor no predictor beats.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from _int8_build import load_build, portable_cpu_recipe


def main() -> None:
    from tledge.machine import machine_info
    from tledge.quant.drift_budget import expected_agreement
    from tledge.quant.recipes import TensorRTQDQ
    from tledge.quant.sensitivity import simulate

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    started = time.perf_counter()
    b = load_build(args.build, args.data)
    xv, ref_v, xt, ref_t = b.val.x, b.val.reference, b.test.x, b.test.reference
    record = json.loads((args.build / "quantize.json").read_text())

    def agreement(logits, reference):
        return float(np.mean(logits.argmax(1) == reference.argmax(1)))

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in (TensorRTQDQ(), portable_cpu_recipe(b.fp32)):
            ranked = [r["node"] for r in record["models"][recipe.target].get("fallback", {}).get("most_sensitive", [])]
            for method in ("minmax", "percentile", "mse"):
                for bias_correction in (True, False):
                    for k in (0, 2, 6) if bias_correction and method == "minmax" else (0,):
                        keep = tuple(ranked[:k])
                        if len(keep) < k:
                            continue
                        path = Path(tmp) / "model.onnx"
                        proto = b.make(recipe, path, method, keep, bias_correction)
                        lv, lt = simulate(proto, xv), simulate(proto, xt)
                        row = {"model": recipe.target, "method": method, "bias_correction": bias_correction, "float_layers": k,
                               "val_agreement": round(agreement(lv, ref_v), 5), "val_expected": round(expected_agreement(lv, ref_v), 5),
                               "test_agreement": round(agreement(lt, ref_t), 5), "test_expected": round(expected_agreement(lt, ref_t), 5)}
                        rows.append(row)
                        print(json.dumps(row), flush=True)
    test = np.array([r["test_agreement"] for r in rows])
    summary = {
        "models": len(rows), "val_images": len(xv), "test_images": len(xt),
        "val_count_vs_test_mae_pp": round(float(np.mean(np.abs([r["val_agreement"] for r in rows] - test))) * 100, 3),
        "val_count_bias_pp": round(float(np.mean([r["val_agreement"] for r in rows] - test)) * 100, 3),
        "val_expected_vs_test_mae_pp": round(float(np.mean(np.abs([r["val_expected"] for r in rows] - test))) * 100, 3),
        "val_expected_bias_pp": round(float(np.mean([r["val_expected"] for r in rows] - test)) * 100, 3),
        # the test count's own scatter around its expectation: sqrt(p (1 - p) / n), p the mean agreement
        "test_count_binomial_sd_pp": round(float(np.sqrt(test.mean() * (1 - test.mean()) / len(xt))) * 100, 3),
    }
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.write_text(json.dumps({"machine": machine_info(), "build": str(args.build), "data": str(args.data), "rows": rows,
                                        "summary": summary, "seconds": round(time.perf_counter() - started, 1)}, indent=2) + "\n")


if __name__ == "__main__":
    main()
