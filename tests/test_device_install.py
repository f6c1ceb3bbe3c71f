"""The on-device part (engine, verify, bundle, bench with TensorRT or ONNX Runtime) installs and runs without
torch, torchvision or scikit-learn, on Python 3.8 (JetPack 5) as well as 3.10 (JetPack 6).

Three checks, cheapest first: the device modules parse as Python 3.8; they import and run in an interpreter where
importing torch, torchvision or sklearn fails; and (``device_venv``) a plain venv, Python 3.8 where this machine
has one, gets the project's declared base dependencies plus ``[ort]`` from the package index, which must not pull
torch, and runs the commands there. The venv is cached under the temp folder, keyed by Python and pyproject.toml.
"""

from __future__ import annotations

import ast
import glob
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from _bundles import copy_build

ROOT = Path(__file__).resolve().parent.parent
# Every module the device commands import (cli imports the pipeline's and stages' configs for its defaults).
DEVICE_MODULES = ["artifacts", "cpu_isa", "cuda", "defaults", "errors", "machine", "validate",
                  "bench", "bench.accuracy", "bench.backends", "bench.benchmark", "bench.gate", "bench.intervals", "bench.reliability",
                  "bench.slower_variant", "bench.temperature", "cli", "cli.app", "cli.device", "cli.pipeline",
                  "data", "data.datasets", "data.hygiene", "data.images", "data.perceptual_hash", "data.splits",
                  "export", "export.onnx_export", "export.onnx_io",
                  "monitor", "monitor.drift", "monitor.embedding", "monitor.histogram", "monitor.logs", "monitor.observe",
                  "monitor.projection", "monitor.reference", "monitor.stage", "pipeline", "pipeline.build", "pipeline.config",
                  "quant", "quant.calibration_cache", "quant.checks", "quant.cpu_weights", "quant.drift_budget", "quant.engine_cost",
                  "quant.quantize", "quant.recipes", "quant.sources", "quant.weight_rounding",
                  "release", "release.archive", "release.bundle", "release.check", "release.engines", "release.verify",
                  "report", "report.html", "report.markdown", "report.reliability_chart", "report.summary", "runners", "runners.ort_runner", "runners.timing",
                  "runners.torch_runner", "train", "train.diagnostics", "train.finetune", "trt", "trt.compat", "trt.engine", "trt.plan",
                  "trt.runner"]
TRAINING_ONLY = ("torch", "torchvision", "sklearn")
# Python 3.9+ methods and operators that parse on 3.8 but fail when run there.
NEWER_ATTRIBUTES = {"removeprefix", "removesuffix", "is_relative_to", "bit_count", "readlink", "with_stem"}

# JetPack 5 in one script: TensorRT 8.5's API surface (tests/_fake_tensorrt.py), a Xavier with DLA, the implicit
# INT8 path from calibration.cache, then verify against that device. Run where torch cannot be imported.
JETPACK5_BUILD = """
import sys
sys.path.insert(0, {tests!r})
from _fake_tensorrt import make_trt
from tledge.release.engines import build_engine
from tledge.release.verify import verify
from tledge.trt.compat import Here
from tledge.trt.plan import Device, EngineConfig
jetson = {{"l4t": "35.4.1", "jetpack": "5.1.2", "model": "Jetson AGX Xavier"}}
record = build_engine(EngineConfig({folder!r}, dla_core=0, batch=(1, 1, 1), timing_cache_dir={cache!r}),
                      trt=make_trt("8.5.2"), device=Device("Xavier", "7.2", jetson, dla_cores=2))
assert record["int8_path"] == "implicit" and record["dla_core"] == 0, record
report = verify({folder!r}, here=Here("8.5.2.2", "Xavier", "7.2", jetson))
assert report["engines"][0]["runs_here"], report
print("JETPACK5-OK", record["path"])
"""

BLOCKER = """
import sys
class _NoTraining:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError("blocked for the device-install test: " + name)
        return None
sys.meta_path.insert(0, _NoTraining())
"""


def _path(module: str) -> Path:
    base = ROOT / "tledge" / Path(*module.split("."))
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def _sources():
    return {m: _path(m).read_text(encoding="utf-8") for m in DEVICE_MODULES}


def _annotations(tree):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield from (a.annotation for a in node.args.args + node.args.kwonlyargs if a.annotation is not None)
            if node.returns is not None:
                yield node.returns
        elif isinstance(node, ast.AnnAssign):
            yield node.annotation


def _has_new_style_annotations(tree) -> bool:
    for annotation in _annotations(tree):
        for node in ast.walk(annotation):
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
                return True
            if isinstance(node, ast.Subscript) and getattr(node.value, "id", None) in ("list", "dict", "tuple", "set", "type"):
                return True
    return False


def test_device_modules_are_python_38():
    problems = []
    for module, source in _sources().items():
        tree = ast.parse(source, feature_version=(3, 8))  # a SyntaxError names the file and line
        if "from __future__ import annotations" not in source and _has_new_style_annotations(tree):
            problems.append(f"{module}: annotations like `int | None` or `list[str]` need `from __future__ import annotations` on 3.8")
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in NEWER_ATTRIBUTES:
                problems.append(f"{module}:{node.lineno}: .{node.attr} does not exist on Python 3.8")
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr) and any(isinstance(side, (ast.Dict, ast.DictComp)) for side in (node.left, node.right)):
                problems.append(f"{module}:{node.lineno}: dict | dict needs Python 3.9")
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "zip" and any(k.arg == "strict" for k in node.keywords):
                problems.append(f"{module}:{node.lineno}: zip(strict=) needs Python 3.10")
    assert not problems, "\n".join(problems)


def test_the_python_38_check_can_fail():
    with pytest.raises(SyntaxError):
        ast.parse("match x:\n    case 1: pass\n", feature_version=(3, 8))
    assert _has_new_style_annotations(ast.parse("def f(x: int | None) -> list[str]: pass"))
    assert not _has_new_style_annotations(ast.parse("def f(x: int, y: 'str') -> None: pass"))


def test_declared_base_dependencies_hold_no_training_package():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = [d.lower() for d in project["dependencies"]]
    extras = project["optional-dependencies"]
    for name in ("torch", "torchvision", "scikit-learn"):
        assert not [d for d in base + [x.lower() for x in extras["ort"] + extras["ort-gpu"] + extras["tensorrt"]] if d.startswith(name)], name
    assert any(d.startswith("torch") for d in extras["train"])
    def expand(extra):  # an extra's requirements with tledge[...] self-references resolved
        out = []
        for d in extras[extra]:
            if d.startswith("tledge["):
                for inner in d[len("tledge["):d.index("]")].split(","):
                    out += expand(inner.strip())
            else:
                out.append(d)
        return out

    for extra in extras:  # onnxruntime and onnxruntime-gpu are never forced together
        names = {re.split(r"[<>=;\[ ]", d, maxsplit=1)[0] for d in expand(extra)}
        assert not {"onnxruntime", "onnxruntime-gpu"} <= names, extra
    assert "onnxruntime" in {re.split(r"[<>=;\[ ]", d, maxsplit=1)[0] for d in expand("dev")}
    assert project["requires-python"] == ">=3.8"


def _blocked_run(code: str, cwd: Path) -> subprocess.CompletedProcess:
    script = BLOCKER.format(blocked=set(TRAINING_ONLY)) + code
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=cwd, env=env)


def test_blocker_can_fail(tmp_path):
    proc = _blocked_run("import torch", tmp_path)
    assert proc.returncode != 0 and "blocked for the device-install test" in proc.stderr


def _with_monitoring_reference(folder: Path, dataset: Path) -> None:
    """The tiny build's validation split is too small for a reference: make one from train and val here."""
    from tledge.artifacts import write_json
    from tledge.data.images import Preprocess, load_array
    from tledge.data.splits import load_splits
    from tledge.export.onnx_io import read_metadata
    from tledge.monitor import ModelTap, build_reference, save_reference

    meta = read_metadata(folder / "model.fp32.onnx")
    splits = load_splits(dataset)
    x, _ = load_array(splits.train + splits.val, Preprocess.from_dict(meta["preprocess"]))
    logits, embedding = ModelTap(folder / "model.fp32.onnx")(x)
    reference = build_reference(x, embedding, logits, meta["classes"], meta={"model": "model.fp32.onnx"})
    save_reference(reference, folder / "monitor.reference.json")
    write_json(folder / "monitor.json", {"stage": "monitor", "artifacts": ["monitor.reference.json", "monitor.json"]})


def test_device_commands_run_where_torch_cannot_be_imported(tiny_pipeline, tiny_dataset, tmp_path):
    folder = copy_build(tiny_pipeline, tmp_path / "release", sign=False)
    _with_monitoring_reference(folder, tiny_dataset)
    code = f"""
import importlib
for m in {["tledge." + m for m in DEVICE_MODULES]!r}:
    importlib.import_module(m)
from tledge.cli import app
def run(args):
    try:
        app(args)
    except SystemExit as exc:
        return exc.code
for args in (["engine", "--help"], ["verify", "--help"], ["bench", "--help"], ["bundle", {str(folder)!r}],
             ["verify", {str(folder)!r}, "--hashes-only"]):
    code = run(args)
    assert code in (0, None), (args, code)
code = run(["monitor", {str(folder)!r}, "--images", {str(tiny_dataset / "test")!r}])
assert code in (0, 3), code  # 18 images: a verdict either way, and a warning that PSI is noisy
{JETPACK5_BUILD.format(tests=str(ROOT / "tests"), folder=str(folder), cache=str(tmp_path / "timing"))}
for name in {TRAINING_ONLY!r}:
    assert name not in sys.modules, name
print("DEVICE-OK")
"""
    proc = _blocked_run(code, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "DEVICE-OK" in proc.stdout and "bundle OK" in proc.stdout


def _python_38() -> str | None:
    for candidate in [shutil.which("python3.8"), *sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.8*/bin/python3.8")))]:
        if candidate and subprocess.run([candidate, "-c", "import venv"], capture_output=True).returncode == 0:
            return candidate
    return None


def _device_venv(python: str) -> Path:
    version = subprocess.run([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"], capture_output=True, text=True).stdout.strip()
    key = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + str(ROOT).encode()).hexdigest()[:12]
    venv = Path(tempfile.gettempdir()) / f"tledge-device-venv-py{version}-{key}"
    ready = venv / ".tledge-ready"
    if not ready.is_file():
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([python, "-m", "venv", str(venv)], check=True, timeout=300)  # plain: no system site-packages
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
        proc = subprocess.run(pip + [f"{ROOT}[ort]"], capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"installing tledge[ort] into a fresh venv failed:\n{proc.stderr[-3000:]}"
        ready.write_text(version)
    proc = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "-e", str(ROOT)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return venv


@pytest.mark.device_venv
def test_device_install_in_a_plain_venv(tiny_pipeline, tiny_dataset, tmp_path):
    python = _python_38() or sys.executable  # Python 3.8 is JetPack 5's; without it, this machine's Python
    venv = _device_venv(python)
    py = str(venv / "bin" / "python")
    for name in TRAINING_ONLY:
        proc = subprocess.run([py, "-c", f"import {name}"], capture_output=True, text=True)
        assert proc.returncode != 0, f"{name} got installed by the device install"
    proc = subprocess.run([py, "-c", "import tledge.trt.engine, tledge.release.verify, tledge.trt.runner, tledge.bench.benchmark, tledge.cli; "
                           "import pathlib, tledge; "
                           "assert (pathlib.Path(tledge.__file__).parent / 'calibration_sets' / 'digits-efficientnet_lite0-128.json').is_file()"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = copy_build(tiny_pipeline, tmp_path / "release", sign=False)
    _with_monitoring_reference(folder, tiny_dataset)
    tledge = str(venv / "bin" / "tledge")
    for args in (["verify", "--help"], ["engine", "--help"], ["bundle", str(folder)], ["verify", str(folder), "--hashes-only"]):
        proc = subprocess.run([tledge, *args], capture_output=True, text=True, cwd=tmp_path, timeout=300)
        assert proc.returncode == 0, (args, proc.stderr[-3000:])
    proc = subprocess.run([tledge, "engine", str(folder)], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 1 and proc.stderr.startswith("tledge: error: tensorrt"), proc.stderr
    # bench and its reports with the [ort] extra (ONNX Runtime's last release for this Python where it is 3.8)
    models = [str(folder / m) for m in ("model.fp32.onnx", "model.int8.qdq.onnx", "model.int8.cpu.onnx")]
    proc = subprocess.run([tledge, "bench", *models, "--data", str(tiny_dataset), "--out-dir", str(tmp_path / "bench"), "--iterations", "5"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0 and (tmp_path / "bench" / "report.html").is_file(), proc.stderr[-3000:]
    proc = subprocess.run([tledge, "monitor", str(folder), "--images", str(tiny_dataset / "test"), "--out", str(tmp_path / "drift.json")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode in (0, 3) and "verdict:" in proc.stdout and (tmp_path / "drift.json").is_file(), proc.stderr[-3000:]
    script = JETPACK5_BUILD.format(tests=str(ROOT / "tests"), folder=str(folder), cache=str(tmp_path / "timing"))
    proc = subprocess.run([py, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0 and "JETPACK5-OK" in proc.stdout, proc.stderr[-3000:]
