"""tledge's INT8 models beside the peer tools' post-training quantization: one FP32 model, one calibration set, one split.

Rows (every one quantized here from the build's model.fp32.onnx with the build's calibration.json images, except
tledge's two models, which are the build's own files):

* fp32 on ONNX Runtime and on OpenVINO (the two speed-up baselines);
* tledge: the TensorRT Q/DQ model and the CPU model of the build, the CPU model also run by OpenVINO;
* ONNX Runtime `quantize_static` with its defaults (QDQ format; also QOperator format);
* NNCF `nncf.quantize` (ONNX in, default preset), run on OpenVINO's CPU runtime and on ONNX Runtime;
* NVIDIA ModelOpt `modelopt.onnx.quantization.quantize`, int8, calibration `max` and `entropy`.

Columns: val and test top-1 and top-1 agreement with FP32 (ONNX Runtime), each by *simulated* arithmetic (ONNX
Runtime with graph optimizations off: Q/DQ run as float ops, what TensorRT or an int32-accumulating CPU computes)
and by *this CPU's kernels* (ONNX Runtime fully optimized; OpenVINO's own kernels for the OpenVINO rows); weighted
layers (Conv/Gemm/MatMul) left in float; batch-1 p50 latency at 1 thread and at every core, timed round-robin
(every variant in every round); speed-up vs FP32 ONNX Runtime and vs FP32 OpenVINO at the same thread count.

The peers live in the benchmark's own venv, never in tledge's install (bench/peers-requirements.txt says why):

    python3 -m venv /work/peers-venv
    /work/peers-venv/bin/pip install -e '.[train,ort]' -r bench/peers-requirements.txt
    flock /tmp/tledge-cpu.lock /work/peers-venv/bin/python bench/peers.py --build /work/runs/digits \\
        --data ~/.cache/tledge/datasets/digits-v1 --out bench/peers-digits.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

from tledge.data.images import Preprocess, Sample, load_array
from tledge.data.splits import read_splits
from tledge.export.onnx_io import read_metadata
from tledge.machine import machine_info, package_version
from tledge.runners.openvino_runner import OpenVinoRunner
from tledge.runners.ort_runner import OrtRunner

# tledge: public names only, in this one block (the package layout is moving)
from tledge.runners.timing import interleaved_p50

WEIGHTED_OPS = {"Conv", "Gemm", "MatMul", "ConvTranspose"}
INTEGER_OPS = {"QLinearConv", "QLinearMatMul", "QGemm", "ConvInteger", "MatMulInteger"}  # QOperator format
SHAPE_OPS = {"Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity"}
PEER_PACKAGES = ("nncf", "openvino", "nvidia-modelopt", "onnxruntime", "onnx", "onnx-graphsurgeon", "onnxslim",
                 "polygraphy", "torch", "torchvision", "numpy", "tledge")
BUDGET = {"max_top1_drop_pp": 0.3, "min_agreement": 0.99}


# ---------------------------------------------------------------- the peers' quantizers

class ArrayReader:
    """ONNX Runtime's CalibrationDataReader protocol over an in-memory array, ``batch`` images a call."""

    def __init__(self, input_name: str, x: np.ndarray, batch: int = 16):
        self.input_name, self.x, self.batch, self.start = input_name, x, batch, 0

    def get_next(self):
        if self.start >= len(self.x):
            return None
        chunk = self.x[self.start : self.start + self.batch]
        self.start += self.batch
        return {self.input_name: chunk}

    def rewind(self):
        self.start = 0


def quantize_ort_defaults(fp32: Path, dst: Path, input_name: str, calib: np.ndarray, quant_format: str) -> dict:
    """`quantize_static` as a user calls it first: nothing but the calibration reader (and the format)."""
    from onnxruntime.quantization import QuantFormat, quantize_static

    fmt = {"QDQ": QuantFormat.QDQ, "QOperator": QuantFormat.QOperator}[quant_format]
    quantize_static(str(fp32), str(dst), ArrayReader(input_name, calib), quant_format=fmt)
    return {"call": f"quantize_static(model, out, reader, quant_format=QuantFormat.{quant_format})",
            "defaults": "U8 activations (asymmetric), S8 weights per-tensor, MinMax, no pre-processing"}


def quantize_nncf(fp32: Path, dst: Path, input_name: str, calib: np.ndarray) -> dict:
    """NNCF's post-training quantization on the ONNX model (ONNX backend), default preset and options."""
    import nncf
    import onnx

    # one image per item: NNCF's bias correction wants batch 1, and subset_size (300) then counts images
    dataset = nncf.Dataset([calib[i : i + 1] for i in range(len(calib))], lambda x: {input_name: x})
    quantized = nncf.quantize(onnx.load(str(fp32)), dataset, subset_size=len(calib))
    onnx.save(quantized, str(dst))
    return {"call": f"nncf.quantize(onnx_model, nncf.Dataset(images), subset_size={len(calib)})",
            "defaults": "preset PERFORMANCE (symmetric), target ANY, overflow_fix FIRST_LAYER, fast bias correction"}


def quantize_modelopt(fp32: Path, dst: Path, calib: np.ndarray, method: str) -> dict:
    """ModelOpt's ONNX PTQ, int8, calibrated on ONNX Runtime's CPU provider.

    high_precision_dtype fp32: its default fp16 casts every layer left unquantized (and the Q/DQ scales) to fp16,
    TensorRT's float precision; here the float layers stay fp32 like every other row, so the rows differ only in
    their INT8 choices."""
    import shutil

    from modelopt.onnx.quantization import quantize

    # ModelOpt writes intermediate files beside its input: give it a copy, not the build's file
    source = dst.with_name(f"{dst.stem}-input.onnx")
    shutil.copyfile(fp32, source)
    quantize(str(source), quantize_mode="int8", calibration_data=calib, calibration_method=method,
             calibration_eps=["cpu"], output_path=str(dst), high_precision_dtype="fp32", log_level="WARNING")
    return {"call": f"modelopt.onnx.quantization.quantize(model, quantize_mode='int8', calibration_data=images, "
                    f"calibration_method='{method}', calibration_eps=['cpu'], high_precision_dtype='fp32')"}


# ---------------------------------------------------------------- runners and measurements

def float_weighted_layers(path: Path) -> dict:
    """Weighted ops (Conv/Gemm/MatMul) whose activation or weight input does not come from a DequantizeLinear:
    they run in float. QOperator models' integer ops (QLinearConv, QGemm, ...) count as INT8 layers."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    producer = {o: n for n in graph.node for o in n.output}

    def dequantized(tensor: str) -> bool:
        # a DequantizeLinear, possibly behind ops that only move values (NNCF quantizes before a Flatten)
        node = producer.get(tensor)
        while node is not None and node.op_type in SHAPE_OPS:
            node = producer.get(node.input[0])
        return node is not None and node.op_type == "DequantizeLinear"

    weighted = [n for n in graph.node if n.op_type in WEIGHTED_OPS]
    floating = [n.name for n in weighted if not (dequantized(n.input[0]) and dequantized(n.input[1]))]
    integer = sum(n.op_type in INTEGER_OPS for n in graph.node)
    return {"float": len(floating), "weighted_layers": len(weighted) + integer, "names": floating}


def accuracy(logits: np.ndarray, labels: np.ndarray, ref_pred: np.ndarray) -> dict:
    pred = logits.argmax(1)
    return {"top1": round(float(np.mean(pred == labels)), 5), "agreement": round(float(np.mean(pred == ref_pred)), 5)}


def evaluate(make_runner, splits_x: dict, splits_y: dict, ref_pred: dict) -> dict:
    runner = make_runner()
    return {name: accuracy(runner.run_batches(x), splits_y[name], ref_pred[name]) for name, x in splits_x.items()}


def within_budget(row: dict, fp32_top1: float) -> bool:
    return (fp32_top1 - row["top1"]) * 100 <= BUDGET["max_top1_drop_pp"] + 1e-9 and row["agreement"] >= BUDGET["min_agreement"]


def time_variants(variants: dict, x1: np.ndarray, threads: int, rounds: int, per_round: int) -> dict[str, float]:
    """Batch-1 p50 ms of every variant at ``threads``, interleaved: each round times every variant in turn.
    ONNX Runtime's pools do not spin between calls, so one session does not keep cores busy during another's turn."""
    runners = {}
    for name, (engine, path) in variants.items():
        runners[name] = OpenVinoRunner(path, threads) if engine == "openvino" else OrtRunner(path, threads=threads, spinning=False)
    return interleaved_p50(runners, x1, rounds=rounds, per_round=per_round, warmup=10)


def machine_record() -> dict:
    info = machine_info()
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        family = next((line.split(":", 1)[1].strip() for line in f if line.startswith("cpu family")), None)
    return {"cpu": info["cpu"], "cpu_family": family, "cpu_class": info["cpu_class"], "cpu_int8_flags": info["cpu_int8_flags"],
            "cpus": info["usable_cpus"], "os": platform.platform(), "python": platform.python_version(),
            "versions": {name: package_version(name) for name in PEER_PACKAGES}}


# ---------------------------------------------------------------- the run

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", type=Path, required=True, help="a tledge build folder (model.fp32.onnx, the INT8 models, splits.json, calibration.json)")
    ap.add_argument("--data", type=Path, required=True, help="the dataset root the build used")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    ap.add_argument("--models-dir", type=Path, help="keep the peers' quantized models here (default: a temporary folder)")
    ap.add_argument("--rounds", type=int, default=10, help="latency rounds (every variant timed in each)")
    ap.add_argument("--per-round", type=int, default=30, help="timed batch-1 calls per variant per round")
    ap.add_argument("--passes", type=int, default=3, help="timing passes, each in new sessions (their mean is reported): "
                    "one session's placement on these VMs moved a ratio by up to 10%%")
    args = ap.parse_args()

    fp32 = args.build / "model.fp32.onnx"
    meta = read_metadata(fp32)
    pre = Preprocess.from_dict(meta["preprocess"])
    input_name = meta["input"]
    data = args.data.expanduser()
    splits = read_splits(args.build / "splits.json", data)
    calib_spec = json.loads((args.build / "calibration.json").read_text())
    calib, _ = load_array([Sample(data / e["path"], -1) for e in calib_spec["images"]], pre)
    xs, ys = {}, {}
    for name in ("val", "test"):
        xs[name], ys[name] = load_array(getattr(splits, name), pre)
    print(f"{len(calib)} calibration images, val {len(ys['val'])}, test {len(ys['test'])}, input {list(calib.shape[1:])}", flush=True)

    work = args.models_dir or Path(tempfile.mkdtemp(prefix="tledge-peers-"))
    work.mkdir(parents=True, exist_ok=True)
    # name -> (engine for the kernels column and latency, model file, tool)
    variants = {
        "fp32 (ORT)": ("onnxruntime", fp32, "fp32"),
        "fp32 (OpenVINO)": ("openvino", fp32, "fp32"),
        "tledge TensorRT Q/DQ": ("onnxruntime", args.build / "model.int8.qdq.onnx", "tledge"),
        "tledge CPU": ("onnxruntime", args.build / "model.int8.cpu.onnx", "tledge"),
        # the same file on OpenVINO's kernels: is ONNX Runtime's kernel set, not the model, what limits its speed?
        "tledge CPU (OpenVINO)": ("openvino", args.build / "model.int8.cpu.onnx", "tledge"),
    }
    quantizers = {
        "ORT defaults QDQ": ("onnxruntime", "ort-qdq.onnx", lambda dst: quantize_ort_defaults(fp32, dst, input_name, calib, "QDQ")),
        "ORT defaults QOperator": ("onnxruntime", "ort-qop.onnx", lambda dst: quantize_ort_defaults(fp32, dst, input_name, calib, "QOperator")),
        "NNCF (OpenVINO)": ("openvino", "nncf.onnx", lambda dst: quantize_nncf(fp32, dst, input_name, calib)),
        "ModelOpt int8 max": ("onnxruntime", "modelopt-max.onnx", lambda dst: quantize_modelopt(fp32, dst, calib, "max")),
        "ModelOpt int8 entropy": ("onnxruntime", "modelopt-entropy.onnx", lambda dst: quantize_modelopt(fp32, dst, calib, "entropy")),
    }
    quantization, failures = {}, {}
    tledge_record = json.loads((args.build / "quantize.json").read_text())
    quantization["tledge"] = {"seconds": tledge_record.get("seconds"), "note": "the build's quantize stage, both models, budget search included"}
    for name, (engine, filename, run) in quantizers.items():
        dst = work / filename
        t0 = time.perf_counter()
        try:
            how = run(dst)
        except Exception as exc:  # a peer that cannot run here is reported, not fatal
            failures[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=6)}
            print(f"{name}: FAILED {type(exc).__name__}: {exc}", flush=True)
            continue
        quantization[name] = {**how, "seconds": round(time.perf_counter() - t0, 1)}
        print(f"{name}: quantized in {quantization[name]['seconds']} s", flush=True)
        variants[name] = (engine, dst, name.split()[0])
        if name == "NNCF (OpenVINO)":
            variants["NNCF (ORT)"] = ("onnxruntime", dst, "NNCF")

    ref = {name: OrtRunner(fp32).run_batches(x) for name, x in xs.items()}
    ref_pred = {name: r.argmax(1) for name, r in ref.items()}
    fp32_top1 = {name: float(np.mean(ref_pred[name] == ys[name])) for name in xs}
    rows = {}
    for name, (engine, path, tool) in variants.items():
        row = {"tool": tool, "engine": engine, "model": str(path), "layers": float_weighted_layers(path)}
        row["simulated"] = evaluate(lambda: OrtRunner(path, simulate_int8=True), xs, ys, ref_pred)
        kernels = (lambda: OpenVinoRunner(path)) if engine == "openvino" else (lambda: OrtRunner(path))
        row["kernels"] = evaluate(kernels, xs, ys, ref_pred)
        row["val_budget_met"] = {how: within_budget(row[how]["val"], fp32_top1["val"]) for how in ("simulated", "kernels")}
        rows[name] = row
        print(f"{name}: simulated {row['simulated']}, kernels {row['kernels']}", flush=True)

    x1 = np.ascontiguousarray(xs["test"][:1])
    thread_counts = sorted({1, os.cpu_count() or 1})
    timed = {name: (engine, path) for name, (engine, path, _) in variants.items()}
    for threads in thread_counts:
        passes = [time_variants(timed, x1, threads, args.rounds, args.per_round) for _ in range(args.passes)]
        p50 = {name: float(np.mean([p[name] for p in passes])) for name in timed}
        for name, ms in p50.items():
            rows[name].setdefault("latency", {})[f"{threads}t"] = {
                "p50_ms": round(ms, 3), "vs_fp32_ort": round(p50["fp32 (ORT)"] / ms, 3), "vs_fp32_openvino": round(p50["fp32 (OpenVINO)"] / ms, 3),
                "p50_ms_passes": [round(p[name], 3) for p in passes],
                "vs_fp32_ort_passes": [round(p["fp32 (ORT)"] / p[name], 3) for p in passes]}
        print(f"latency at {threads} thread(s) done", flush=True)

    result = {
        "build": str(args.build), "data": str(data), "input": [1, *pre.input_shape], "machine": machine_record(),
        "calibration": {"images": len(calib), "definition": calib_spec.get("sampling", {}).get("definition"), "split": "train"},
        "splits": {name: len(y) for name, y in ys.items()}, "fp32_top1": fp32_top1, "budget": BUDGET,
        "latency_method": f"batch 1, p50 of {args.rounds} interleaved rounds x {args.per_round} calls per variant, after 10 warm-up calls, "
                          f"mean of {args.passes} passes in new sessions; "
                          "ORT intra_op threads = N, inter_op 1, no spinning; OpenVINO INFERENCE_NUM_THREADS = N, 1 stream, LATENCY hint, f32 precision hint",
        "quantization": quantization, "failures": failures, "rows": rows,
    }
    print_table(result, thread_counts)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


def print_table(result: dict, thread_counts: list[int]) -> None:
    m = result["machine"]
    print(f"\nCPU: {m['cpu']} (family {m['cpu_family']}), int8 class {m['cpu_class']}, int8 flags {m['cpu_int8_flags'] or 'none'}, {m['cpus']} cores")
    print(f"FP32 top-1: val {result['fp32_top1']['val']:.4f}, test {result['fp32_top1']['test']:.4f}")
    lat = " | ".join(f"p50 {t}t ms | x ORT {t}t | x OV {t}t" for t in thread_counts)
    print(f"| variant | float layers | val top-1 sim / kern | val agree sim / kern | test top-1 sim / kern | test agree sim / kern | {lat} |")
    print("|---" * (6 + 3 * len(thread_counts)) + "|")
    for name, r in result["rows"].items():
        s, k = r["simulated"], r["kernels"]
        cells = [name, f"{r['layers']['float']} / {r['layers']['weighted_layers']}"]
        for split in ("val", "test"):
            cells += [f"{s[split]['top1']:.4f} / {k[split]['top1']:.4f}", f"{s[split]['agreement']:.4f} / {k[split]['agreement']:.4f}"]
        for t in thread_counts:
            l = r["latency"][f"{t}t"]
            cells += [f"{l['p50_ms']:.2f}", f"{l['vs_fp32_ort']:.2f}x", f"{l['vs_fp32_openvino']:.2f}x"]
        print("| " + " | ".join(cells) + " |")
    for name, f in result["failures"].items():
        print(f"{name}: not measured: {f['error']}")


if __name__ == "__main__":
    main()
