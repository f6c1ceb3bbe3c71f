"""What a model saw and said, gathered batch by batch: per-image input statistics, the embedding its classifier reads
and its logits. :class:`ModelTap` runs an ONNX model of a bundle with that embedding as a second output (in memory;
the file is not changed); :class:`Monitor` collects a running service's batches and gives a verdict on demand.

numpy and ONNX Runtime only (the device install).
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional

import numpy as np

from tledge.errors import TledgeError
from tledge.monitor.drift import compare
from tledge.monitor.reference import check_reference, image_stats

# Ops that can stand between the pooled features and the classifier (a Q/DQ or CPU INT8 model adds some).
_PASS_THROUGH = {"Flatten", "Reshape", "Identity", "DequantizeLinear", "QuantizeLinear", "Squeeze"}


def embedding_output(model) -> Optional[str]:
    """The float tensor the classifier (the last Gemm/MatMul before the graph's output) reads, or None.

    For a Q/DQ model that is the DequantizeLinear output in front of the Gemm; for an ONNX Runtime INT8 model,
    whose classifier is a QLinearMatMul/QGemm, the float tensor before its input's QuantizeLinear.
    """
    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name for i in model.graph.initializer}
    node = producer.get(model.graph.output[0].name)
    seen = 0
    while node is not None and seen < 8:  # a few pass-through ops at most between classifier and output
        seen += 1
        if node.op_type in ("Gemm", "MatMul", "QGemm", "QLinearMatMul"):
            tensor = node.input[0]
            # walk back over Q/DQ/reshape ops to the float tensor that feeds them
            back = producer.get(tensor)
            while back is not None and back.op_type in _PASS_THROUGH and back.input and back.input[0] not in inits:
                tensor = back.input[0]
                back = producer.get(tensor)
            return tensor
        if node.op_type not in _PASS_THROUGH | {"Add"} or not node.input:
            return None
        node = producer.get(node.input[0])
    return None


class ModelTap:
    """An ONNX model whose run returns ``(logits, embedding or None)``; its inputs' statistics come with them."""

    def __init__(self, path, threads: Optional[int] = None):
        from tledge.export.onnx_io import load_onnx
        from tledge.runners.ort_runner import OrtRunner

        proto = load_onnx(path)
        self.embedding_name = embedding_output(proto)
        if self.embedding_name is not None and self.embedding_name not in {o.name for o in proto.graph.output}:
            import onnx

            proto.graph.output.append(onnx.helper.make_tensor_value_info(self.embedding_name, onnx.TensorProto.FLOAT, None))
        self.runner = OrtRunner(proto, threads=threads)
        self.outputs = [self.runner.output_name] + ([self.embedding_name] if self.embedding_name else [])

    def __call__(self, x: np.ndarray):
        results = self.runner.session.run(self.outputs, {self.runner.input_name: np.ascontiguousarray(x, dtype=np.float32)})
        embedding = results[1].reshape(len(x), -1) if len(results) > 1 else None
        return results[0], embedding


class Monitor:
    """For a running service: ``observe`` each batch (model inputs and logits, optionally embeddings, or only the
    predicted classes and confidences of a log), then ``verdict()`` compares everything seen with the reference.

    Memory stays small: per image two numbers per channel, the logits and the projected embedding's source.
    """

    def __init__(self, reference: Any):
        self.reference = check_reference(reference)
        self._stats: List[Dict[str, np.ndarray]] = []
        self._logits: List[np.ndarray] = []
        self._embeddings: List[np.ndarray] = []
        self._predictions: List[Any] = []
        self._confidences: List[float] = []

    def observe(self, inputs=None, logits=None, embeddings=None, predictions=None, confidences=None) -> None:
        if inputs is not None or logits is not None:
            if inputs is None or logits is None:
                raise TledgeError("observe() takes model inputs and logits together (or predictions and confidences)")
            stats = image_stats(inputs)
            if len(stats["channel_mean"]) != len(logits):
                raise TledgeError(f"{len(stats['channel_mean'])} inputs but {len(logits)} rows of logits")
            self._stats.append(stats)
            self._logits.append(np.asarray(logits, np.float64))
            if embeddings is not None:
                self._embeddings.append(np.asarray(embeddings, np.float64).reshape(len(logits), -1))
        if predictions is not None:
            if confidences is None or len(confidences) != len(predictions):
                raise TledgeError("observe() needs one confidence per prediction")
            self._predictions += list(predictions)
            self._confidences += [float(c) for c in confidences]

    def verdict(self, thresholds: Optional[Mapping[str, Any]] = None) -> dict:
        if self._logits:
            stats = {k: np.concatenate([s[k] for s in self._stats]) for k in self._stats[0]}
            emb = np.concatenate(self._embeddings) if self._embeddings and len(self._embeddings) == len(self._logits) else None
            return compare(self.reference, stats, emb, np.concatenate(self._logits), thresholds=thresholds)
        if self._predictions:
            return compare(self.reference, predictions=self._predictions, confidences=self._confidences, thresholds=thresholds)
        raise TledgeError("nothing observed yet: pass batches to observe() before asking for a verdict")
