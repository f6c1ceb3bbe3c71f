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


def gpu_info() -> list[dict] | None:
    """The NVIDIA GPUs here (name, compute capability, driver, CUDA version the driver supports, memory), from
    ``nvidia-smi``; None where there is none. On a Jetson (no nvidia-smi) the L4T release stands in."""
    import re
    import shutil
    import subprocess

    smi = shutil.which("nvidia-smi")
    if smi is None:
        try:
            with open("/etc/nv_tegra_release", encoding="utf-8") as f:
                return [{"name": "NVIDIA Jetson (integrated GPU)", "l4t": f.readline().strip()}]
        except OSError:
            return None
    try:
        query = subprocess.run([smi, "--query-gpu=name,compute_cap,driver_version,memory.total", "--format=csv,noheader,nounits"],
                               capture_output=True, text=True, timeout=20, check=True).stdout
        header = subprocess.run([smi], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    cuda = re.search(r"CUDA Version:\s*([\d.]+)", header)
    gpus = []
    for line in query.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 4:
            gpus.append({"name": parts[0], "compute_capability": parts[1], "driver": parts[2],
                         "cuda": cuda.group(1) if cuda else None, "memory_mib": int(float(parts[3])) if parts[3].replace(".", "").isdigit() else None})
    return gpus or None


def machine_info() -> dict:
    """A JSON-ready description of this machine and the package versions, without importing the packages."""
    from tledge.cpu_isa import this_cpu

    onnxruntime = package_version("onnxruntime") or package_version("onnxruntime-gpu")
    cpu = this_cpu()
    return {
        "cpu": cpu_name(),
        "cpu_class": cpu["class"],  # decides whether a CPU INT8 model's figures hold here (tledge.cpu_isa)
        "cpu_int8_flags": cpu["int8_flags"],
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "gpu": gpu_info(),
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
