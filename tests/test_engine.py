"""`tledge engine`: the version plan as plain functions, and the builder run against each TensorRT line's API
surface (tests/_fake_tensorrt.py) to prove it makes no call that version lacks. A real build is marked
``tensorrt`` and runs wherever TensorRT imports."""

from __future__ import annotations

import json

import onnx
import pytest
from _bundles import resign
from _fake_tensorrt import make_trt

from tledge.errors import TledgeError
from tledge.release.engines import build_engine
from tledge.trt.plan import Device, EngineConfig, TrtVersion, check_opset, make_plan

ORIN = Device("Orin", "8.7", {"l4t": "36.4.0", "jetpack": "6.1/6.2"}, dla_cores=2)
ORIN_NANO = Device("Orin", "8.7", {"l4t": "36.4.0", "jetpack": "6.1/6.2"}, dla_cores=0)
XAVIER = Device("Xavier", "7.2", {"l4t": "35.4.1", "jetpack": "5.1.2"}, dla_cores=2)
H100 = Device("NVIDIA H100 80GB HBM3", "9.0")
MANIFEST = {"input": {"name": "input", "shape": ["batch", 3, 32, 32], "max_batch": 16}}
ALL_FILES = {"model.fp32.onnx", "model.int8.qdq.onnx", "calibration.cache"}


def plan(version, device=H100, files=ALL_FILES, **kw):
    return make_plan(EngineConfig("b", **kw), version, device, MANIFEST, files)


# --- the plan: which path, which flags, which calls ---------------------------------------------------------------


@pytest.mark.parametrize("version, call, flags", [
    ("8.5.2", "flag-explicit-batch", ("INT8",)),
    ("8.6.2", "flag-explicit-batch", ("INT8",)),
    ("10.3.0", "zero", ("INT8",)),
    ("11.0.0", "no-argument", ()),
])
def test_int8_defaults_to_the_qdq_model_on_every_version(version, call, flags):
    p = plan(version)
    assert p.onnx == "model.int8.qdq.onnx" and p.int8_path == "explicit"
    assert p.network_call == call and p.builder_flags == flags
    assert p.calibration_cache is None, "a Q/DQ network never gets a calibrator"
    assert p.strongly_typed == version.startswith("11")
    assert p.profile == ((1, 3, 32, 32), (1, 3, 32, 32), (16, 3, 32, 32))
    assert p.workspace_bytes == 1024 << 20


def test_dla_on_tensorrt_8_takes_the_cache_and_runs_unscaled_layers_in_fp16():
    p = plan("8.5.2", XAVIER, dla_core=1, batch=(1, 1, 1))
    assert p.int8_path == "implicit" and p.onnx == "model.fp32.onnx" and p.calibration_cache == "calibration.cache"
    assert set(p.builder_flags) == {"INT8", "FP16", "GPU_FALLBACK"} and p.dla_core == 1
    assert p.notes and "DLA" in p.notes[0]
    with pytest.raises(TledgeError, match="does not take a Q/DQ"):
        plan("8.5.2", XAVIER, dla_core=0, batch=(1, 1, 1), int8_path="explicit")


@pytest.mark.parametrize("kw, device, version, message", [
    (dict(dla_core=0, batch=(1, 1, 1)), ORIN_NANO, "10.3.0", "has no DLA"),
    (dict(dla_core=2, batch=(1, 1, 1)), ORIN, "10.3.0", "2 DLA core"),
    (dict(dla_core=0), ORIN, "10.3.0", "static shape"),
    (dict(dla_core=0, batch=(1, 1, 1), precision="fp32"), ORIN, "10.3.0", "FP16 and INT8 only"),
    (dict(int8_path="implicit"), H100, "11.0.0", "no implicit INT8"),
    (dict(precision="fp16"), H100, "11.0.0", "strongly typed"),
    (dict(hardware_compatible=True), H100, "8.5.2", "8.6 or later"),
    (dict(hardware_compatible=True), ORIN, "10.3.0", "not supported on Jetson"),
    (dict(hardware_compatible=True), Device("Tesla T4", "7.5"), "10.3.0", "Ampere"),
    (dict(version_compatible=True), H100, "8.5.2", "8.6 or later"),
    (dict(batch=(1, 8, 32)), H100, "10.3.0", "largest batch"),
])
def test_what_a_version_or_device_cannot_do_is_a_clear_error(kw, device, version, message):
    with pytest.raises(TledgeError, match=message):
        plan(version, device, **kw)


def test_missing_bundle_files_are_named():
    with pytest.raises(TledgeError, match="calibration.cache"):
        plan("10.3.0", files={"model.fp32.onnx", "model.int8.qdq.onnx"}, int8_path="implicit")
    with pytest.raises(TledgeError, match="model.int8.qdq.onnx"):
        plan("10.3.0", files={"model.fp32.onnx"})


def test_fp16_fp32_and_portability_flags():
    assert plan("10.3.0", precision="fp16").builder_flags == ("FP16",)
    assert plan("11.0.0", precision="fp32").builder_flags == ()
    p = plan("10.3.0", hardware_compatible=True, version_compatible=True)
    assert p.hardware_compatibility == "AMPERE_PLUS" and "VERSION_COMPATIBLE" in p.builder_flags
    assert ".ampere-plus." in p.engine


def test_engines_and_timing_caches_are_named_per_gpu_model_and_version():
    names = {plan(v, d).engine for v in ("8.5.2", "10.3.0") for d in (H100, ORIN)}
    assert len(names) == 4
    assert plan("10.3.0", ORIN).engine == "model.int8.orin-sm87.trt10.3.0.engine"
    assert plan("10.3.0", ORIN).timing_cache != plan("8.6.2", ORIN).timing_cache != plan("8.6.2", XAVIER).timing_cache


def test_versions_and_opsets():
    assert TrtVersion.parse("10.3.0.30") == TrtVersion(10, 3, 0) and TrtVersion.parse("8.6.2") < TrtVersion.parse("10.0")
    with pytest.raises(TledgeError, match="older than 8.5"):
        TrtVersion.parse("8.4.3")
    check_opset(17, "8.5.2")
    with pytest.raises(TledgeError, match="opset 18.*up to 17.*--opset 17"):
        check_opset(18, "8.6.2")
    check_opset(21, "10.8.0")


# --- the builder against each version's API surface --------------------------------------------------------------




def _built(folder, record) -> dict:
    return json.loads((folder / record["path"]).read_bytes())


@pytest.mark.parametrize("version", ["8.5.2", "8.6.2", "10.3.0", "11.0.0"])
def test_build_makes_only_the_calls_each_version_has(release, tmp_path, version):
    trt = make_trt(version)
    cfg = EngineConfig(release, batch=(1, 2, 4), timing_cache_dir=tmp_path / "timing")
    record = build_engine(cfg, trt=trt, device=H100)
    built = _built(release, record)
    assert "build_serialized_network" in trt.calls
    assert built["flags"] == ([] if version.startswith("11") else ["INT8"])
    assert built["strongly_typed"] == version.startswith("11") and built["calibrator"] is False
    # 8.x: 1 << EXPLICIT_BATCH; 10.x: 0; 11.x: no argument (EXPLICIT_BATCH does not exist there)
    assert trt.calls[0] == {"8": "create_network(1)", "1": "create_network(0)"}[version[0]] if version[:2] != "11" else trt.calls[0] == "create_network()"
    assert built["pools"] == {"WORKSPACE": 1024 << 20}
    assert built["profiles"] == [{"input": [[1, 3, 32, 32], [2, 3, 32, 32], [4, 3, 32, 32]]}]
    assert record["tensorrt"] == trt.__version__ and record["gpu"] == H100.gpu and record["compute_capability"] == "9.0"
    assert record["timing_cache_reused"] is False

    # The engine is recorded and signed: manifest.json carries what a device must match.
    manifest = json.loads((release / "manifest.json").read_text())
    entry = next(a for a in manifest["artifacts"] if a["path"] == record["path"])
    assert entry["kind"] == "tensorrt engine" and entry["engine"]["tensorrt"] == trt.__version__
    assert entry["engine"]["profile"] == {"min": [1, 3, 32, 32], "opt": [2, 3, 32, 32], "max": [4, 3, 32, 32]}
    assert manifest["versions"]["torch"], "re-signing on the device keeps the versions that made the models"

    # The timing cache is saved per GPU model and version, and the next build starts from it.
    again = build_engine(cfg, trt=make_trt(version), device=H100)
    assert again["timing_cache_reused"] is True and again["path"] == record["path"]


def test_dla_build_on_tensorrt_8_reads_the_retargeted_cache(release, tmp_path):
    # The bundle's cache is headed for TensorRT 10.3; the scales are tledge's, so the header is re-written for 8.5
    # (the fake, like TensorRT, ignores a cache of another version and asks for images, which would fail the build).
    assert (release / "calibration.cache").read_text().startswith("TRT-100300-")
    trt = make_trt("8.5.2")
    record = build_engine(EngineConfig(release, dla_core=0, batch=(1, 1, 1), timing_cache_dir=tmp_path), trt=trt, device=XAVIER)
    built = _built(release, record)
    assert built["device"] == "DLA" and built["dla_core"] == 0 and built["calibrator"] is True
    assert set(built["flags"]) == {"INT8", "FP16", "GPU_FALLBACK"}
    assert record["int8_path"] == "implicit" and record["from"]["onnx"] == "model.fp32.onnx"
    assert "IInt8EntropyCalibrator2.__init__" in trt.calls
    assert record["path"].endswith(".dla0.engine")


def test_a_cache_headed_for_another_calibrator_is_re_headed_for_the_entropy2_reader(release, tmp_path):
    text = (release / "calibration.cache").read_text()
    (release / "calibration.cache").write_text("TRT-8502-MinMaxCalibration\n" + text.split("\n", 1)[1])
    resign(release, "calibration.cache")
    record = build_engine(EngineConfig(release, dla_core=0, batch=(1, 1, 1), timing_cache_dir=tmp_path), trt=make_trt("8.5.2"), device=XAVIER)
    assert record["int8_path"] == "implicit"


def test_hardware_compatible_build_sets_the_level(release, tmp_path):
    record = build_engine(EngineConfig(release, hardware_compatible=True, version_compatible=True, timing_cache_dir=tmp_path),
                          trt=make_trt("10.3.0"), device=H100)
    built = _built(release, record)
    assert built["hardware_compatibility"] == "AMPERE_PLUS" and "VERSION_COMPATIBLE" in built["flags"]


def _add_bad_node(path):
    model = onnx.load(str(path))
    last = model.graph.node[-1].output[0]
    model.graph.node.append(onnx.helper.make_node("NonZeroFancy", [last], ["fancy_out"], name="head/fancy", domain="custom.example"))
    model.opset_import.append(onnx.helper.make_opsetid("custom.example", 1))
    onnx.save(model, str(path))


@pytest.mark.parametrize("version", ["8.5.2", "10.3.0"])
def test_a_parser_error_names_the_failing_node(release, tmp_path, version):
    # 8.5 reports only the node's index (tledge maps it to the ONNX name); 10.x names it.
    _add_bad_node(release / "model.int8.qdq.onnx")
    resign(release, "model.int8.qdq.onnx")
    with pytest.raises(TledgeError, match=r"cannot parse model.int8.qdq.onnx: node 'head/fancy' \(NonZeroFancy\): No importer"):
        build_engine(EngineConfig(release, timing_cache_dir=tmp_path), trt=make_trt(version), device=H100)


def test_a_changed_bundle_file_is_never_built(release, tmp_path):
    _add_bad_node(release / "model.int8.qdq.onnx")  # changed after signing
    with pytest.raises(TledgeError, match="does not match its sha256"):
        build_engine(EngineConfig(release, timing_cache_dir=tmp_path), trt=make_trt("10.3.0"), device=H100)


def test_a_bundle_with_any_changed_file_is_not_built_nor_re_signed(release, tmp_path):
    (release / "splits.json").write_text((release / "splits.json").read_text().replace("circle", "circl3"))
    signed = (release / "manifest.json").read_bytes()
    with pytest.raises(TledgeError, match="splits.json does not match its sha256"):
        build_engine(EngineConfig(release, timing_cache_dir=tmp_path), trt=make_trt("10.3.0"), device=H100)
    assert (release / "manifest.json").read_bytes() == signed and not list(release.glob("*.engine"))


def test_opset_newer_than_the_version_reads_is_refused_before_parsing(release, tmp_path):
    model = onnx.load(str(release / "model.int8.qdq.onnx"))
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = 19
    onnx.save(model, str(release / "model.int8.qdq.onnx"))
    resign(release, "model.int8.qdq.onnx")
    trt = make_trt("8.6.2")
    with pytest.raises(TledgeError, match="opset 19"):
        build_engine(EngineConfig(release, timing_cache_dir=tmp_path), trt=trt, device=H100)
    assert "parse_from_file" not in trt.calls


def test_without_tensorrt_the_cli_says_how_to_install_it(release):
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here")
    proc = subprocess.run([sys.executable, "-m", "tledge.cli", "engine", str(release)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and proc.stderr.startswith("tledge: error: tensorrt")
    assert "JetPack" in proc.stderr


@pytest.mark.tensorrt
def test_real_tensorrt_builds_and_runs_the_engine(release, tmp_path, tiny_dataset):
    """Where TensorRT and a GPU exist: build the INT8 engine, run it on the test images and compare its predictions
    with the Q/DQ model's simulated INT8 arithmetic (the figure bench reports for it before there is an engine)."""
    trt = pytest.importorskip("tensorrt")
    import numpy as np

    from tledge.cuda import device_info
    from tledge.data.images import Preprocess, load_array
    from tledge.data.splits import splits_for
    from tledge.export.onnx_io import read_metadata
    from tledge.runners.ort_runner import OrtRunner
    from tledge.trt.runner import TrtRunner

    if device_info() is None:
        pytest.skip("no NVIDIA GPU visible")
    record = build_engine(EngineConfig(release, batch=(1, 4, 8), timing_cache_dir=tmp_path))
    assert record["tensorrt"] == trt.__version__
    meta = read_metadata(release / "model.int8.qdq.onnx")
    x, _ = load_array(splits_for(tiny_dataset, release, 0, meta.get("splits_sha256")).evaluation, Preprocess.from_dict(meta["preprocess"]))
    runner = TrtRunner(release / record["path"])
    try:
        got = runner(x)  # 18 images: chunks of at most 8
    finally:
        runner.close()
    want = OrtRunner(release / "model.int8.qdq.onnx", simulate_int8=True).run_batches(x)
    assert got.shape == want.shape and np.mean(got.argmax(1) == want.argmax(1)) >= 0.9
