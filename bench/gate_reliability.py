"""How often the gate is wrong on this machine, side by side with the plain approach, in one run.

1. Make a variant of the model that does more of its own work (``tledge.bench.gate.slower_variant``: copies of its first
   layers whose result is multiplied by zero), sized by interleaved measurement to be about ``--slowdown`` slower,
   and report the slowdown it really has (measured again over many blocks).
2. ``--trials`` times each, with the gate's default settings (100 blocks of about 50 ms per model, 95% interval,
   5% tolerance), latency only: the model against itself (a failure is false) and the slower variant against the
   model (a failure is a catch).
3. The plain approach on the same pairs, each trial right after the gate's: time the baseline, then the candidate,
   as many calls each as the gate made, and fail when the ratio of medians exceeds the tolerance.

    python bench/gate_reliability.py --model tledge-out/model.int8.cpu.onnx --trials 20 --out bench/gate_reliability.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from tledge.bench.gate import GateConfig, gate
from tledge.bench.intervals import paired_ratio_interval
from tledge.bench.slower_variant import slower_variant
from tledge.export.onnx_io import read_metadata
from tledge.machine import machine_info
from tledge.runners.ort_runner import OrtRunner
from tledge.runners.timing import timed_blocks


def measured_ratio(base: Path, cand: Path, x: np.ndarray, blocks: int, threads: int | None) -> dict:
    runners = {"base": OrtRunner(base, threads=threads, spinning=False), "cand": OrtRunner(cand, threads=threads, spinning=False)}
    timed, _ = timed_blocks(runners, x, blocks, 0, 10)
    return paired_ratio_interval(timed["base"], timed["cand"])


def plain_ratio(base: Path, cand: Path, x: np.ndarray, calls: int, threads: int | None) -> float:
    """What a hand-written CI check does: one model's calls, then the other's, ratio of the medians."""
    medians = []
    for path in (base, cand):
        runner = OrtRunner(path, threads=threads)
        for _ in range(10):
            runner(x)
        times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            runner(x)
            times.append(time.perf_counter() - t0)
        medians.append(np.median(times))
    return float(medians[1] / medians[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--slowdown", type=float, default=1.10, help="the slower variant's target latency ratio")
    ap.add_argument("--tolerance", type=float, default=5.0, help="the gate's --max-latency-regression (percent)")
    ap.add_argument("--threads", type=int, default=GateConfig.threads, help="ONNX Runtime threads per model (default: the gate's, 1; 0: every core)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="tledge-gate-bench-"))
    shape = read_metadata(args.model)["preprocess"]
    x = np.random.default_rng(0).normal(0, 1, (1, 3, shape["size"], shape["size"])).astype(np.float32)
    # Size the extra work: latency grows about linearly in it; a few interleaved measurements fix the slope.
    slow = work / "slower.onnx"
    extra, sizing = args.slowdown - 1, []
    for _ in range(4):
        slower_variant(args.model, slow, extra)
        r = measured_ratio(args.model, slow, x, 60, args.threads)["ratio"]
        sizing.append({"extra_work": round(extra, 4), "ratio": round(r, 4)})
        if abs(r - args.slowdown) < 0.01:
            break
        extra = max(0.005, extra * (args.slowdown - 1) / max(r - 1, 1e-3))
    truth = measured_ratio(args.model, slow, x, 600, args.threads)

    trials = {"self": [], "slower": []}
    plain = {"self": [], "slower": []}
    t0 = time.perf_counter()
    for i in range(args.trials):
        for name, cand in (("self", args.model), ("slower", slow)):
            v = gate(GateConfig(candidate=cand, baseline=args.model, max_latency_regression_pct=args.tolerance, seed=i, threads=args.threads))
            c = v["checks"][0]
            trials[name].append({"ratio": round(c["ratio"], 4), "low": round(c["low"], 4), "high": round(c["high"], 4), "status": c["status"], "seconds": v["seconds"]})
            calls = v["timing"]["blocks"] * v["timing"]["calls_per_block"]
            plain[name].append(round(plain_ratio(args.model, cand, x, calls, args.threads), 4))
    seconds = time.perf_counter() - t0

    limit = 1 + args.tolerance / 100
    result = {
        "tledge_gate": {"false_failures": sum(t["status"] == "regression" for t in trials["self"]),
                        "caught": sum(t["status"] == "regression" for t in trials["slower"])},
        "plain": {"false_failures": sum(r > limit for r in plain["self"]), "caught": sum(r > limit for r in plain["slower"])},
    }
    info = machine_info()
    print(f"machine: {info['cpu']}, {info['usable_cpus']} cores, int8 class {info['cpu_class']} ({', '.join(info['cpu_int8_flags']) or 'no int8 flags'}); versions {json.dumps(info['versions'])}")
    print(f"model {args.model}; slower variant: {extra:.3f} more work, measured x{truth['ratio']:.3f} "
          f"(95% interval {truth['low']:.3f} .. {truth['high']:.3f}, 600 blocks); sizing {sizing}")
    print(f"gate: defaults (100 blocks, calls per block automatic), threads {args.threads or 'all cores'}, 95% interval, tolerance {args.tolerance:g}%; "
          f"{args.trials} trials each; {seconds:.0f} s in all\n")
    print("| approach | trial | runs | regressions declared | inconclusive | within | median ratio | ratio range / median interval width |")
    print("|---|---|---|---|---|---|---|---|")
    for name, label in (("self", "model vs itself"), ("slower", f"x{truth['ratio']:.3f} variant vs model")):
        ts = trials[name]
        print(f"| tledge gate | {label} | {len(ts)} | {sum(t['status'] == 'regression' for t in ts)} | {sum(t['status'] == 'inconclusive' for t in ts)} | "
              f"{sum(t['status'] == 'within' for t in ts)} | {np.median([t['ratio'] for t in ts]):.3f} | {np.median([t['high'] - t['low'] for t in ts]):.3f} |")
    for name, label in (("self", "model vs itself"), ("slower", f"x{truth['ratio']:.3f} variant vs model")):
        rs = plain[name]
        print(f"| plain (A then B, ratio of medians > {limit:g}) | {label} | {len(rs)} | {sum(r > limit for r in rs)} | - | {sum(r <= limit for r in rs)} | "
              f"{np.median(rs):.3f} | {min(rs):.3f} .. {max(rs):.3f} |")
    print(f"\ntledge gate: false failures {result['tledge_gate']['false_failures']}/{args.trials}, caught {result['tledge_gate']['caught']}/{args.trials}; "
          f"plain: false failures {result['plain']['false_failures']}/{args.trials}, caught {result['plain']['caught']}/{args.trials}")
    if args.out:
        args.out.write_text(json.dumps({"machine": info, "model": str(args.model), "threads": args.threads,
                                        "slower": {"extra_work": extra, "measured": truth, "sizing": sizing},
                                        "tolerance_pct": args.tolerance, "trials": trials, "plain_ratios": plain, **result}, indent=2) + "\n")


if __name__ == "__main__":
    main()
