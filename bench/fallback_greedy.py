"""A fallback priced by latency (an experiment for issue 6, not what tledge does yet): the CPU model's ranked layers
are added to the float set one at a time; a layer whose addition slows the model by more than ``--price`` (share of
its current speed-up over FP32, batch 1, one thread, interleaved) is left in INT8 and the next one is tried; the
search stops when the drift budget (counted and expected agreement >= 0.99, top-1 drop <= 0.3 pt) is met.

    python bench/fallback_greedy.py --build tledge-out --data ~/.cache/tledge/datasets/digits-v1

Decisions depend on timings, so a run on a busy machine skips other layers than one on an idle machine.
"""
import argparse
import json
import tempfile
from pathlib import Path
import onnx
from tledge.quantize import CpuInt8, _ArrayReader
from tledge.cpu_isa import resolve_cpu_target
from tledge.calib_stats import CalibrationStats
from tledge.bias_correction import correct_bias
from tledge.data import Preprocess, splits_for, load_array
from tledge.validate import onnx_metadata
from tledge.sensitivity import simulate, rank_layers
from tledge.drift_budget import drift_figures, _p50_interleaved
from tledge.runners import OrtRunner
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--price", type=float, default=0.15)
    args = ap.parse_args()
    build, data = args.build, args.data
    from tledge.machine import machine_info
    print(json.dumps(machine_info()), flush=True)
    model = build / "model.fp32.onnx"; fp32 = onnx.load(str(model)); meta = onnx_metadata(model, fp32)
    pre = Preprocess.from_dict(meta["preprocess"]); splits = splits_for(data, build, 0, meta.get("splits_sha256"))
    xv, yv = load_array(splits.val, pre); xt, yt = load_array(splits.test, pre)
    rv = OrtRunner(model).run_batches(xv); rt = OrtRunner(model).run_batches(xt)
    stats = CalibrationStats.load(build / "calibration.stats.npz")
    ct, reason = resolve_cpu_target("portable"); recipe = CpuInt8(ct, reason); recipe.prepare(fp32)
    work = Path(tempfile.mkdtemp()); reader = _ArrayReader(meta["input"], xv[:16], 16)
    def make(keep, tag):
        p = work / f"{tag}.onnx"
        recipe.quantize(model, p, reader, stats.ranges("minmax", False), tuple(keep))
        proto, _ = recipe.finish(onnx.load(str(p)), fp32, tuple(keep)); correct_bias(proto, fp32, stats.channel_mean)
        onnx.save(proto, str(p)); return proto, p
    def speed(p):
        sp = _p50_interleaved({"fp32": model, "int8": p}, xv[:1], rounds=7, per_round=30); return sp["fp32"] / sp["int8"]
    base, p0 = make((), "base")
    ranked = [r["node"] for r in rank_layers(base, fp32, xv[:32], rv[:32]) if r["gain"] > 0]
    keep, current = [], speed(p0)
    print("base speed", round(current, 2))
    for i, node in enumerate(ranked[:16]):
        proto, p = make(keep + [node], f"g{i}")
        s = speed(p)
        fv = drift_figures(simulate(proto, xv), rv, yv)
        met = fv["top1_drop_pp"] <= 0.3 and fv["agreement"] >= 0.99 and fv["expected_agreement"] >= 0.99
        verdict = "skip" if s < (1 - args.price) * current else "add"
        print(f"{node:40s} speed {s:.2f}x (was {current:.2f}) -> {verdict}; val agr {fv['agreement']:.4f} exp {fv['expected_agreement']:.4f} drop {fv['top1_drop_pp']:+.2f} met={met}", flush=True)
        if verdict == "add":
            keep.append(node); current = s
            if met:
                ft = drift_figures(simulate(proto, xt), rt, yt)
                print("MET with", keep, "test agr", ft["agreement"], "drop", ft["top1_drop_pp"]); break


if __name__ == "__main__":
    main()
