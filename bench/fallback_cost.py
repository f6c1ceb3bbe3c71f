"""What a float layer of the CPU model costs: the fallback's layers ranked by accuracy gain (what tledge does) and by
gain per multiply-accumulate, with 1 to 16 of them in float: validation and test agreement, and the batch-1
speed-up over FP32 at one thread (interleaved, this machine).

    python bench/fallback_cost.py --build tledge-out --data ~/.cache/tledge/datasets/digits-v1

Min-max ranges with bias correction, the portable CPU recipe, the build's calibration statistics. A layer's MACs
come from ONNX shape inference at batch 1 (a non-Conv node counts its output elements); a fixed cost per float
layer (the median node's MACs) keeps the per-MAC order from filling up with free layers.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
from _int8_build import load_build, portable_cpu_recipe


def node_macs(model_path: Path, fp32) -> dict[str, int]:
    """Forward MACs per node at batch 1, from ONNX shape inference (a node other than Conv/Gemm: its output elements)."""
    import onnx
    from onnx import numpy_helper, shape_inference

    one = onnx.load(str(model_path))
    one.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    inferred = shape_inference.infer_shapes(one)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in [*inferred.graph.value_info, *inferred.graph.output]}
    inits = {i.name: numpy_helper.to_array(i) for i in fp32.graph.initializer}
    macs = {}
    for node in fp32.graph.node:
        if not shapes.get(node.output[0]):
            continue
        elements = int(np.prod(shapes[node.output[0]]))
        if node.op_type == "Conv":
            macs[node.name] = elements * int(np.prod(inits[node.input[1]].shape[1:]))
        elif node.op_type == "Gemm":
            macs[node.name] = elements * inits[node.input[1]].shape[1]
        else:
            macs[node.name] = elements
    return macs


def main() -> None:
    from tledge.machine import machine_info
    from tledge.quant.drift_budget import drift_figures, onnx_p50_interleaved
    from tledge.quant.sensitivity import rank_layers, simulate

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    args = ap.parse_args()
    print(json.dumps(machine_info()), flush=True)
    b = load_build(args.build, args.data)
    recipe = portable_cpu_recipe(b.fp32)
    macs = node_macs(b.model, b.fp32)
    total = sum(macs.values())
    overhead = float(np.median(list(macs.values())))  # a fixed cost per float layer
    with tempfile.TemporaryDirectory() as tmp:
        base = b.make(recipe, Path(tmp) / "base.onnx")
        ranked = [r for r in rank_layers(base, b.fp32, b.val.x[:32], b.val.reference[:32]) if r["gain"] > 0]
        orders = {"gain": [r["node"] for r in ranked],
                  "gain_per_cost": [r["node"] for r in sorted(ranked, key=lambda r: -r["gain"] / (macs.get(r["node"], 0) + overhead))]}
        for name, order in orders.items():
            for k in (1, 2, 4, 8, 16):
                keep = order[:k]
                path = Path(tmp) / f"{name}{k}.onnx"
                proto = b.make(recipe, path, keep_float=keep)
                fv = drift_figures(simulate(proto, b.val.x), b.val.reference, b.val.y)
                ft = drift_figures(simulate(proto, b.test.x), b.test.reference, b.test.y)
                p50 = onnx_p50_interleaved({"fp32": b.model, "int8": path}, b.val.x[:1], rounds=5, per_round=20)
                print(f"{name:14s} k={k:2d} MACs in float {sum(macs.get(n, 0) for n in keep) / total:6.1%} val agr {fv['agreement']:.4f} "
                      f"exp {fv['expected_agreement']:.4f} drop {fv['top1_drop_pp']:+.2f} | test agr {ft['agreement']:.4f} drop {ft['top1_drop_pp']:+.2f} "
                      f"| speed-up 1t {p50['fp32'] / p50['int8']:.2f}x", flush=True)


if __name__ == "__main__":
    main()
