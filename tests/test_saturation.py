"""Int16 saturation of x86 int8 kernels without VNNI: the pair analysis, the real kernels, and the CPU targets.

The kernel tests run ONNX Runtime's fused int8 kernels on weights built to overflow, with activations at the top
of their range, against the same model's simulated arithmetic. On a CPU without VNNI they show the saturation
(and would notice a change of the pair layout in a later onnxruntime); on every CPU the pair-safe weights must
give the simulated answer.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from tledge import cpu_isa
from tledge.cpu_isa import classify, resolve_cpu_target, this_cpu
from tledge.errors import TledgeError
from tledge.quant.checks import compare_fused_with_simulation, fused_matches_simulation
from tledge.quant.cpu_weights import check_int16_saturation
from tledge.quant.quantize import QuantizeConfig, quantize
from tledge.quant.saturation import (
    INT8_MAX,
    PAIR_LIMIT,
    from_gemm_rows,
    gemm_rows,
    pair_safe_scales,
    quantize_pair_safe,
    saturating_channels,
    saturating_pairs,
)

SATURATING_CPU = this_cpu()["class"] in (cpu_isa.X86_AVX2, cpu_isa.X86_AVX512)


# --- the pair analysis ------------------------------------------------------------------------------------------


def test_only_same_sign_pairs_over_the_limit_saturate():
    q = np.array([[64, 64, 64, 65, -64, -65, 127, -127, 127, 1, 127, 2, -127, -2, 0, 0]])
    assert saturating_pairs(q).tolist() == [[False, True, True, False, False, True, True, False]]
    assert 255 * PAIR_LIMIT <= 32767 < 255 * (PAIR_LIMIT + 1)


def test_an_odd_k_pairs_its_last_weight_with_padding():
    assert not saturating_pairs(np.array([[1, 2, 127]])).any()
    assert saturating_pairs(np.array([[100, 100, 127]])).tolist() == [[True, False]]


def test_conv_rows_are_tap_major_channel_minor_and_invert():
    w = np.arange(2 * 3 * 2 * 2).reshape(2, 3, 2, 2).astype(np.float32)  # (Cout, Cin, kh, kw)
    rows = gemm_rows("Conv", w)
    # K index = tap * Cin + c: the first pair is channels 0 and 1 at tap (0, 0)
    assert rows[0, :3].tolist() == [w[0, 0, 0, 0], w[0, 1, 0, 0], w[0, 2, 0, 0]]
    assert rows[0, 3] == w[0, 0, 0, 1]
    np.testing.assert_array_equal(from_gemm_rows("Conv", rows, w.shape), w)
    gemm = np.arange(12).reshape(3, 4).astype(np.float32)
    np.testing.assert_array_equal(from_gemm_rows("Gemm", gemm_rows("Gemm", gemm, trans_b=True), gemm.shape, True), gemm)
    np.testing.assert_array_equal(from_gemm_rows("Gemm", gemm_rows("Gemm", gemm), gemm.shape), gemm)
    assert gemm_rows("Conv", np.zeros((8, 1, 3, 3)), group=8) is None, "depthwise kernels have no int16 step"


def test_pair_safe_weights_never_saturate_and_beat_reduce_range():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 96)) * rng.uniform(0.1, 2.0, (64, 1))
    w[:8, :2] = [3.0, 2.9]  # a large same-sign pair in the first channels
    full = np.rint(w / (np.abs(w).max(1, keepdims=True) / INT8_MAX))
    assert saturating_channels(full).sum() > 8
    scales, levels = pair_safe_scales(w)
    q = quantize_pair_safe(w, scales.astype(np.float64))
    assert q.dtype == np.int8 and np.abs(q).max() <= INT8_MAX
    assert not saturating_pairs(q).any()
    assert (levels[~saturating_channels(full)] == INT8_MAX).all(), "channels that cannot saturate keep 8 bits"
    # never worse than onnxruntime's reduce_range (int8 weights in [-64, 64]) in any channel, better on average
    err = ((q * scales[:, None] - w) ** 2).sum(1)
    s7 = np.abs(w).max(1) / 64
    err7 = ((np.rint(w / s7[:, None]) * s7[:, None] - w) ** 2).sum(1)
    assert (err <= err7 * 1.0001).all() and err.sum() < 0.6 * err7.sum()


# --- the real kernels -------------------------------------------------------------------------------------------


def _u8s8_conv(weight_int8: np.ndarray, out_scale: float = 2.0, out_zero: int = 0) -> onnx.ModelProto:
    """Q(uint8) -> DQ -> Conv(int8 per-channel weights, scale 1) -> Q(uint8) -> DQ, input scale 1/255.

    An input of 1.0 quantizes to 255, the top of the activation range.
    """
    cout = weight_int8.shape[0]
    inits = [
        numpy_helper.from_array(np.array(1 / 255, np.float32), "xs"), numpy_helper.from_array(np.array(0, np.uint8), "xz"),
        numpy_helper.from_array(weight_int8.astype(np.int8), "Wq"), numpy_helper.from_array(np.ones(cout, np.float32), "ws"),
        numpy_helper.from_array(np.zeros(cout, np.int8), "wz"),
        numpy_helper.from_array(np.array(out_scale, np.float32), "ys"), numpy_helper.from_array(np.array(out_zero, np.uint8), "yz"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["X", "xs", "xz"], ["Xq"]), helper.make_node("DequantizeLinear", ["Xq", "xs", "xz"], ["Xd"]),
        helper.make_node("DequantizeLinear", ["Wq", "ws", "wz"], ["Wd"], axis=0),
        helper.make_node("Conv", ["Xd", "Wd"], ["Y"], name="conv"),
        helper.make_node("QuantizeLinear", ["Y", "ys", "yz"], ["Yq"]), helper.make_node("DequantizeLinear", ["Yq", "ys", "yz"], ["Z"]),
    ]
    shape = [1, weight_int8.shape[1], 4, 4]
    graph = helper.make_graph(nodes, "u8s8", [helper.make_tensor_value_info("X", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("Z", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _fused_and_simulated(model: onnx.ModelProto) -> tuple[np.ndarray, np.ndarray]:
    x = np.ones([1, model.graph.input[0].type.tensor_type.shape.dim[1].dim_value, 4, 4], np.float32)
    out = []
    for level in (ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.GraphOptimizationLevel.ORT_DISABLE_ALL):
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        out.append(ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, {"X": x})[0])
    return out[0], out[1]


def _weights_with(positions: list[tuple[int, int]], value: int = 127, cin: int = 8) -> np.ndarray:
    w = np.zeros((16, cin, 1, 1), np.int8)
    for c, v in positions:
        w[0, c, 0, 0] = v if v else value
    return w


def test_weights_that_cannot_saturate_compute_exactly_on_this_cpu():
    # not a pair (channels 0 and 2), opposite signs, exactly at the limit: exact on every CPU
    for positions in ([(0, 0), (2, 0)], [(0, 127), (1, -127)], [(0, 64), (1, 64)], [(0, 127), (1, 1)]):
        fused, simulated = _fused_and_simulated(_u8s8_conv(_weights_with(positions)))
        np.testing.assert_array_equal(fused, simulated, err_msg=str(positions))


def test_a_saturating_pair_is_what_the_analysis_says_it_is():
    w = _weights_with([(0, 0), (1, 0)])  # channels 0 and 1 at one tap: one int16 pair, 255 * 254 > 32767
    assert saturating_channels(gemm_rows("Conv", w)).tolist()[0]
    fused, simulated = _fused_and_simulated(_u8s8_conv(w))
    assert simulated[0, 0, 0, 0] == 254.0  # 255/255 * (127 + 127)
    if SATURATING_CPU:
        assert fused[0, 0, 0, 0] == 128.0, "int16 saturation: 32767 / 255 = 128.5, rounded to the output step"
    else:
        np.testing.assert_array_equal(fused, simulated)


def test_pair_safe_weights_compute_exactly_where_full_ones_saturate():
    rng = np.random.default_rng(1)
    w = rng.uniform(0.5, 1.0, (16, 32, 3, 3)) * rng.choice([-1, 1], (16, 1, 1, 1))  # every pair large and same-sign
    rows = gemm_rows("Conv", w)
    full = from_gemm_rows("Conv", np.rint(rows / (np.abs(rows).max(1, keepdims=True) / INT8_MAX)), w.shape)
    scales, _ = pair_safe_scales(rows)
    safe = from_gemm_rows("Conv", quantize_pair_safe(rows, scales.astype(np.float64)), w.shape)
    # sums reach +-36000: an output step of 300 around zero point 128 keeps them in range
    fused_full, simulated_full = _fused_and_simulated(_u8s8_conv(full, 300.0, 128))
    fused_safe, simulated_safe = _fused_and_simulated(_u8s8_conv(safe, 300.0, 128))
    assert np.abs(simulated_safe).max() > 10000
    np.testing.assert_array_equal(fused_safe, simulated_safe)
    if SATURATING_CPU:
        assert np.abs(fused_full - simulated_full).max() >= 3000, "144 saturated pairs lose about 125 each"


# --- quantize() with a CPU target -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saturating_fp32(tmp_path_factory):
    """An FP32 model whose second convolution has large same-sign neighbouring weights and reads ReLU6 outputs
    that reach 6 (uint8 255): the worst case for int16 pairs."""
    from tledge.export.onnx_io import set_metadata
    from tledge.models import get_spec

    rng = np.random.default_rng(3)
    w1 = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    b1 = np.full(8, 3.0, np.float32)
    # Each output channel: input pairs (+1, +1) and (-1, -0.3). Both saturate, the positive ones far more, so a
    # saturating kernel moves the output by about as much as its true value.
    pattern = np.array([1.0, 1.0, -1.0, -0.3, 1.0, 1.0, -1.0, -0.3], np.float32)
    w2 = (pattern[None, :] * rng.uniform(0.6, 1.0, (8, 1))).reshape(8, 8, 1, 1).astype(np.float32)
    wg = rng.standard_normal((3, 8)).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (np.zeros(8, np.float32), "b2"),
                                                      (wg, "wg"), (np.zeros(3, np.float32), "bg"),
                                                      (np.array(0, np.float32), "lo"), (np.array(6, np.float32), "hi"))]
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Clip", ["c1", "lo", "hi"], ["r1"], name="relu6_1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2"),
        helper.make_node("GlobalAveragePool", ["c2"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wg", "bg"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(nodes, "saturating", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 32, 32])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    set_metadata(model, {"arch": "hand-made", "classes": ["circle", "square", "stripes"], "input": "input", "output": "logits",
                         "preprocess": get_spec("test_efficientnet_lite").preprocess.to_dict(), "precision": "fp32", "max_batch": 64})
    path = tmp_path_factory.mktemp("saturating") / "model.fp32.onnx"
    onnx.save(model, str(path))
    return path


def test_portable_target_narrows_exactly_the_layers_that_can_saturate(saturating_fp32, tiny_dataset, tmp_path):
    record = quantize(QuantizeConfig(model=saturating_fp32, data=tiny_dataset, out_dir=tmp_path, num_images=24, targets=("cpu",)))
    info = record["models"]["cpu"]
    assert info["cpu_target"]["name"] == "portable"
    assert "conv2" in info["narrowing"]["layers"], "the layer built to saturate is found"
    assert info["narrowing"]["layers_checked"] == 3
    model = onnx.load(str(tmp_path / "model.int8.cpu.onnx"))
    assert check_int16_saturation(model) == []
    check = compare_fused_with_simulation(tmp_path / "model.int8.cpu.onnx", _images(tiny_dataset))
    assert fused_matches_simulation(check), check
    assert info["validation"]["inside_target"] is True and info["validation"]["top1_agreement"] >= 0.9


def test_vnni_target_keeps_full_weights_and_is_refused_nowhere_but_judged_outside(saturating_fp32, tiny_dataset, tmp_path):
    record = quantize(QuantizeConfig(model=saturating_fp32, data=tiny_dataset, out_dir=tmp_path, num_images=24,
                                     targets=("cpu",), cpu_target="vnni"))
    info = record["models"]["cpu"]
    assert "narrowing" not in info and info["cpu_target"]["name"] == "vnni"
    problems = check_int16_saturation(onnx.load(str(tmp_path / "model.int8.cpu.onnx")))
    assert any(p.startswith("conv2:") for p in problems)
    assert info["validation"]["inside_target"] is (this_cpu()["class"] in cpu_isa.INT32_ACCUMULATING)
    check = compare_fused_with_simulation(tmp_path / "model.int8.cpu.onnx", _images(tiny_dataset))
    assert fused_matches_simulation(check) is not SATURATING_CPU, check


def _images(data):
    from tledge.data.images import load_array
    from tledge.data.splits import load_splits
    from tledge.models import get_spec

    return load_array(load_splits(data).train, get_spec("test_efficientnet_lite").preprocess)[0]


def test_bench_warns_when_this_cpu_is_outside_the_models_target(saturating_fp32, tiny_dataset, tmp_path, monkeypatch):
    from tledge.bench.benchmark import BenchConfig, bench

    quantize(QuantizeConfig(model=saturating_fp32, data=tiny_dataset, out_dir=tmp_path, num_images=24, targets=("cpu",), cpu_target="vnni"))
    models = {"fp32": saturating_fp32, "int8-cpu": tmp_path / "model.int8.cpu.onnx"}
    fast = dict(iterations=2, rounds=1, warmup=0, throughput_batch=2)
    for cpu_class, warned in ((cpu_isa.X86_AVX2, True), (cpu_isa.X86_VNNI, False), (cpu_isa.ARM_DOTPROD, False)):
        monkeypatch.setattr(cpu_isa, "this_cpu", lambda c=cpu_class: {"class": c, "machine": "test", "int8_flags": []})
        record = bench(BenchConfig(models=models, data=tiny_dataset, out_dir=tmp_path / cpu_class, **fast))
        v = record["variants"]["int8-cpu"]
        assert v["cpu_target"] == {"name": "vnni", "this_cpu": cpu_class, "inside_target": not warned, "valid_on": sorted(cpu_isa.INT32_ACCUMULATING)}
        outside = [w for w in record["warnings"] if "OUTSIDE THE MODEL'S CPU TARGET" in w]
        assert bool(outside) is warned, record["warnings"]
        assert json.loads((tmp_path / cpu_class / "bench.json").read_text())["warnings"] == record["warnings"]


# --- CPU classes and targets ------------------------------------------------------------------------------------


@pytest.mark.parametrize("machine, flags, expected", [
    ("x86_64", {"avx2", "fma"}, cpu_isa.X86_AVX2),
    ("x86_64", {"avx2", "avx512f", "avx512bw"}, cpu_isa.X86_AVX512),
    ("x86_64", {"avx2", "avx512f", "avx512bw", "avx512_vnni"}, cpu_isa.X86_VNNI),
    ("x86_64", {"avx2", "avx_vnni"}, cpu_isa.X86_VNNI),
    ("x86_64", {"avx2", "avx512bw", "avx512_vnni", "amx_int8"}, cpu_isa.X86_AMX),
    ("x86_64", {"sse4_2"}, cpu_isa.X86_OLD),
    ("aarch64", {"asimd", "asimddp"}, cpu_isa.ARM_DOTPROD),
    ("aarch64", {"asimd"}, cpu_isa.ARM_NEON),
    ("riscv64", set(), cpu_isa.UNKNOWN),
])
def test_cpu_classes(machine, flags, expected):
    assert classify(machine, flags) == expected


def test_targets_cover_what_they_promise(monkeypatch):
    portable, vnni = cpu_isa.CPU_TARGETS["portable"], cpu_isa.CPU_TARGETS["vnni"]
    assert all(portable.covers(c) for c in cpu_isa.ALL_CLASSES)
    assert not vnni.covers(cpu_isa.X86_AVX2) and not vnni.covers(cpu_isa.X86_AVX512) and vnni.covers(cpu_isa.X86_VNNI)
    for cpu_class, expected in ((cpu_isa.X86_AVX2, "portable"), (cpu_isa.X86_AMX, "vnni"), (cpu_isa.UNKNOWN, "portable")):
        monkeypatch.setattr(cpu_isa, "this_cpu", lambda c=cpu_class: {"class": c, "machine": "test", "int8_flags": []})
        target, reason = resolve_cpu_target("native")
        assert target.name == expected and cpu_class in reason
    with pytest.raises(TledgeError, match="--cpu-target must be one of"):
        resolve_cpu_target("avx9000")
    with pytest.raises(TledgeError, match="--cpu-target must be one of"):
        QuantizeConfig(model="m.onnx", data="d", out_dir="o", cpu_target="fast")


@pytest.mark.skipif(not SATURATING_CPU, reason="needs a CPU whose int8 kernels saturate int16 (x86 without VNNI)")
def test_quantize_refuses_a_model_that_a_cpu_inside_its_target_computes_wrongly(saturating_fp32, tiny_dataset, tmp_path, monkeypatch):
    # Claim this AVX2 CPU accumulates in int32: the vnni-target model is then "inside its target" here, and the
    # real kernels' saturation must stop quantize instead of shipping the model.
    monkeypatch.setattr(cpu_isa, "this_cpu", lambda: {"class": cpu_isa.X86_VNNI, "machine": "test", "int8_flags": []})
    with pytest.raises(TledgeError, match="computes wrongly on this CPU"):
        quantize(QuantizeConfig(model=saturating_fp32, data=tiny_dataset, out_dir=tmp_path, num_images=24, targets=("cpu",), cpu_target="vnni"))
    assert not (tmp_path / "model.int8.cpu.onnx").exists() and not (tmp_path / "quantize.json").exists()
