"""Importing tledge and asking for help must stay cheap: no ONNX Runtime, no TensorRT, no CUDA."""

import subprocess
import sys

CHECK = """
import sys
{body}
assert "onnxruntime" not in sys.modules, "onnxruntime imported"
assert "tensorrt" not in sys.modules, "tensorrt imported"
torch = sys.modules.get("torch")
assert torch is None or not torch.cuda.is_initialized(), "CUDA initialized"
print("ok")
"""


def _run(body: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CHECK.format(body=body)], capture_output=True, text=True, timeout=120)


def test_import_is_light():
    proc = _run("import tledge, tledge.cli")
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_help_is_light():
    body = "from tledge.cli import app\ntry:\n    app(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\ntry:\n    app(['build', '--help'])\nexcept SystemExit as e:\n    assert e.code == 0"
    proc = _run(body)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr
