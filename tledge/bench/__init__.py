"""Stages 5 and 6, bench and gate: accuracy, drift and latency of every variant side by side (:mod:`.benchmark`,
:mod:`.accuracy`, :mod:`.backends`), and the release gate (:mod:`.gate`, :mod:`.intervals`)."""

from tledge.bench.benchmark import BenchConfig, bench
from tledge.bench.gate import GateConfig, gate

__all__ = ["BenchConfig", "GateConfig", "bench", "gate"]
