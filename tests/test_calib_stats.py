"""Calibrate once: streamed per-tensor statistics, every method a choice over them, reused across runs."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tledge.quant import statistics as calib_stats
from tledge.quant.statistics import BINS, STATS_FILE, CalibrationStats, _Collector, calibrate, calibration_key


def stats_of(*chunks: np.ndarray) -> CalibrationStats:
    """Statistics of one tensor fed in ``chunks``, as calibrate() streams them."""
    c = _Collector(channel_mean=False)
    for chunk in chunks:
        c.update(chunk.astype(np.float32))
    return CalibrationStats(["t"], np.array([c.lo]), np.array([c.hi]), np.array([c.bound]), c.hist[None])


def test_streaming_with_growing_ranges_keeps_exact_extremes_and_the_same_histogram():
    rng = np.random.default_rng(0)
    chunks = [rng.normal(0, s, 20000) for s in (0.1, 1.0, 7.0)]  # the range doubles several times
    streamed = stats_of(*chunks)
    everything = np.concatenate(chunks).astype(np.float32)
    assert streamed.lo[0] == everything.min() and streamed.hi[0] == everything.max()
    assert streamed.hist.sum() == everything.size
    # Binned directly over the streamed histogram's final range, the same data gives the same counts (values
    # within float rounding of a bin edge may land in the neighbouring bin).
    bound = streamed.bound[0]
    direct = np.histogram(everything, bins=BINS, range=(-bound, bound))[0]
    assert np.abs(direct - streamed.hist[0]).sum() <= 1e-3 * everything.size
    # The chunking changes nothing a method picks, beyond a bin or two
    once = stats_of(everything)
    for method in calib_stats.METHODS:
        a, b = streamed.ranges(method, True)["t"], once.ranges(method, True)["t"]
        assert b[1] == pytest.approx(a[1], abs=3 * 2 * bound / BINS + 1e-6), method


def test_methods_pick_what_they_promise_on_known_distributions():
    rng = np.random.default_rng(1)
    gaussian = np.concatenate([rng.normal(0, 1, 400_000), [40.0]])  # one outlier far out
    s = stats_of(gaussian)
    amax = {m: s.ranges(m, True)["t"][1] for m in calib_stats.METHODS}
    assert amax["minmax"] == pytest.approx(40.0)
    assert 3.5 < amax["percentile"] < 5.5  # 99.999% of |x| of a unit normal is about 4.4
    assert amax["mse"] < 0.5 * amax["minmax"]  # one outlier is not worth 10x coarser steps for everyone else
    assert amax["entropy"] < 20.0  # regression: ONNX Runtime's entropy defaults (128 bins for 128 levels) equal min-max
    for m in calib_stats.METHODS:
        lo, hi = s.ranges(m, True)["t"]
        assert lo == -hi

    uniform = stats_of(rng.uniform(-1, 1, 400_000))
    for m in ("minmax", "percentile", "mse"):
        assert uniform.ranges(m, True)["t"][1] == pytest.approx(1.0, abs=0.03), m
    # Without outliers, 8-bit steps are fine enough that MSE clips only the sparse tail of a Gaussian
    normal = stats_of(rng.normal(0, 1, 400_000))
    assert 3.0 < normal.ranges("mse", True)["t"][1] <= normal.ranges("minmax", True)["t"][1]

    # Asymmetric (uint8) ranges follow each side: a ReLU output keeps its zero and clips only its long tail.
    relu = stats_of(np.maximum(rng.normal(0, 1, 400_000), 0))
    lo, hi = relu.ranges("percentile", False)["t"]
    assert lo == 0.0 and 3.5 < hi < 5.5
    # Regression: the spike of exact zeros after a sparse ReLU6 once made entropy clip it to a quarter of its range
    sparse = np.minimum(2 * np.abs(rng.normal(0, 1, 400_000)), 6)
    sparse[rng.random(sparse.size) < 0.9] = 0
    assert stats_of(sparse).ranges("entropy", True)["t"][1] > 5.0
    lo, hi = stats_of(rng.uniform(-1, 3, 100_000)).ranges("minmax", False)["t"]
    assert lo == pytest.approx(-1, abs=1e-3) and hi == pytest.approx(3, abs=1e-3)


def test_an_unknown_method_and_non_finite_activations_are_clear_errors():
    from tledge.errors import TledgeError

    with pytest.raises(TledgeError, match="calibration method"):
        stats_of(np.ones(10)).ranges("kl", True)
    with pytest.raises(TledgeError, match="non-finite"):
        stats_of(np.array([1.0, np.nan]))


def _conv_relu6_model(path):
    w = np.random.default_rng(2).normal(0, 1, (4, 3, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["input", "w"], ["conv"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Clip", ["conv", "zero", "six"], ["act"], name="clip"),
             helper.make_node("GlobalAveragePool", ["act"], ["pool"], name="pool"),
             helper.make_node("Flatten", ["pool"], ["logits"], name="flatten")]
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array(0, np.float32), "zero"),
             numpy_helper.from_array(np.array(6, np.float32), "six")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return w


def test_calibrate_is_exact_on_a_real_graph_and_saved_for_reuse(tmp_path, monkeypatch):
    model = tmp_path / "m.onnx"
    w = _conv_relu6_model(model)
    x = np.random.default_rng(3).normal(0, 1, (10, 3, 8, 8)).astype(np.float32)
    monkeypatch.setattr(calib_stats, "CHUNK_BYTES", 1)  # one image at a time: the streaming path
    key = calibration_key(model, ["a", "b"])
    stats, reused = calibrate(model, x, key, tmp_path / STATS_FILE)
    assert not reused and (tmp_path / STATS_FILE).is_file()

    import torch

    conv = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w), padding=1).numpy()
    act = np.clip(conv, 0, 6)
    minmax = stats.ranges("minmax", symmetric=False)
    assert minmax["act"] == pytest.approx((act.min(), act.max()), abs=1e-5)
    assert minmax["input"] == (float(x.min()), float(x.max()))
    # The Conv output read only by its ReLU6 takes the ReLU6's range, and is not histogrammed twice
    assert minmax["conv"] == minmax["act"] and "conv" not in stats.names
    assert stats.channel_mean["input"] == pytest.approx(x.mean(axis=(0, 2, 3)), abs=1e-5)

    again, reused = calibrate(model, x[:2], key, tmp_path / STATS_FILE)  # same key: not run again
    assert reused and again.ranges("mse", True) == stats.ranges("mse", True)
    other, reused = calibrate(model, x[:2], calibration_key(model, ["a"]), tmp_path / STATS_FILE)
    assert not reused and other.key["images"] == 1
    (tmp_path / STATS_FILE).write_bytes(b"not an npz")  # a damaged file is recomputed, never trusted
    _, reused = calibrate(model, x, key, tmp_path / STATS_FILE)
    assert not reused and key.items() <= CalibrationStats.load(tmp_path / STATS_FILE).key.items()


def test_quantize_with_another_method_reuses_the_builds_statistics(tiny_pipeline, tiny_dataset, tmp_path):
    """A second quantize in the same folder picks a new method over the saved statistics, without a model pass."""
    import shutil

    from tledge.quant.quantize import QuantizeConfig, quantize

    shutil.copy(tiny_pipeline / STATS_FILE, tmp_path / STATS_FILE)
    built_with = json.loads((tiny_pipeline / "quantize.json").read_text())["models"]["tensorrt"]["calibration_method"]
    other = "percentile" if built_with == "mse" else "mse"
    record = quantize(QuantizeConfig(model=tiny_pipeline / "model.fp32.onnx", data=tiny_dataset, out_dir=tmp_path, method=other,
                                     calibration=tiny_pipeline / "calibration.json", targets=("tensorrt",), fallback_layers=0))
    assert record["calibration"]["statistics"] == {"path": STATS_FILE, "tensors": record["calibration"]["statistics"]["tensors"], "reused": True}
    assert read_scales(tmp_path / "model.int8.qdq.onnx") != read_scales(tiny_pipeline / "model.int8.qdq.onnx")
    assert json.loads((tmp_path / "quantize.json").read_text())["models"]["tensorrt"]["calibration_method"] == other


def read_scales(path) -> dict:
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    return {n.input[0]: float(numpy_helper.to_array(inits[n.input[1]])) for n in model.graph.node
            if n.op_type == "QuantizeLinear" and n.input[0] not in inits}
