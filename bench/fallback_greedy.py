"""A fallback priced by latency (an experiment for issue 6, not what tledge does yet): the CPU model's ranked layers
are added to the float set one at a time; a layer whose addition slows the model by more than ``--price`` (share of
its current speed-up over FP32, batch 1, one thread, interleaved) is left in INT8 and the next one is tried; the
search stops when the drift budget (counted and expected agreement >= 0.99, top-1 drop <= 0.3 pt) is met.

    python bench/fallback_greedy.py --build tledge-out --data ~/.cache/tledge/datasets/digits-v1

Decisions depend on timings, so a run on a busy machine skips other layers than one on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from _int8_build import load_build, portable_cpu_recipe


def main() -> None:
    from tledge.drift_budget import _p50_interleaved, drift_figures
    from tledge.machine import machine_info
    from tledge.sensitivity import rank_layers, simulate

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--price", type=float, default=0.15)
    args = ap.parse_args()
    print(json.dumps(machine_info()), flush=True)
    b = load_build(args.build, args.data)
    recipe = portable_cpu_recipe(b.fp32)

    def speedup(path: Path) -> float:
        p50 = _p50_interleaved({"fp32": b.model, "int8": path}, b.val.x[:1], rounds=7, per_round=30)
        return p50["fp32"] / p50["int8"]

    with tempfile.TemporaryDirectory() as tmp:
        base = b.make(recipe, Path(tmp) / "base.onnx")
        ranked = [r["node"] for r in rank_layers(base, b.fp32, b.val.x[:32], b.val.reference[:32]) if r["gain"] > 0]
        keep, current = [], speedup(Path(tmp) / "base.onnx")
        print("base speed", round(current, 2))
        for i, node in enumerate(ranked[:16]):
            path = Path(tmp) / f"g{i}.onnx"
            proto = b.make(recipe, path, keep_float=[*keep, node])
            s = speedup(path)
            fv = drift_figures(simulate(proto, b.val.x), b.val.reference, b.val.y)
            met = fv["top1_drop_pp"] <= 0.3 and fv["agreement"] >= 0.99 and fv["expected_agreement"] >= 0.99
            verdict = "skip" if s < (1 - args.price) * current else "add"
            print(f"{node:40s} speed {s:.2f}x (was {current:.2f}) -> {verdict}; val agr {fv['agreement']:.4f} "
                  f"exp {fv['expected_agreement']:.4f} drop {fv['top1_drop_pp']:+.2f} met={met}", flush=True)
            if verdict == "skip":
                continue
            keep.append(node)
            current = s
            if met:
                ft = drift_figures(simulate(proto, b.test.x), b.test.reference, b.test.y)
                print("MET with", keep, "test agr", ft["agreement"], "drop", ft["top1_drop_pp"])
                break


if __name__ == "__main__":
    main()
