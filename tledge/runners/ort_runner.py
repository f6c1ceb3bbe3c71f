"""An ONNX model behind the runner interface: ``runner(x) -> logits`` on a float32 NCHW batch, ``describe()``
and ``close()``. With ``simulate_int8`` its Q/DQ pairs run as float ops: the arithmetic TensorRT computes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tledge.errors import TledgeError, require


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
