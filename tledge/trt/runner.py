"""A TensorRT engine behind the runner interface of :mod:`tledge.runners.backends`: ``runner(x) -> logits``.

Only the name-based I/O API (``num_io_tensors``, ``get_tensor_name``, ``set_input_shape``,
``set_tensor_address``, ``execute_async_v3``), which exists from TensorRT 8.5 on; the binding-index API is gone
in 10.0. Device memory and the stream come from :class:`tledge.cuda.Cudart` (ctypes), so no torch or pycuda is
needed on the device. Buffers grow to the largest batch seen and are reused.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from tledge.errors import TledgeError, require


class TrtRunner:
    name = "tensorrt"

    def __init__(self, path, trt=None, cuda=None, here=None):
        """``trt``, ``cuda`` (a :class:`tledge.cuda.Cudart`) and ``here`` (a :class:`tledge.release.verify.Here`) default
        to this machine's; tests pass stand-ins."""
        from tledge.cuda import Cudart
        from tledge.trt.compat import engine_mismatch, this_machine
        from tledge.trt.engine import TRT_INSTALL, engine_record, trt_logger

        self.path = Path(path)
        self.record = engine_record(self.path)
        if self.record is None:
            raise TledgeError(f"{self.path} has no record in engine.json beside it; build engines with `tledge engine`")
        trt = trt or require("tensorrt", TRT_INSTALL)
        here = here or this_machine()
        why = engine_mismatch(self.record, here)
        if why:  # TensorRT's own message for this is a deserialization error that names neither version nor GPU
            raise TledgeError(f"{self.path.name} cannot run here: {why}; rebuild it on this device with `tledge engine`")
        self.trt = trt
        self.logger = trt_logger(trt)
        self.runtime = trt.Runtime(self.logger)
        if self.record.get("version_compatible"):
            self.runtime.engine_host_code_allowed = True  # a version-compatible engine carries its own runtime code
        if self.record.get("dla_core") is not None:
            self.runtime.DLA_core = int(self.record["dla_core"])  # must be set before the engine is deserialized
        self.engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise TledgeError(f"TensorRT cannot load {self.path.name}: {'; '.join(self.logger.errors[-2:]) or 'no reason given'}")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        if len(self.inputs) != 1 or not self.outputs:
            raise TledgeError(f"{self.path.name} has inputs {self.inputs} and outputs {self.outputs}; tledge runs one image input to logits")
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self.cuda = cuda or Cudart()
        self.buffers = {}  # name -> (device pointer, bytes)

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, size = self.buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                self.cuda.free(ptr)
            ptr, size = self.cuda.malloc(nbytes), nbytes
            self.buffers[name] = (ptr, size)
        return ptr

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Logits of any number of images: more than the profile's largest batch run in chunks, fewer than its
        smallest (a static DLA batch) are padded with zeros and cut off again."""
        name = self.inputs[0]
        x = np.ascontiguousarray(x, dtype=self.dtypes[name])
        p = self.record["profile"]
        lo, hi = int(p["min"][0]), int(p["max"][0])
        if len(x) > hi:
            return self.run_batches(x, hi)
        if len(x) < lo:
            pad = np.zeros((lo - len(x), *x.shape[1:]), x.dtype)
            return self(np.concatenate([x, pad]))[: len(x)]
        if not self.context.set_input_shape(name, tuple(x.shape)):
            raise TledgeError(f"{self.path.name} takes input {p['opt'][1:]} per image in batches of {lo} to {hi}, got shape {x.shape}")
        ptr = self._buffer(name, x.nbytes)
        self.cuda.to_device(ptr, x)
        self.context.set_tensor_address(name, ptr)
        results = {}
        for out in self.outputs:
            host = np.empty(tuple(self.context.get_tensor_shape(out)), dtype=self.dtypes[out])
            self.context.set_tensor_address(out, self._buffer(out, host.nbytes))
            results[out] = host
        if not self.context.execute_async_v3(self.cuda.stream):
            raise TledgeError(f"TensorRT failed to run {self.path.name}: {'; '.join(self.logger.errors[-2:]) or 'no reason given'}")
        for out, host in results.items():
            self.cuda.to_host(host, self.buffers[out][0])
        self.cuda.synchronize()
        return results[self.outputs[0]].astype(np.float32, copy=False)

    def run_batches(self, x: np.ndarray, batch: int | None = None) -> np.ndarray:
        """Logits of every image in ``x``, at most the profile's largest batch at a time."""
        batch = min(batch or len(x), int(self.record["profile"]["max"][0]))
        return np.concatenate([self(x[i : i + batch]) for i in range(0, len(x), batch)])

    def describe(self) -> dict:
        r = self.record
        return {"backend": "tensorrt", "runtime": f"tensorrt {self.trt.__version__}", "device": r.get("gpu"),
                "precision": r.get("precision"), "int8_path": r.get("int8_path"), "dla_core": r.get("dla_core"),
                "profile": r.get("profile")}

    def close(self) -> None:
        for ptr, _ in self.buffers.values():
            self.cuda.free(ptr)
        self.buffers = {}
        if getattr(self, "cuda", None) is not None:
            self.cuda.close()
        self.context = self.engine = self.runtime = None


def time_engine(engine_path: Path, iterations: int = 200, warmup: int = 20) -> dict:
    """Latency of an engine on this device at its profile's opt batch (zeros in, no images needed): the
    container's quick check; ``tledge bench ENGINE --data`` measures accuracy and latency on real images."""
    import numpy as np

    from tledge.trt.runner import TrtRunner

    runner = TrtRunner(engine_path)
    try:
        shape = tuple(runner.record["profile"]["opt"])
        x = np.zeros(shape, np.float32)
        for _ in range(warmup):
            runner(x)
        times = []
        for _ in range(iterations):
            t = time.perf_counter()
            runner(x)
            times.append((time.perf_counter() - t) * 1000)
    finally:
        runner.close()
    p50, p90, p99 = (float(np.percentile(times, q)) for q in (50, 90, 99))
    return {"batch": shape[0], "iterations": iterations, "p50_ms": p50, "p90_ms": p90, "p99_ms": p99}
