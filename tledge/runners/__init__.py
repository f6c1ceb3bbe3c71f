"""Models behind one interface, ``runner(x) -> logits`` on a float32 NCHW batch, and fair latency timing."""

from tledge.runners.ort_runner import OrtRunner
from tledge.runners.timing import interleaved_p50, percentiles, time_calls, timed_blocks
from tledge.runners.torch_runner import TorchRunner

__all__ = ["OrtRunner", "TorchRunner", "interleaved_p50", "percentiles", "time_calls", "timed_blocks"]
