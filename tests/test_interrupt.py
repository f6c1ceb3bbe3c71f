"""Interruptions: ``tledge build`` killed (SIGKILL), terminated (SIGTERM) or interrupted (Ctrl-C) at several points,
in a subprocess.

After each interruption no manifest vouches for anything but a complete build (the previous manifest is removed
before the build touches a file and the new one is written last), ``tledge bundle`` signs only what passes its own
checks, and a re-run starts clean and succeeds. Tiny model, tiny images, one epoch: each build takes seconds.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import make_image_folder

from tledge.artifacts import sha256_file
from tledge.release.check import check_artifact
from tledge.validate import LEFTOVER_PATTERNS

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


WEIGHTS: list[Path] = []  # the tiny stand-in for pretrained weights (conftest's tiny_weights)


def _args(data: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "tledge.cli", "build", "--data", str(data), "--out", str(out), "--model", "test_efficientnet_lite",
            "--weights", str(WEIGHTS[0]), "--epochs", "1", "--patience", "1", "--unfreeze", "none", "--num-calib", "6",
            "--bench-iterations", "5", "--qat-epochs", "0", "--fallback-layers", "0"]


def _build(data: Path, out: Path, stop_at: str | None = None, delay: float = 0.0, sig: int = signal.SIGKILL, timeout: float = 300):
    """Run a build; with ``stop_at``, send ``sig`` ``delay`` seconds after a stderr line contains it."""
    proc = subprocess.Popen(_args(data, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    if stop_at is not None:
        deadline = time.monotonic() + timeout
        for line in proc.stderr:
            seen.append(line)
            if stop_at in line or time.monotonic() > deadline:
                break
        assert any(stop_at in line for line in seen), "".join(seen)[-2000:]
        time.sleep(delay)
        proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=timeout)
    return proc.returncode, stdout, "".join(seen) + stderr


def _manifest_is_true(out: Path) -> bool:
    """No manifest, or one whose every artifact is on disk with the size and sha256 it states."""
    path = out / "manifest.json"
    if not path.exists():
        return True
    manifest = json.loads(path.read_text())
    return all((out / a["path"]).is_file() and sha256_file(out / a["path"]) == a["sha256"] and (out / a["path"]).stat().st_size == a["bytes"]
               for a in manifest["artifacts"])


def _bundle_signs_only_sound_files(out: Path) -> None:
    """`bundle` on what an interruption left: a clear error and no manifest, or a manifest of files that pass their
    checks (in process: the test already paid for the imports; the CLI's error path is the corpus's business)."""
    from tledge.errors import TledgeError
    from tledge.release.bundle import bundle

    try:
        manifest = bundle(out)
    except TledgeError as exc:
        assert "\n" not in str(exc)
        assert not (out / "manifest.json").exists()
        return
    for a in manifest["artifacts"]:
        check_artifact(out / a["path"])
    assert _manifest_is_true(out)
    (out / "manifest.json").unlink()


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for pattern in LEFTOVER_PATTERNS for p in out.glob(pattern))


def test_build_killed_at_several_points_never_leaves_a_lying_manifest(tmp_path, tiny_weights):
    WEIGHTS[:] = [tiny_weights]
    data = make_image_folder(tmp_path / "data", {"train": 4, "val": 2, "test": 2})
    out = tmp_path / "release"

    code, _, err = _build(data, out)
    assert code == 0, err[-3000:]
    assert _manifest_is_true(out) and (out / "manifest.json").is_file()
    first = json.loads((out / "manifest.json").read_text())

    # SIGKILL in the middle of fine-tuning, in the middle of quantization, and while the report and manifest are written
    for stop_at, delay in (("[1/5]", 0.5), ("[3/5]", 0.4), ("[5/5]", 0.0)):
        code, _, err = _build(data, out, stop_at, delay)
        assert code in (-signal.SIGKILL, 0), err[-2000:]
        assert _manifest_is_true(out), f"killed at {stop_at}: the manifest vouches for files that are not what it says"
        if (out / "manifest.json").exists():  # the build got to write it before the kill: then it is complete
            assert code == 0 or json.loads((out / "manifest.json").read_text()) != first
        _bundle_signs_only_sound_files(out)

    # SIGTERM (how CI cancels a job): exit 143, one line, and the unwinding removes its temporary files
    code, _, err = _build(data, out, "[2/5]", 0.2, sig=signal.SIGTERM)
    assert code == 143, err[-2000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("tledge: terminated"), err[-500:]
    assert not (out / "manifest.json").exists() and not list(out.glob(".*.partial"))

    # Ctrl-C: exit 130 and one line of its own (the progress lines before it are the build's)
    code, _, err = _build(data, out, "[3/5]", 0.3, sig=signal.SIGINT)
    assert code == 130, err[-2000:]
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("tledge: interrupted"), err[-500:]
    assert not (out / "manifest.json").exists()

    # a re-run starts clean: no leftovers of the interrupted runs, a complete manifest of every file
    code, _, err = _build(data, out)
    assert code == 0, err[-3000:]
    assert _leftovers(out) == []
    manifest = json.loads((out / "manifest.json").read_text())
    signed = {a["path"] for a in manifest["artifacts"]}
    assert signed == {p.name for p in out.iterdir() if p.is_file() and p.name != "manifest.json"}
    assert _manifest_is_true(out) and manifest["not_signed"] == []
