"""Backends behind one small interface, and a registry that makes them by name.

A runner maps a float32 NCHW batch to a logits array (``runner(x)``), says what it is (``describe()``) and lets go
of what it holds (``close()``). A :class:`Variant` names a model file, a backend and its options;
:func:`make_runner` builds its runner, and :func:`backend_unavailable` says, without building anything, why a
backend cannot run here (not installed, no GPU) so that callers skip it with that reason instead of crashing.

Each backend's heavy import happens when a runner is made, never when tledge is imported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from tledge.errors import TledgeError, require


class TorchRunner:
    """A PyTorch module in eval mode, on the CPU or a CUDA device."""

    name = "torch"

    def __init__(self, model, device: str = "cpu"):
        self.device = device
        self.model = model.eval().to(device)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            out = self.model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device))
            if self.device != "cpu":
                torch.cuda.synchronize()
            return out.cpu().numpy()

    def describe(self) -> dict:
        import torch

        info = {"backend": f"torch-{'cpu' if self.device == 'cpu' else 'cuda'}", "runtime": f"torch {torch.__version__}", "device": self.device}
        if self.device != "cpu":
            info["gpu_memory_peak_mb"] = round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
        return info

    def close(self) -> None:
        self.model = None


class OrtRunner:
    """An ONNX model in ONNX Runtime. ``threads=None`` lets ONNX Runtime use every core.

    ``simulate_int8=True`` turns graph optimizations off, so a Q/DQ model runs as written: every
    DequantizeLinear, convolution and QuantizeLinear in float. That is the arithmetic of an int8 engine that
    accumulates in int32 (TensorRT, VNNI, ARM), up to float rounding, whatever this CPU's int8 kernels do. With
    optimizations on (the default) ONNX Runtime fuses Q/DQ into this CPU's own int8 kernels.
    """

    name = "onnxruntime"

    def __init__(self, path, threads: int | None = None, providers: tuple[str, ...] = ("CPUExecutionProvider",),
                 simulate_int8: bool = False, spinning: bool = True):
        """``path``: an ONNX file, or an in-memory ``onnx.ModelProto`` (an edited model that was never saved).

        ``spinning=False`` makes ONNX Runtime's worker threads sleep as soon as a run ends instead of spinning
        for more work: two sessions timed in turn then do not steal each other's cores."""
        ort = require("onnxruntime", "pip install onnxruntime   (or onnxruntime-gpu)")
        in_memory = hasattr(path, "SerializeToString")
        source = path.SerializeToString() if in_memory else str(path)
        path = None if in_memory else Path(path)
        if path is not None and not path.is_file():
            raise TledgeError(f"ONNX model {path} does not exist")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only; ORT's warnings about unused initializers are noise here
        if simulate_int8:
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        self.simulate_int8 = simulate_int8
        if not spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        missing = [p for p in providers if p not in ort.get_available_providers()]
        if missing:
            raise TledgeError(f"ONNX Runtime here has no {missing}; available: {ort.get_available_providers()}")
        try:
            self.session = ort.InferenceSession(source, options, providers=list(providers))
        except Exception as exc:  # ORT raises its own exception types for a corrupt or unsupported model
            raise TledgeError(f"ONNX Runtime cannot load {path or 'the model'}: {str(exc).splitlines()[0]}") from None
        self.input = self.session.get_inputs()[0]
        self.output_name = self.session.get_outputs()[0].name
        self.path = path

    @property
    def input_name(self) -> str:
        return self.input.name

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input.name: np.ascontiguousarray(x, dtype=np.float32)})[0]

    def run_batches(self, x: np.ndarray, batch: int = 32) -> np.ndarray:
        """Logits of every image in ``x``, run ``batch`` at a time (memory stays bounded on large arrays)."""
        return np.concatenate([self(x[i : i + batch]) for i in range(0, len(x), batch)])

    def describe(self) -> dict:
        import onnxruntime

        provider = self.session.get_providers()[0]
        backend = {"CPUExecutionProvider": "onnxruntime-cpu", "CUDAExecutionProvider": "onnxruntime-cuda",
                   "TensorrtExecutionProvider": "onnxruntime-tensorrt"}.get(provider, provider)
        options = self.session.get_session_options()
        return {"backend": backend, "runtime": f"onnxruntime {onnxruntime.__version__} {provider}",
                "threads": options.intra_op_num_threads or "onnxruntime default",
                "arithmetic": "simulated int8 (graph optimizations off)" if self.simulate_int8 else "optimized"}

    def close(self) -> None:
        self.session = None


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
