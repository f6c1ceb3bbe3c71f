"""Importing tledge and asking for help must stay cheap: no ONNX Runtime, no TensorRT, no CUDA initialisation.

Each check runs in a fresh interpreter, since this test process has long imported everything.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

CHECK = """
import sys
{body}
assert "onnxruntime" not in sys.modules, "onnxruntime was imported"
assert "tensorrt" not in sys.modules, "tensorrt was imported"
torch = sys.modules.get("torch")
assert torch is None or not torch.cuda.is_initialized(), "CUDA was initialised"
print("CHECKED")
"""

HELP = """
from tledge.cli import app
for args in {argv!r}:
    try:
        app(args)
    except SystemExit as exc:
        assert exc.code in (0, None), (args, exc.code)
    else:
        raise AssertionError(f"{{args}} did not exit")
"""


def _run(body: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CHECK.format(body=body)], capture_output=True, text=True, timeout=120)


def _assert_checked(proc):
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "CHECKED"


def test_the_checks_can_fail():
    proc = _run("import onnxruntime")
    assert proc.returncode != 0 and "onnxruntime was imported" in proc.stderr


def test_import_is_light():
    _assert_checked(_run("import tledge, tledge.cli\nassert tledge.__version__"))


def test_top_level_help_is_light():
    proc = _run(HELP.format(argv=[["--help"]]))
    _assert_checked(proc)
    assert "Usage:" in proc.stdout and "build" in proc.stdout


@pytest.mark.parametrize("command", ["build", "export", "quantize", "bench", "engine", "verify"])
def test_command_help_is_light(command):
    proc = _run(HELP.format(argv=[[command, "--help"]]))
    _assert_checked(proc)
    assert f"tledge {command}" in proc.stdout
