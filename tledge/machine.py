"""What a measurement ran on: CPU, cores, OS and the versions of the packages that shape the numbers."""

from __future__ import annotations

import importlib.metadata
import os
import platform


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> dict:
    """A JSON-ready description of this machine and the package versions, without importing the packages."""
    from .cpu_isa import this_cpu

    onnxruntime = package_version("onnxruntime") or package_version("onnxruntime-gpu")
    cpu = this_cpu()
    return {
        "cpu": cpu_name(),
        "cpu_class": cpu["class"],  # decides whether a CPU INT8 model's figures hold here (tledge.cpu_isa)
        "cpu_int8_flags": cpu["int8_flags"],
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": {
            "tledge": package_version("tledge"),
            "torch": package_version("torch"),
            "torchvision": package_version("torchvision"),
            "onnx": package_version("onnx"),
            "onnxruntime": onnxruntime,
            "numpy": package_version("numpy"),
            "tensorrt": package_version("tensorrt"),
        },
    }
