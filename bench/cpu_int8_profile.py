"""Where a CPU INT8 model's time goes in ONNX Runtime, beside its FP32 model: kernel time by kind of layer.

ONNX Runtime rewrites a Q/DQ model at load time (Q/DQ pairs fused into QLinearConv, QLinearAdd, QGemm; NCHWc
or NHWC layouts with reorders and transposes at their edges). This benchmark loads each model as a user would,
profiles batch-1 runs on one thread (and on every core with ``--threads 0``), and sums kernel time per kind of
layer of the *optimized* graph: pointwise, depthwise and full convolutions, float convolutions left inside an
INT8 model, layout changes, and the quantize/dequantize nodes that were not fused. The table says which layers
INT8 speeds up on this CPU and which it does not, so a fix can target the graph rather than the timer.

    python bench/cpu_int8_profile.py tledge-out/model.fp32.onnx tledge-out/model.int8.cpu.onnx --out bench/cpu_int8_profile-digits.json

The first model is the reference for the ratios. Needs only onnx and onnxruntime.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import tempfile
from pathlib import Path

import numpy as np


def _cpu() -> dict:
    flags, name, family = set(), "", ""
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "flags" and not flags:
                flags = set(value.split())
            elif key == "model name" and not name:
                name = value.strip()
            elif key == "cpu family" and not family:
                family = value.strip()
    except OSError:
        pass
    int8 = sorted(f for f in flags if f in {"avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8"})
    return {"model_name": name, "family": family, "cores": os.cpu_count(), "int8_flags": int8}


def layer_kind(node, quantized_ops=frozenset({"QLinearConv", "QGemm", "QLinearMatMul", "MatMulInteger", "ConvInteger"})) -> str:
    """What a node of ONNX Runtime's optimized graph is, for the time table (float or int8 and which shape)."""
    op = node.op_type
    if op in ("Conv", "FusedConv", "QLinearConv"):
        attrs = {a.name: a for a in node.attribute}
        group = attrs["group"].i if "group" in attrs else 1
        kernel = list(attrs["kernel_shape"].ints) if "kernel_shape" in attrs else None
        shape = "depthwise" if group > 1 else ("pointwise" if kernel == [1, 1] else "full conv")
        return f"{shape} {'int8' if op in quantized_ops else 'float'}"
    if op in ("Gemm", "MatMul", "FusedGemm", "FusedMatMul"):
        return "gemm float"
    if op in quantized_ops:
        return "gemm int8"
    if op in ("ReorderInput", "ReorderOutput", "Transpose"):
        return "layout (reorder/transpose)"
    if op in ("QuantizeLinear", "DequantizeLinear"):
        return "unfused quantize/dequantize"
    return op


def profile(path: Path, threads: int, runs: int) -> dict:
    """Mean kernel time per kind of layer over ``runs`` batch-1 runs, and the optimized graph's node counts."""
    import onnx
    import onnxruntime as ort

    work = tempfile.mkdtemp(prefix="tledge-profile-")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.enable_profiling = True
    opts.profile_file_prefix = os.path.join(work, "profile")
    opts.optimized_model_filepath = os.path.join(work, "optimized.onnx")  # to name the kernels' nodes
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    inp = session.get_inputs()[0]
    x = np.random.default_rng(0).random([d if isinstance(d, int) else 1 for d in inp.shape], dtype=np.float32)
    warmup = 20
    for _ in range(warmup + runs):
        session.run(None, {inp.name: x})
    events = json.load(open(session.end_profiling(), encoding="utf-8"))
    optimized = onnx.load(opts.optimized_model_filepath)
    kind_of = {n.name: layer_kind(n) for n in optimized.graph.node}
    per_kind: dict[str, float] = collections.defaultdict(float)
    calls = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            node = e["name"][: -len("_kernel_time")]
            kind = kind_of.get(node, e.get("args", {}).get("op_name", "?"))
            per_kind[kind] += e["dur"]
            calls[kind] += 1
    seen_runs = warmup + runs  # the profiler records every run, warm-up included
    return {
        "kernel_ms": {k: round(v / seen_runs / 1000, 4) for k, v in sorted(per_kind.items(), key=lambda kv: -kv[1])},
        "nodes": {k: calls[k] // seen_runs for k in per_kind},
        "total_kernel_ms": round(sum(per_kind.values()) / seen_runs / 1000, 4),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", type=Path, help="ONNX models; the first is the reference (FP32)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (0: every core)")
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--out", type=Path, help="write the figures as JSON")
    args = parser.parse_args(argv)
    import onnxruntime as ort

    result = {"machine": {"cpu": _cpu(), "python": platform.python_version(), "onnxruntime": ort.__version__},
              "threads": args.threads or os.cpu_count(), "batch": 1, "runs": args.runs,
              "models": {str(p): profile(p, args.threads, args.runs) for p in args.models}}
    names = [str(p) for p in args.models]
    kinds = sorted({k for m in result["models"].values() for k in m["kernel_ms"]},
                   key=lambda k: -max(m["kernel_ms"].get(k, 0) for m in result["models"].values()))
    print(f"CPU {result['machine']['cpu']['model_name']} (family {result['machine']['cpu']['family']}), "
          f"int8 flags {result['machine']['cpu']['int8_flags']}, onnxruntime {ort.__version__}, "
          f"batch 1, {result['threads']} thread(s), kernel time per run (ms) and nodes")
    print(f"{'kind':30s}" + "".join(f"{Path(n).name[:26]:>28s}" for n in names))
    ref = result["models"][names[0]]
    for kind in kinds:
        cells = []
        for n in names:
            m = result["models"][n]
            cells.append(f"{m['kernel_ms'].get(kind, 0):10.3f} ({m['nodes'].get(kind, 0):3d})" if kind in m["kernel_ms"] else f"{'-':>16s}")
        print(f"{kind:30s}" + "".join(f"{c:>28s}" for c in cells))
    print(f"{'total':30s}" + "".join(f"{result['models'][n]['total_kernel_ms']:>22.3f}      " for n in names))
    print(f"{'speed-up vs ' + Path(names[0]).name:30s}" + "".join(
        f"{ref['total_kernel_ms'] / result['models'][n]['total_kernel_ms']:>21.2f}x      " for n in names))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
