"""An ONNX model on OpenVINO's CPU plugin, behind the same small interface as :class:`OrtRunner`.

OpenVINO reads the CPU INT8 model's Q/DQ graph as it is and runs its int8 layers on its own (oneDNN) kernels. On an
AVX-512/VNNI Xeon these are faster than ONNX Runtime's for depthwise convolutions: tledge's CPU model of
EfficientNet-Lite0 at 224 px ran 2.10x FP32 there against 1.87x on ONNX Runtime (bench/RESULTS.md).

The CPU model's stem reads its colour channels padded to four, a layout only ONNX Runtime's x86 kernels need
(tledge/quant/cpu_kernels.py). OpenVINO would run that ``Pad`` as a reference float op of its own, so the runner drops
it, and the zero weights it fed, before compiling: :func:`drop_input_channel_padding`, exact by construction.
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
        core, self.unpadded = ov.Core(), []
        try:
            model = str(path)
            proto = _read_onnx(path)
            if proto is not None and (unpadded := drop_input_channel_padding(proto)):
                self.unpadded, model = unpadded, core.read_model(proto.SerializeToString())
            self.compiled = core.compile_model(model, "CPU", config)
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
        info = {"backend": "openvino-cpu", "runtime": f"openvino {self.version} CPU", "threads": self.threads or "openvino default",
                "arithmetic": "optimized (OpenVINO's int8 kernels)"}
        if self.unpadded:
            info["graph"] = f"input channel padding dropped before {', '.join(self.unpadded)} (ONNX Runtime's layout only; exact)"
        return info

    def close(self) -> None:
        self.request = self.compiled = None


def _read_onnx(path: Path):
    """The ONNX model at ``path``, or None when onnx cannot read it (OpenVINO then says what is wrong with it)."""
    import onnx

    if path.suffix.lower() != ".onnx":
        return None
    try:
        return onnx.load(str(path))
    except Exception:
        return None


def drop_input_channel_padding(model) -> list[str]:
    """Undo :func:`tledge.quant.cpu_kernels.pad_input_channels` in place: the graph input's channel ``Pad`` goes, and the
    convolutions it fed get their weights' original channels back. Returns the convolutions changed; a model whose
    padded channels carry a non-zero weight, or any other ``Pad``, is left as it is (``[]``).

    Exact: a padded channel is constant zero before its quantizer and meets only zero weights, so it adds nothing.
    """
    from onnx import numpy_helper

    graph = model.graph
    if len(graph.input) != 1:
        return []
    source = graph.input[0].name
    readers = [n for n in graph.node if source in n.input]
    if len(readers) != 1 or readers[0].op_type != "Pad":
        return []
    pad = readers[0]
    inits = {i.name: i for i in graph.initializer}
    rank = len(graph.input[0].type.tensor_type.shape.dim)
    if len(pad.input) < 2 or pad.input[1] not in inits or rank < 2 or len(pad.input) > 2 and pad.input[2]:
        return []  # a constant value or axes input: not tledge's pattern
    if next((a.s for a in pad.attribute if a.name == "mode"), b"constant") != b"constant":
        return []
    pads = numpy_helper.to_array(inits[pad.input[1]])
    channels = graph.input[0].type.tensor_type.shape.dim[1].dim_value
    if pads.shape != (2 * rank,) or channels <= 0 or pads[rank + 1] <= 0 or np.count_nonzero(pads) != 1:
        return []
    quantizers = [n for n in graph.node if pad.output[0] in n.input]
    if not quantizers or any(q.op_type != "QuantizeLinear" or q.input[0] != pad.output[0] for q in quantizers):
        return []
    producer = {o: n for n in graph.node for o in n.output}
    quantized = {q.output[0] for q in quantizers}
    dequantizers = [n for n in graph.node if quantized & set(n.input)]
    if any(n.op_type != "DequantizeLinear" for n in dequantizers):
        return []  # every tensor that carries the padded channels must be rebuilt from the graph input
    dequantized = {n.output[0] for n in dequantizers}
    convs = [n for n in graph.node if dequantized & set(n.input)]
    if any(n.input[0] not in dequantized for n in convs):
        return []
    weights = []
    for conv in convs:
        wdq = producer.get(conv.input[1]) if conv.op_type == "Conv" and len(conv.input) > 1 else None
        w = inits.get(wdq.input[0]) if wdq is not None and wdq.op_type == "DequantizeLinear" else None
        if w is None or len(w.dims) != 4 or w.dims[1] <= channels:
            return []
        array = numpy_helper.to_array(w)
        if array[:, channels:].any() or sum(w.name in n.input for n in graph.node) != 1:
            return []
        weights.append((w, array))
    if not weights:
        return []
    for w, array in weights:
        w.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(array[:, :channels]), w.name))
    for q in quantizers:
        q.input[0] = source
    graph.node.remove(pad)
    if not any(pad.input[1] in n.input for n in graph.node):
        graph.initializer.remove(inits[pad.input[1]])
    return [c.name for c in convs]
