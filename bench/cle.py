"""Cross-layer equalization for INT8 (an experiment for issue 6, not what tledge does): does it cut the drift that
min-max and mse ranges leave on the default build, before any per-layer fallback?

EfficientNet-Lite's activations are ReLU6 (`Clip(0, 6)`) and its per-tensor activation ranges are set by the widest
channel, so a channel that never exceeds 0.1 gets a handful of the 255 levels. Between a convolution and the
convolution that reads its clipped output, channel ``c`` can be scaled by ``s_c`` (the first one's weights and bias
times ``s_c``, the second one's input weights over ``s_c``) without changing the function, as long as
``s_c * z`` never reaches the clip where ``z`` did not: with ``m_c`` the channel's largest value on the
calibration images and ``M`` the tensor's, ``s_c = (M / m_c) ** alpha`` keeps ``s_c * m_c <= M <= 6``, so the
scaled model equals FP32 on every calibration image (and differs only where a value exceeds the calibration
range, which the int8 range would clip anyway). ReLU6 is what usually stops CLE (Nagel et al. 2019 replace it by
ReLU, changing the model); this data-aware form keeps it. ``alpha = 1`` for a depthwise reader (its per-channel
weight scales absorb the division), ``--alpha`` (default 0.5) for a pointwise one (its weights for that channel
shrink, and they share one scale per output channel with the other inputs). Plain Conv -> Conv pairs (no
activation, one reader) are equalized by ``max |activation|`` the same way.

    python bench/cle.py --build tledge-out --data ~/.cache/tledge/datasets/digits-v1
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
from _int8_build import load_build, make_int8, portable_cpu_recipe


def pairs(model) -> list[tuple]:
    """(first conv, clip or None, reader conv, the tensor between them) for every equalizable pair."""
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    found = []
    for a in model.graph.node:
        if a.op_type != "Conv":
            continue
        nxt = consumers.get(a.output[0], [])
        if len(nxt) != 1:
            continue
        clip = nxt[0] if nxt[0].op_type == "Clip" else None
        tensor = clip.output[0] if clip else a.output[0]
        readers = consumers.get(tensor, [])
        if len(readers) == 1 and readers[0].op_type == "Conv" and tensor not in {o.name for o in model.graph.output}:
            found.append((a, clip, readers[0], tensor))
    return found


def channel_max(model_path: Path, tensors: list[str], x: np.ndarray) -> dict[str, np.ndarray]:
    """Per-channel max |value| of each tensor over ``x`` (a model with the tensors as extra outputs)."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(model_path))
    for t in tensors:
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(t))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    out = {t: None for t in tensors}
    for i in range(0, len(x), 32):
        values = session.run(tensors, {name: x[i:i + 32]})
        for t, v in zip(tensors, values):
            m = np.abs(v).max(axis=(0, 2, 3))
            out[t] = m if out[t] is None else np.maximum(out[t], m)
    return out


def equalize(model, maxima: dict, alpha: float, cap: float, headroom: float = 1.0) -> list[dict]:
    """Scale every pair in place; returns what was done per pair."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    done = []
    for a, clip, b, tensor in pairs(model):
        if a.input[1] not in inits or b.input[1] not in inits or len(a.input) < 3 or a.input[2] not in inits:
            continue
        m = maxima[tensor].astype(np.float64)
        top = m.max()
        if top <= 0:
            continue
        depthwise = any(att.name == "group" and att.i > 1 for att in b.attribute)
        power = 1.0 if depthwise else alpha
        s = np.where(m > top / cap, (top / np.maximum(m, 1e-12)) ** power, 1.0)
        if clip is not None:  # room above the calibration maximum before the clip binds: 6 / s_c >= headroom * m_c
            s = np.minimum(s, np.maximum(1.0, top / (headroom * np.maximum(m, 1e-12))))
        wa, ba = numpy_helper.to_array(inits[a.input[1]]).astype(np.float64), numpy_helper.to_array(inits[a.input[2]]).astype(np.float64)
        wb = numpy_helper.to_array(inits[b.input[1]]).astype(np.float64)
        wa *= s[:, None, None, None]
        ba *= s
        if depthwise:
            wb /= s[:, None, None, None]
        else:
            wb /= s[None, :, None, None]
        for name, array in ((a.input[1], wa), (a.input[2], ba), (b.input[1], wb)):
            inits[name].CopyFrom(numpy_helper.from_array(array.astype(np.float32), name))
        done.append({"first": a.name, "reader": b.name, "clip": bool(clip), "depthwise_reader": depthwise,
                     "max_scale": round(float(s.max()), 2), "median_scale": round(float(np.median(s)), 2)})
    return done


def main() -> None:
    import onnx

    from tledge.data.images import Preprocess, load_array
    from tledge.data.splits import load_splits
    from tledge.export.onnx_io import read_metadata
    from tledge.machine import machine_info
    from tledge.quant.drift_budget import drift_figures
    from tledge.quant.recipes import TensorRTQDQ
    from tledge.quant.sensitivity import simulate
    from tledge.quant.statistics import calibrate
    from tledge.runners.ort_runner import OrtRunner

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--cap", type=float, default=64.0, help="largest scale; channels below 1/cap of the tensor's max keep scale 1")
    ap.add_argument("--headroom", type=float, default=1.0, help="a clipped channel keeps room for values this many times its calibration maximum")
    ap.add_argument("--methods", default="minmax,mse")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    print(json.dumps(machine_info()), flush=True)
    b = load_build(args.build, args.data)
    meta = read_metadata(b.model)
    pre = Preprocess.from_dict(meta["preprocess"])
    splits = load_splits(args.data)
    calib_paths = {e["path"] for e in json.loads((args.build / "calibration.json").read_text())["images"]}
    calib_x, _ = load_array([s for s in splits.train if s.path.relative_to(splits.root).as_posix() in calib_paths], pre)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        found = pairs(b.fp32)
        maxima = channel_max(b.model, [t for *_, t in found], calib_x)
        scaled = onnx.load(str(b.model))
        done = equalize(scaled, maxima, args.alpha, args.cap, args.headroom)
        cle_path = tmp / "cle.fp32.onnx"
        onnx.save(scaled, str(cle_path))
        runner = OrtRunner(cle_path)
        fp32_error = {name: float(np.abs(runner.run_batches(split.x) - split.reference).max()) for name, split in (("val", b.val), ("test", b.test))}
        calib_error = float(np.abs(runner.run_batches(calib_x) - OrtRunner(b.model).run_batches(calib_x)).max())
        print(f"{len(done)} pairs equalized; FP32 max |logit change|: calibration {calib_error:.2e}, val {fp32_error['val']:.2e}, "
              f"test {fp32_error['test']:.2e}", flush=True)
        cle_stats, _ = calibrate(cle_path, calib_x, {"cle": True})
        variants = {"plain": (b.model, b.fp32, b.stats), "cle": (cle_path, scaled, cle_stats)}
        for target in ("tensorrt", "cpu"):
            for method in args.methods.split(","):
                for variant, (src, proto_src, stats) in variants.items():
                    # the portable CPU recipe's weight narrowing is per model
                    recipe = TensorRTQDQ() if target == "tensorrt" else portable_cpu_recipe(proto_src)
                    proto = make_int8(recipe, src, proto_src, stats, b.reader, tmp / f"{target}-{method}-{variant}.onnx", method)
                    row = {"target": target, "method": method, "variant": variant}
                    for name, split in (("val", b.val), ("test", b.test)):
                        row[name] = drift_figures(simulate(proto, split.x), split.reference, split.y)
                    rows.append(row)
                    v, t = row["val"], row["test"]
                    print(f"| {target} | {method} | {variant} | {v['top1_drop_pp']:+.2f} | {v['agreement']:.4f} | {v['expected_agreement']:.4f} | "
                          f"{t['top1_drop_pp']:+.2f} | {t['agreement']:.4f} | {t['expected_agreement']:.4f} |", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"machine": machine_info(), "alpha": args.alpha, "cap": args.cap, "headroom": args.headroom, "pairs": done,
                                        "fp32_max_logit_change": {"calibration": calib_error, **fp32_error}, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
