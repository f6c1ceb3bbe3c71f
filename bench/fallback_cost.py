"""What a float layer of the CPU model costs: the fallback's layers ranked by accuracy gain (what tledge does) and by
gain per multiply-accumulate, with 1 to 16 of them in float: validation and test agreement, and the batch-1
speed-up over FP32 at one thread (interleaved, this machine).

    python bench/fallback_cost.py --build tledge-out --data ~/.cache/tledge/datasets/digits-v1

Min-max ranges with bias correction, the portable CPU recipe, the build's calibration statistics. A layer's MACs
come from ONNX shape inference at batch 1 (a non-Conv node counts its output elements); a fixed cost per float
layer (the median node's MACs) keeps the per-MAC order from filling up with free layers.
"""
import argparse
import json, tempfile
from pathlib import Path
import numpy as np, onnx
from onnx import shape_inference, numpy_helper
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
    args = ap.parse_args()
    build, data = args.build, args.data
    from tledge.machine import machine_info
    print(json.dumps(machine_info()), flush=True)
    model = build / "model.fp32.onnx"
    fp32 = onnx.load(str(model)); meta = onnx_metadata(model, fp32)
    pre = Preprocess.from_dict(meta["preprocess"])
    splits = splits_for(data, build, 0, meta.get("splits_sha256"))
    xv, yv = load_array(splits.val, pre); xt, yt = load_array(splits.test, pre)
    rv = OrtRunner(model).run_batches(xv); rt = OrtRunner(model).run_batches(xt)
    stats = CalibrationStats.load(build / "calibration.stats.npz")
    ct, reason = resolve_cpu_target("portable"); recipe = CpuInt8(ct, reason); recipe.prepare(fp32)
    work = Path(tempfile.mkdtemp()); reader = _ArrayReader(meta["input"], xv[:16], 16)
    # MACs per node from inferred shapes (batch 1)
    m1 = onnx.load(str(model))
    for d in m1.graph.input[0].type.tensor_type.shape.dim[:1]: d.dim_value = 1
    inf = shape_inference.infer_shapes(m1)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in list(inf.graph.value_info) + list(inf.graph.output)}
    inits = {i.name: numpy_helper.to_array(i) for i in fp32.graph.initializer}
    macs = {}
    for n in fp32.graph.node:
        out = shapes.get(n.output[0])
        if not out: continue
        el = int(np.prod(out))
        if n.op_type == "Conv": w = inits[n.input[1]]; macs[n.name] = el * int(np.prod(w.shape[1:]))
        elif n.op_type == "Gemm": macs[n.name] = el * inits[n.input[1]].shape[1]
        else: macs[n.name] = el
    def make(keep, tag):
        p = work / f"{tag}.onnx"
        recipe.quantize(model, p, reader, stats.ranges("minmax", False), tuple(keep))
        proto, _ = recipe.finish(onnx.load(str(p)), fp32, tuple(keep)); correct_bias(proto, fp32, stats.channel_mean)
        onnx.save(proto, str(p)); return proto, p
    base, p0 = make((), "base")
    ranked = [r for r in rank_layers(base, fp32, xv[:32], rv[:32]) if r["gain"] > 0]
    total = sum(macs.values())
    overhead = float(np.median([m for m in macs.values()]))  # a fixed cost per float island
    orders = {"gain": [r["node"] for r in ranked],
              "gain_per_cost": [r["node"] for r in sorted(ranked, key=lambda r: -r["gain"] / (macs.get(r["node"], 0) + overhead))]}
    for name, order in orders.items():
        for k in (1, 2, 4, 8, 16):
            keep = order[:k]
            proto, p = make(keep, f"{name}{k}")
            fv = drift_figures(simulate(proto, xv), rv, yv); ft = drift_figures(simulate(proto, xt), rt, yt)
            sp = _p50_interleaved({"fp32": model, "int8": p}, xv[:1], rounds=5, per_round=20)
            print(f"{name:14s} k={k:2d} MACs in float {sum(macs.get(n,0) for n in keep)/total:6.1%} val agr {fv['agreement']:.4f} exp {fv['expected_agreement']:.4f} drop {fv['top1_drop_pp']:+.2f} | test agr {ft['agreement']:.4f} drop {ft['top1_drop_pp']:+.2f} | speed-up 1t {sp['fp32']/sp['int8']:.2f}x", flush=True)


if __name__ == "__main__":
    main()
