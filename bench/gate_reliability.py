"""How often the gate is wrong on this machine: false failures against itself, misses against a truly slower model.

1. Make a variant of the model that does about 10% more work (``tledge.gate.slower_variant``: extra convolution
   channels whose result is multiplied by zero), sizing the extra work by a long interleaved measurement, and
   report the slowdown it really has (measured again over many blocks).
2. Run the gate ``--trials`` times model-against-itself and ``--trials`` times slower-variant-against-model, with
   the gate's default settings (100 blocks of about 50 ms each, 95% interval, 5% tolerance), latency only.

    python bench/gate_reliability.py --model tledge-out/model.int8.cpu.onnx --trials 20 --out bench/gate_reliability.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from tledge.export import read_metadata
from tledge.gate import GateConfig, _timed_blocks, gate, paired_ratio_interval, slower_variant
from tledge.machine import machine_info
from tledge.runners import OrtRunner


def measured_ratio(base: Path, cand: Path, x: np.ndarray, blocks: int, threads: int | None) -> dict:
    timed, _ = _timed_blocks({"base": OrtRunner(base, threads=threads), "cand": OrtRunner(cand, threads=threads)}, x, blocks, 0, 10)
    return paired_ratio_interval(timed["base"], timed["cand"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--slowdown", type=float, default=1.10, help="the slower variant's target latency ratio")
    ap.add_argument("--tolerance", type=float, default=5.0, help="the gate's --max-latency-regression (percent)")
    ap.add_argument("--threads", type=int, help="ONNX Runtime threads for both models (default: all cores)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="tledge-gate-bench-"))
    shape = read_metadata(args.model)["preprocess"]
    x = np.random.default_rng(0).normal(0, 1, (1, 3, shape["size"], shape["size"])).astype(np.float32)
    # Size the extra work: latency grows about linearly in the extra channels; two long measurements fix the slope.
    slow = work / "slower.onnx"
    channels, sizing = 16, []
    for _ in range(4):
        slower_variant(args.model, slow, channels)
        r = measured_ratio(args.model, slow, x, 60, args.threads)["ratio"]
        sizing.append({"channels": channels, "ratio": round(r, 4)})
        if abs(r - args.slowdown) < 0.01:
            break
        channels = max(1, int(round(channels * (args.slowdown - 1) / max(r - 1, 1e-3))))
    truth = measured_ratio(args.model, slow, x, 600, args.threads)

    trials = {"self": [], "slower": []}
    t0 = time.perf_counter()
    for i in range(args.trials):
        for name, cand in (("self", args.model), ("slower", slow)):
            v = gate(GateConfig(candidate=cand, baseline=args.model, max_latency_regression_pct=args.tolerance, seed=i, threads=args.threads))
            c = v["checks"][0]
            trials[name].append({"ratio": round(c["ratio"], 4), "low": round(c["low"], 4), "high": round(c["high"], 4), "status": c["status"], "seconds": v["seconds"]})
    seconds = time.perf_counter() - t0

    false_failures = sum(t["status"] == "regression" for t in trials["self"])
    caught = sum(t["status"] == "regression" for t in trials["slower"])
    info = machine_info()
    print(f"machine: {info['cpu']}, {info['usable_cpus']} cores; versions {json.dumps(info['versions'])}")
    print(f"model {args.model}; slower variant: {channels} extra channels, measured x{truth['ratio']:.3f} "
          f"(95% interval {truth['low']:.3f} .. {truth['high']:.3f}, 600 blocks); sizing {sizing}")
    print(f"gate: defaults (100 blocks, calls per block automatic), threads {args.threads or 'all'}, 95% interval, tolerance {args.tolerance:g}%; {args.trials} trials each; {seconds:.0f} s in all\n")
    print("| trial | runs | regressions declared | inconclusive | within | median ratio | median interval width |")
    print("|---|---|---|---|---|---|---|")
    for name, label in (("self", "model vs itself"), ("slower", f"x{truth['ratio']:.3f} variant vs model")):
        ts = trials[name]
        print(f"| {label} | {len(ts)} | {sum(t['status'] == 'regression' for t in ts)} | {sum(t['status'] == 'inconclusive' for t in ts)} | "
              f"{sum(t['status'] == 'within' for t in ts)} | {np.median([t['ratio'] for t in ts]):.3f} | {np.median([t['high'] - t['low'] for t in ts]):.3f} |")
    print(f"\nfalse failures: {false_failures}/{args.trials}; slower variant caught: {caught}/{args.trials}")
    if args.out:
        args.out.write_text(json.dumps({"machine": info, "model": str(args.model), "slower": {"extra_channels": channels, "measured": truth, "sizing": sizing},
                                        "tolerance_pct": args.tolerance, "trials": trials, "false_failures": false_failures, "caught": caught}, indent=2) + "\n")


if __name__ == "__main__":
    main()
