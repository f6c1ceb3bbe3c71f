"""The release bundle: one archive, safe extraction, and `tledge verify` (hashes, and whether this device can
run each engine: TensorRT version, GPU model / compute capability)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile

import pytest
from _fake_tensorrt import make_trt

from tledge.errors import TledgeError
from tledge.release.archive import safe_extract, write_archive
from tledge.release.engines import build_engine
from tledge.release.verify import verify
from tledge.trt.compat import Here
from tledge.trt.plan import Device, EngineConfig

ORIN = Device("Orin", "8.7", {"l4t": "36.4.0", "jetpack": "6.1/6.2"}, dla_cores=2)
ORIN_HERE = Here("10.3.0.30", "Orin", "8.7", {"l4t": "36.4.0", "jetpack": "6.1/6.2"})




@pytest.fixture
def with_engine(release, tmp_path):
    """The bundle after `tledge engine` on a Jetson Orin with TensorRT 10.3 (the builder run on 10.3's API surface)."""
    record = build_engine(EngineConfig(release, batch=(1, 1, 4), timing_cache_dir=tmp_path / "timing"), trt=make_trt("10.3.0"), device=ORIN)
    return release, record["path"]


def test_a_bundle_without_engines_verifies_its_hashes(release):
    report = verify(release)
    assert report["ok"] and report["files_checked"] >= 5 and report["engines"] == []


def test_the_engine_runs_on_the_device_it_was_built_for(with_engine):
    folder, engine = with_engine
    report = verify(folder, here=ORIN_HERE)  # the build number after major.minor.patch does not matter
    assert report["engines"] == [{"path": engine, "runs_here": True}]


@pytest.mark.parametrize("here, words", [
    (Here("8.5.2.2", "Orin", "8.7"), ["built with TensorRT 10.3.0.1", "this device has 8.5.2.2"]),
    (Here("10.3.0.30", "Xavier", "7.2"), ["built for Orin (compute capability 8.7)", "this is Xavier (7.2)"]),
    (Here("10.3.0.30", "NVIDIA GeForce RTX 4090", "8.9"), ["built for Orin"]),
])
def test_a_device_that_cannot_run_the_engine_is_refused_with_what_to_rebuild(with_engine, here, words):
    folder, engine = with_engine
    with pytest.raises(TledgeError) as err:
        verify(folder, here=here)
    message = str(err.value)
    for w in words:
        assert w in message
    assert f"tledge engine {folder} --precision int8 --batch 1,1,4" in message
    with pytest.raises(TledgeError, match=f"{engine} cannot run here"):
        verify(folder, here=here, engines=[engine])


def test_no_tensorrt_here_points_to_hashes_only(with_engine):
    folder, _ = with_engine
    with pytest.raises(TledgeError, match="TensorRT is not installed here.*--hashes-only"):
        verify(folder, here=Here(None, None, None))
    assert verify(folder, check_device=False)["ok"]


def test_a_tampered_file_fails_verification(with_engine):
    folder, engine = with_engine
    data = bytearray((folder / engine).read_bytes())
    data[10] ^= 1
    (folder / engine).write_bytes(bytes(data))
    with pytest.raises(TledgeError, match=f"{engine} does not match its sha256"):
        verify(folder, check_device=False)
    (folder / "calibration.cache").unlink()
    with pytest.raises(TledgeError, match="calibration.cache is missing"):
        verify(folder, check_device=False)


def test_archive_round_trip(with_engine, tmp_path):
    folder, engine = with_engine
    (folder / "leftover.txt").write_text("not signed")
    archive = write_archive(folder, tmp_path / "release-1.tar.gz")
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
    assert "manifest.json" in names and engine in names and "leftover.txt" not in names
    report = verify(archive, here=ORIN_HERE)
    assert report["bundle"] == str(tmp_path / "release-1") and report["engines"][0]["runs_here"]
    with pytest.raises(TledgeError, match="already exists"):
        verify(archive, here=ORIN_HERE)  # never extracted over an existing folder


def _tar_with(path, member: tarfile.TarInfo, data: bytes = b"x"):
    with tarfile.open(path, "w") as tar:
        ok = tarfile.TarInfo("manifest.json")
        ok.size = 2
        tar.addfile(ok, io.BytesIO(b"{}"))
        if member.isfile():
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
        else:
            tar.addfile(member)
    return path


def _member(name, kind=tarfile.REGTYPE, link=""):
    m = tarfile.TarInfo(name)
    m.type, m.linkname = kind, link
    return m


@pytest.mark.parametrize("member, why", [
    (_member("../evil.txt"), "leaves the folder"),
    (_member("sub/../../evil.txt"), "leaves the folder"),
    (_member("/tmp/evil.txt"), "absolute path"),
    (_member("link", tarfile.SYMTYPE, "/etc/passwd"), "a link"),
    (_member("link", tarfile.SYMTYPE, "../../evil"), "a link"),
    (_member("hard", tarfile.LNKTYPE, "../outside"), "a link"),
    (_member("fifo", tarfile.FIFOTYPE), "special file"),
])
def test_unsafe_archives_are_refused_before_anything_is_written(tmp_path, member, why):
    archive = _tar_with(tmp_path / "bad.tar", member)
    dest = tmp_path / "out" / "bundle"
    with pytest.raises(TledgeError, match=why):
        safe_extract(archive, dest)
    assert not dest.exists() and not (tmp_path / "evil.txt").exists() and not (tmp_path / "out" / "evil.txt").exists()


def test_verify_cli_one_line_errors_and_report(with_engine):
    folder, engine = with_engine

    def tledge(*args):
        return subprocess.run([sys.executable, "-m", "tledge.cli", *map(str, args)], capture_output=True, text=True, timeout=120)

    proc = tledge("verify", folder, "--hashes-only", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["ok"] is True
    (folder / "model.fp32.onnx").write_bytes(b"not the model")
    proc = tledge("verify", folder, "--hashes-only")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and "model.fp32.onnx does not match its sha256" in lines[0]
    proc = tledge("verify", folder / "nothing-here")
    assert proc.returncode == 1 and "neither a bundle folder nor an archive" in proc.stderr


def test_bench_reads_an_engines_record_as_its_model_metadata(with_engine):
    # bench scores an engine like the ONNX it came from: classes, preprocessing and split come from engine.json.
    from tledge.bench.benchmark import variant_metadata
    from tledge.export.onnx_io import read_metadata

    folder, engine = with_engine
    meta, onnx_meta = variant_metadata(folder / engine), read_metadata(folder / "model.int8.qdq.onnx")
    assert meta["classes"] == onnx_meta["classes"] and meta["preprocess"] == onnx_meta["preprocess"]
    assert meta["precision"] == "tensorrt-int8" and meta.get("splits_sha256") == onnx_meta.get("splits_sha256")


def test_gate_and_bench_take_an_engine_and_say_when_it_cannot_run_here(with_engine):
    import importlib.util

    from tledge.bench.gate import GateConfig, gate

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here")
    folder, engine = with_engine
    with pytest.raises(TledgeError, match="backend tensorrt cannot run here: tensorrt is not installed"):
        gate(GateConfig(candidate=folder / engine, baseline=folder / "model.int8.qdq.onnx"))


def test_another_jetson_module_of_the_same_gpu_is_refused(with_engine):
    # every Orin says "Orin", compute capability 8.7; the module name tells an AGX Orin from an Orin Nano
    from tledge.cuda import jetson_release
    from tledge.trt.compat import engine_mismatch

    assert jetson_release("# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref", "NVIDIA Jetson AGX Orin")["jetpack"] == "5.1.2"
    record = {"tensorrt": "10.3.0", "gpu": "Orin", "compute_capability": "8.7", "jetson": {"l4t": "36.4.0", "model": "NVIDIA Jetson AGX Orin Developer Kit"}}
    nano = Here("10.3.0", "Orin", "8.7", {"l4t": "36.4.0", "model": "NVIDIA Jetson Orin Nano Developer Kit"})
    assert "Orin Nano" in engine_mismatch(record, nano)
    assert engine_mismatch(record, Here("10.3.0", "Orin", "8.7", {"l4t": "36.4.0", "model": "NVIDIA Jetson AGX Orin Developer Kit"})) is None


def test_bundle_command_writes_the_archive(release, tmp_path):
    from typer.testing import CliRunner

    from tledge.cli import app

    result = CliRunner().invoke(app, ["bundle", str(release), "--archive", str(tmp_path / "r.tar.gz")])
    assert result.exit_code == 0 and f"wrote {tmp_path / 'r.tar.gz'}" in result.output
    assert verify(tmp_path / "r.tar.gz", check_device=False)["files_checked"] >= 5
    result = CliRunner().invoke(app, ["bundle", str(release), "--archive", str(tmp_path / "r.zip")])
    assert result.exit_code == 1 and "--archive must end in one of" in str(result.exception)
