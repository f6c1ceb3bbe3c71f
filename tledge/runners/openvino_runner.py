"""An ONNX model on OpenVINO's CPU plugin, behind the same small interface as :class:`OrtRunner`.

OpenVINO reads the CPU INT8 model's Q/DQ graph as it is and runs its int8 layers on its own (oneDNN) kernels. On an
AVX-512/VNNI Xeon these are faster than ONNX Runtime's for depthwise convolutions: tledge's CPU model of
EfficientNet-Lite0 at 224 px ran 2.10x FP32 there against 1.87x on ONNX Runtime (bench/RESULTS.md).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tledge.errors import TledgeError, require

INSTALL = "pip install 'tledge[openvino]'   (or: pip install openvino)"


class OpenVinoRunner:
    """``path`` compiled for OpenVINO's CPU plugin: one stream and the latency hint (batch-1 serving), float32
    for whatever is not int8. ``threads=None`` lets OpenVINO use every core."""

    name = "openvino"

    def __init__(self, path, threads: int | None = None):
        ov = require("openvino", INSTALL)
        path = Path(path)
        if not path.is_file():
            raise TledgeError(f"ONNX model {path} does not exist")
        config = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1", "INFERENCE_PRECISION_HINT": "f32"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = str(threads)
        try:
            self.compiled = ov.Core().compile_model(str(path), "CPU", config)
        except Exception as exc:  # OpenVINO raises its own RuntimeError types for a model it cannot read
            raise TledgeError(f"OpenVINO cannot load {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        self.request = self.compiled.create_infer_request()
        self.threads, self.path, self.version = threads, path, ov.__version__

    def __call__(self, x: np.ndarray) -> np.ndarray:
        # copy: the request reuses its output buffer on the next call
        return self.request.infer([np.ascontiguousarray(x, dtype=np.float32)])[0].copy()

    def run_batches(self, x: np.ndarray, batch: int = 32) -> np.ndarray:
        """Logits of every image in ``x``, run ``batch`` at a time."""
        return np.concatenate([self(x[i : i + batch]) for i in range(0, len(x), batch)])

    def describe(self) -> dict:
        return {"backend": "openvino-cpu", "runtime": f"openvino {self.version} CPU", "threads": self.threads or "openvino default",
                "arithmetic": "optimized (OpenVINO's int8 kernels)"}

    def close(self) -> None:
        self.request = self.compiled = None
