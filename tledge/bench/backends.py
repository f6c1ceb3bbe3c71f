"""Backends behind one small interface, and a registry that makes them by name.

A :class:`Variant` names a model file, a backend and its options; :func:`make_runner` builds its runner (an
ONNX Runtime, OpenVINO, PyTorch or TensorRT one, each ``runner(x) -> logits``), and :func:`backend_unavailable` says, without
building anything, why a backend cannot run here (not installed, no GPU) so that callers skip it with that reason
instead of crashing. Each backend's heavy import happens when a runner is made, never when tledge is imported."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tledge.errors import TledgeError
from tledge.runners.ort_runner import OrtRunner
from tledge.runners.torch_runner import TorchRunner


@dataclass(frozen=True)
class Variant:
    """One thing to measure: a model file, the backend that runs it and that backend's options."""

    name: str
    path: Path
    backend: str = "onnxruntime-cpu"
    options: dict = field(default_factory=dict)  # e.g. {"threads": 2}, {"simulate_int8": True}

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))
        if self.backend not in BACKENDS:
            raise TledgeError(f"unknown backend {self.backend!r}; tledge knows {', '.join(BACKENDS)}")


@dataclass(frozen=True)
class Backend:
    """How to make a runner for a model file, and why it cannot run here (None when it can)."""

    make: Callable[[Path, dict], object]
    unavailable: Callable[[], str | None]
    files: str  # what model files it runs
    install: str  # what to install for it


def _ort_providers() -> list[str]:
    try:
        import onnxruntime
    except ImportError:
        return []
    return onnxruntime.get_available_providers()


def _ort_unavailable(provider: str, install: str) -> Callable[[], str | None]:
    def check() -> str | None:
        providers = _ort_providers()
        if not providers:
            return f"onnxruntime is not installed ({install})"
        if provider not in providers:
            return f"this onnxruntime has no {provider} (it has {', '.join(providers)}; {install})"
        return None
    return check


def _torch_unavailable(cuda: bool) -> Callable[[], str | None]:
    def check() -> str | None:
        try:
            import torch
        except ImportError:
            return "torch is not installed (pip install 'tledge[train]')"
        if cuda and not torch.cuda.is_available():
            return "no CUDA device visible to torch"
        return None
    return check


def _make_torch(device: str) -> Callable[[Path, dict], TorchRunner]:
    def make(path: Path, options: dict) -> TorchRunner:
        from tledge.models import load_checkpoint

        model, _ = load_checkpoint(path)
        return TorchRunner(model, device=device)
    return make


def _openvino_unavailable() -> str | None:
    import importlib.util

    from tledge.runners.openvino_runner import INSTALL

    return None if importlib.util.find_spec("openvino") is not None else f"openvino is not installed ({INSTALL})"


def _make_openvino(path: Path, options: dict):
    from tledge.runners.openvino_runner import OpenVinoRunner

    return OpenVinoRunner(path, threads=options.get("threads"))


def _tensorrt_unavailable() -> str | None:
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        return "tensorrt is not installed (on a Jetson it comes with JetPack; elsewhere pip install 'tledge[tensorrt]')"
    from tledge.cuda import device_info

    if device_info() is None:
        return "no NVIDIA GPU visible (in a container: --runtime nvidia on a Jetson, --gpus all elsewhere)"
    return None


def _make_tensorrt(path: Path, options: dict):
    from tledge.trt.runner import TrtRunner

    return TrtRunner(path)


BACKENDS: dict[str, Backend] = {
    "onnxruntime-cpu": Backend(lambda p, o: OrtRunner(p, threads=o.get("threads"), simulate_int8=o.get("simulate_int8", False)),
                               _ort_unavailable("CPUExecutionProvider", "pip install onnxruntime"), ".onnx", "pip install onnxruntime"),
    "onnxruntime-cuda": Backend(lambda p, o: OrtRunner(p, providers=("CUDAExecutionProvider", "CPUExecutionProvider")),
                                _ort_unavailable("CUDAExecutionProvider", "pip install onnxruntime-gpu instead of onnxruntime"),
                                ".onnx", "pip install onnxruntime-gpu"),
    "onnxruntime-tensorrt": Backend(lambda p, o: OrtRunner(p, providers=("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")),
                                    _ort_unavailable("TensorrtExecutionProvider", "onnxruntime-gpu built with TensorRT, and TensorRT's libraries"),
                                    ".onnx", "onnxruntime-gpu with TensorRT"),
    "openvino-cpu": Backend(_make_openvino, _openvino_unavailable, ".onnx", "pip install 'tledge[openvino]'"),
    "tensorrt": Backend(_make_tensorrt, _tensorrt_unavailable, ".engine", "tensorrt"),
    "torch-cpu": Backend(_make_torch("cpu"), _torch_unavailable(False), ".pt (a tledge checkpoint)", "pip install 'tledge[train]'"),
    "torch-cuda": Backend(_make_torch("cuda"), _torch_unavailable(True), ".pt (a tledge checkpoint)", "torch with CUDA"),
}


def backend_unavailable(name: str) -> str | None:
    """Why backend ``name`` cannot run on this machine, or None when it can (nothing heavy is loaded to find out)."""
    if name not in BACKENDS:
        return f"unknown backend {name!r}; tledge knows {', '.join(BACKENDS)}"
    return BACKENDS[name].unavailable()


def make_runner(variant: Variant):
    """The runner of ``variant``; a clear error when its backend cannot run here or its file does not exist."""
    reason = backend_unavailable(variant.backend)
    if reason:
        raise TledgeError(f"{variant.name}: backend {variant.backend} cannot run here: {reason}")
    if not variant.path.is_file():
        raise TledgeError(f"{variant.name}: {variant.path} does not exist")
    return BACKENDS[variant.backend].make(variant.path, dict(variant.options))
