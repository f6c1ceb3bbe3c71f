"""Stage 4, engine: TensorRT build plans as plain functions of the version (:mod:`.plan`), the build itself with the
fewest TensorRT calls (:mod:`.engine`), an engine behind the runner interface (:mod:`.runner`), and whether an
engine can run on this machine (:mod:`.compat`). Nothing here imports tensorrt until it is used."""

from tledge.trt.plan import EngineConfig, make_plan

__all__ = ["EngineConfig", "make_plan"]
