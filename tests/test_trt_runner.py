"""The TensorRT runner against each version's runtime API surface (tests/_fake_tensorrt.py): name-based I/O
only, buffers sized and reused right, outputs copied back, the profile's batch range enforced, DLA core and
version compatibility set before deserializing. Device memory is host memory here (same interface as
tledge.cuda.Cudart, real memmoves); the real CUDA path runs in the `tensorrt`-marked test of test_engine.py."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
from _fake_tensorrt import make_trt

from tledge.errors import TledgeError
from tledge.release.engines import build_engine
from tledge.trt.compat import Here
from tledge.trt.plan import Device, EngineConfig
from tledge.trt.runner import TrtRunner

H100 = Device("NVIDIA H100 80GB HBM3", "9.0")
XAVIER = Device("Xavier", "7.2", {"l4t": "35.4.1", "jetpack": "5.1.2"}, dla_cores=2)


class HostMemory:
    """tledge.cuda.Cudart's interface on host buffers; every copy is checked to stay inside its allocation."""

    stream = 0

    def __init__(self):
        self.blocks, self.freed = {}, []

    def malloc(self, nbytes):
        buf = ctypes.create_string_buffer(nbytes)
        self.blocks[ctypes.addressof(buf)] = buf
        return ctypes.addressof(buf)

    def free(self, ptr):
        self.freed.append(ptr)
        del self.blocks[ptr]

    def _check(self, ptr, nbytes):
        assert ptr in self.blocks and nbytes <= len(self.blocks[ptr]), "copy outside a device allocation"

    def to_device(self, ptr, array):
        self._check(ptr, array.nbytes)
        ctypes.memmove(ptr, array.ctypes.data, array.nbytes)

    def to_host(self, array, ptr):
        self._check(ptr, array.nbytes)
        ctypes.memmove(array.ctypes.data, ptr, array.nbytes)

    def synchronize(self):
        pass

    def close(self):
        pass


def expected(x):
    return x.reshape(len(x), -1).mean(1)[:, None] * np.arange(1, 4)


def _here(device, version):
    return Here(version, device.gpu, device.compute_capability, device.jetson)


@pytest.mark.parametrize("version", ["8.5.2", "10.3.0", "11.0.0"])
def test_runner_runs_by_tensor_name_and_grows_its_buffers(release, tmp_path, version):
    trt = make_trt(version)
    record = build_engine(EngineConfig(release, batch=(1, 2, 4), timing_cache_dir=tmp_path), trt=trt, device=H100)
    memory = HostMemory()
    runner = TrtRunner(release / record["path"], trt=trt, cuda=memory, here=_here(H100, trt.__version__))
    x = np.random.default_rng(0).normal(0, 1, (4, 3, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(runner(x[:1]), expected(x[:1]), rtol=1e-5)
    first = dict(runner.buffers)
    np.testing.assert_allclose(runner(x), expected(x), rtol=1e-5)
    assert set(memory.freed) == {ptr for ptr, _ in first.values()}, "smaller buffers are freed when they grow"
    grown = set(memory.blocks)
    np.testing.assert_allclose(runner(x[:2]), expected(x[:2]), rtol=1e-5)
    assert set(memory.blocks) == grown and len(grown) == 2, "a smaller batch reuses the larger buffers"
    many = np.concatenate([x, x[:3]])
    np.testing.assert_allclose(runner.run_batches(many), expected(many), rtol=1e-5)
    five = np.concatenate([x, x[:1]])  # more than the profile's largest batch: run in chunks
    np.testing.assert_allclose(runner(five), expected(five), rtol=1e-5)
    with pytest.raises(TledgeError, match=r"takes input \[3, 32, 32\] per image in batches of 1 to 4"):
        runner(np.zeros((2, 3, 16, 16), np.float32))
    info = runner.describe()
    assert info["backend"] == "tensorrt" and info["runtime"] == f"tensorrt {trt.__version__}" and info["device"] == H100.gpu
    runner.close()
    assert not memory.blocks
    assert "execute_async_v3(batch 4)" in trt.calls


def test_runner_refuses_an_engine_of_another_device_before_loading_it(release, tmp_path):
    trt = make_trt("10.3.0")
    record = build_engine(EngineConfig(release, timing_cache_dir=tmp_path), trt=trt, device=H100)
    with pytest.raises(TledgeError, match="cannot run here: it was built with TensorRT 10.3.0.1, this device has 8.6.2"):
        TrtRunner(release / record["path"], trt=make_trt("8.6.2"), cuda=HostMemory(), here=Here("8.6.2", H100.gpu, "9.0"))


def test_dla_engine_sets_the_core_before_deserializing(release, tmp_path):
    trt = make_trt("8.5.2")
    record = build_engine(EngineConfig(release, dla_core=1, batch=(2, 2, 2), timing_cache_dir=tmp_path), trt=trt, device=XAVIER)
    runner = TrtRunner(release / record["path"], trt=trt, cuda=HostMemory(), here=_here(XAVIER, trt.__version__))
    assert runner.runtime.DLA_core == 1
    x = np.random.default_rng(1).normal(0, 1, (3, 3, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(runner(x), expected(x), rtol=1e-5)  # a static batch of 2: one full, one padded
    runner.close()


def test_version_compatible_engine_allows_host_code(release, tmp_path):
    trt = make_trt("10.3.0")
    record = build_engine(EngineConfig(release, version_compatible=True, timing_cache_dir=tmp_path), trt=trt, device=H100)
    runner = TrtRunner(release / record["path"], trt=trt, cuda=HostMemory(), here=_here(H100, trt.__version__))
    assert runner.runtime.engine_host_code_allowed is True
    runner.close()


def test_bench_and_gate_measure_an_engine_in_the_same_report_format(release, tmp_path, tiny_dataset, monkeypatch):
    """bench with the tensorrt backend end to end, TensorRT being 10.3's surface and device memory host memory."""
    import importlib.machinery
    import json
    import sys

    from tledge.bench.backends import Variant, backend_unavailable
    from tledge.bench.benchmark import BenchConfig, bench
    from tledge.report.summary import write_report

    trt = make_trt("10.3.0")
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)
    record = build_engine(EngineConfig(release, batch=(1, 4, 16), timing_cache_dir=tmp_path / "timing"), trt=trt, device=H100)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr("tledge.cuda.device_info", lambda index=0: {"gpu": H100.gpu, "compute_capability": "9.0", "jetson": None})
    monkeypatch.setattr("tledge.cuda.Cudart", HostMemory)
    assert backend_unavailable("tensorrt") is None
    out = tmp_path / "device-bench"
    bench(BenchConfig(models={}, variants=[Variant("engine", release / record["path"], "tensorrt")], data=tiny_dataset, out_dir=out,
                      iterations=5, rounds=1, warmup=1, throughput_batch=4))
    summary = write_report(out)
    v = json.loads((out / "bench.json").read_text())["variants"]["engine"]
    assert v["precision"] == "tensorrt-int8" and v["accuracy_method"].startswith("the TensorRT engine itself")
    assert v["backend"]["backend"] == "tensorrt" and v["runtime"] == "tensorrt 10.3.0.1"
    assert v["latency_ms"]["p50"] > 0 and summary["variants"]["engine"]["top1"] >= 0

    # and gate: the same engine against itself passes, accuracy exactly equal
    from tledge.bench.gate import GateConfig, gate

    engine = release / record["path"]
    verdict = gate(GateConfig(candidate=engine, baseline=engine, data=tiny_dataset, blocks=8, calls_per_block=3, max_latency_regression_pct=400))  # latency is not what this checks
    assert verdict["passed"] and {c["check"] for c in verdict["checks"]} == {"latency", "top1", "agreement"}


def test_the_real_cuda_runtime_works_or_says_why():
    # Here (CUDA toolkit, no driver) cudaStreamCreate fails; on a GPU machine a buffer makes a round trip.
    from tledge.cuda import Cudart

    try:
        cuda = Cudart()
    except TledgeError as exc:
        assert "CUDA" in str(exc) or "libcudart" in str(exc)
        return
    x = np.arange(16, dtype=np.float32)
    back = np.zeros_like(x)
    ptr = cuda.malloc(x.nbytes)
    cuda.to_device(ptr, x)
    cuda.to_host(back, ptr)
    cuda.synchronize()
    cuda.free(ptr)
    cuda.close()
    np.testing.assert_array_equal(back, x)


@pytest.mark.parametrize("version", ["8.6.2", "10.3.0"])
def test_engine_and_verify_commands_on_a_device(release, tmp_path, monkeypatch, version):
    """`tledge engine --time` and `tledge verify` as a user runs them on the device (TensorRT's API surface of
    that version, this machine standing in for an Orin)."""
    import importlib.machinery
    import json
    import sys

    from typer.testing import CliRunner

    from tledge.cli import app

    trt = make_trt(version)
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)
    orin = {"gpu": "Orin", "compute_capability": "8.7", "jetson": {"l4t": "36.4.0", "jetpack": "6.1/6.2", "model": "NVIDIA Jetson AGX Orin"}}
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr("tledge.cuda.device_info", lambda index=0: orin)
    monkeypatch.setattr("tledge.cuda.Cudart", HostMemory)
    monkeypatch.setenv("TLEDGE_CACHE", str(tmp_path / "cache"))
    cli = CliRunner()
    result = cli.invoke(app, ["engine", str(release), "--batch", "1,2,4", "--time", "5"])
    assert result.exit_code == 0, result.output
    name = f"model.int8.orin-sm87.trt{version}.engine"
    assert f"wrote {release / name}: TensorRT {trt.__version__}, Orin (compute capability 8.7), int8 (explicit), batch 1/2/4" in result.output
    assert "latency at batch 2: p50" in result.output and "manifest.json re-signed" in result.output
    result = cli.invoke(app, ["engine", str(release), "--batch", "4", "--json"])
    record = json.loads(result.output)
    assert record["profile"]["min"][0] == record["profile"]["max"][0] == 4 and record["timing_cache_reused"] is True
    result = cli.invoke(app, ["verify", str(release)])
    assert result.exit_code == 0 and f"runs here  {name}" in result.output and "bundle OK" in result.output
