"""Small ``tensorrt``-like modules, one per TensorRT line, with that line's documented Python API surface.

They exist to prove that ``tledge.trt.engine`` makes no call a version lacks: a name a version removed is absent here
(an ``AttributeError`` like the real module's), objects take no attribute their class does not have
(``__slots__``), and the builder reproduces the documented refusals (a Q/DQ network without the INT8 flag, a
calibrator on a Q/DQ network, precision flags on a strongly typed network, a cache of another version ignored).
What they do not do is build anything: the "engine" is a JSON record of the calls made, for the tests to read.

Sources per version: NVIDIA's Python API reference (8.5.x, 8.6.x, 10.x) and the TensorRT 11 migration notes as
summarised in shared/guide/tensorrt.md sections 1-2.
"""

from __future__ import annotations

import enum
import json
import types

import onnx

SURFACES = {
    "8.5.2": dict(network_flags=("EXPLICIT_BATCH", "EXPLICIT_PRECISION"), builder_flags=("FP16", "INT8", "GPU_FALLBACK", "STRICT_TYPES", "OBEY_PRECISION_CONSTRAINTS"),
                  build_engine=True, max_workspace_size=True, calibrators=True, hw_compat=False, parser_node_name=False, code=8502),
    "8.6.2": dict(network_flags=("EXPLICIT_BATCH", "EXPLICIT_PRECISION"), builder_flags=("FP16", "INT8", "GPU_FALLBACK", "OBEY_PRECISION_CONSTRAINTS", "VERSION_COMPATIBLE"),
                  build_engine=True, max_workspace_size=True, calibrators=True, hw_compat=True, parser_node_name=False, code=8602),
    "10.3.0": dict(network_flags=("EXPLICIT_BATCH", "STRONGLY_TYPED"), builder_flags=("FP16", "INT8", "BF16", "FP8", "GPU_FALLBACK", "VERSION_COMPATIBLE"),
                   build_engine=False, max_workspace_size=False, calibrators=True, hw_compat=True, parser_node_name=True, code=100300),
    "11.0.0": dict(network_flags=("STRONGLY_TYPED",), builder_flags=("GPU_FALLBACK", "VERSION_COMPATIBLE"),
                   build_engine=False, max_workspace_size=False, calibrators=False, hw_compat=True, parser_node_name=True, code=None),
}
UNSUPPORTED_OPS = {"NonZeroFancy"}  # an operator no parser version knows, to provoke a parse failure


def make_trt(version: str) -> types.ModuleType:
    s = SURFACES[version]
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version + ".1"  # the real ones carry a build number
    trt.calls = []
    trt.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", {n: i for i, n in enumerate(s["network_flags"])})
    trt.BuilderFlag = enum.Enum("BuilderFlag", {n: n for n in s["builder_flags"]})
    trt.MemoryPoolType = enum.Enum("MemoryPoolType", {"WORKSPACE": 0, "DLA_MANAGED_SRAM": 1})
    trt.DeviceType = enum.Enum("DeviceType", {"GPU": 0, "DLA": 1})
    if s["hw_compat"]:
        trt.HardwareCompatibilityLevel = enum.Enum("HardwareCompatibilityLevel", {"NONE": 0, "AMPERE_PLUS": 1})

    class ILogger:
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        def __init__(self):
            pass

    trt.ILogger = ILogger

    if s["calibrators"]:
        class IInt8EntropyCalibrator2:
            def __init__(self):
                trt.calls.append("IInt8EntropyCalibrator2.__init__")

        trt.IInt8EntropyCalibrator2 = IInt8EntropyCalibrator2

    strongly_typed_flag = 1 << trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED if "STRONGLY_TYPED" in s["network_flags"] else None

    class Tensor:
        __slots__ = ("name",)

        def __init__(self, name):
            self.name = name

    class Network:
        __slots__ = ("flags", "inputs", "has_qdq", "strongly_typed")

        def __init__(self, flags):
            self.flags, self.inputs, self.has_qdq = flags, [], False
            self.strongly_typed = version.startswith("11") or bool(strongly_typed_flag and flags & strongly_typed_flag)

        @property
        def num_inputs(self):
            return len(self.inputs)

        def get_input(self, i):
            return self.inputs[i]

    class ParserError:
        __slots__ = ("_desc", "_node", "_name", "_op")

        def __init__(self, desc, node, name, op):
            self._desc, self._node, self._name, self._op = desc, node, name, op

        def desc(self):
            return self._desc

        def node(self):
            return self._node

        def code(self):
            return 8

    if s["parser_node_name"]:
        ParserError.node_name = lambda self: self._name
        ParserError.node_operator = lambda self: self._op

    class OnnxParser:
        __slots__ = ("network", "errors")

        def __init__(self, network, logger):
            self.network, self.errors = network, []

        def parse_from_file(self, path):
            trt.calls.append("parse_from_file")
            model = onnx.load(path, load_external_data=False)
            for i, node in enumerate(model.graph.node):
                if node.op_type in UNSUPPORTED_OPS:
                    self.errors.append(ParserError(f"No importer registered for op: {node.op_type}", i, node.name, node.op_type))
                if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
                    self.network.has_qdq = True
            self.network.inputs = [Tensor(v.name) for v in model.graph.input]
            return not self.errors

        @property
        def num_errors(self):
            return len(self.errors)

        def get_error(self, i):
            return self.errors[i]

    class Profile:
        __slots__ = ("shapes",)

        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            self.shapes[name] = [list(lo), list(opt), list(hi)]

    class TimingCache:
        __slots__ = ("data",)

        def __init__(self, data):
            self.data = bytes(data)

        def serialize(self):
            return self.data + b"|" + version.encode()

    config_slots = ["flags", "pools", "profiles", "default_device_type", "DLA_core", "timing_cache", "calibration_profile"]
    if s["calibrators"]:
        config_slots.append("int8_calibrator")
    if s["max_workspace_size"]:
        config_slots.append("max_workspace_size")  # deprecated in 8.x, removed in 10.0
    if s["hw_compat"]:
        config_slots.append("hardware_compatibility_level")

    class BuilderConfig:
        __slots__ = tuple(config_slots)

        def __init__(self):
            self.flags, self.pools, self.profiles, self.timing_cache = set(), {}, [], None
            if s["calibrators"]:
                self.int8_calibrator = None

        def set_flag(self, flag):
            self.flags.add(flag.name)

        def set_memory_pool_limit(self, pool, size):
            self.pools[pool.name] = size

        def add_optimization_profile(self, profile):
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def create_timing_cache(self, data):
            return TimingCache(data)

        def set_timing_cache(self, cache, ignore_mismatch):
            self.timing_cache = cache
            return True

        def get_timing_cache(self):
            return self.timing_cache

    if s["calibrators"]:
        def set_calibration_profile(self, profile):
            self.calibration_profile = profile
        BuilderConfig.set_calibration_profile = set_calibration_profile

    class Builder:
        __slots__ = ("logger", "num_DLA_cores")

        def __init__(self, logger):
            self.logger, self.num_DLA_cores = logger, 0

        def create_network(self, flags=None):
            if flags is None and not version.startswith("11"):
                raise TypeError("create_network(): incompatible function arguments (this version wants flags)")
            trt.calls.append(f"create_network({'' if flags is None else flags})")
            return Network(flags or 0)

        def create_builder_config(self):
            return BuilderConfig()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            trt.calls.append("build_serialized_network")
            error = self._refusal(network, config)
            if error:
                self.logger.log(ILogger.ERROR, error)
                return None
            calibrator = getattr(config, "int8_calibrator", None)
            if calibrator is not None:
                cache = calibrator.read_calibration_cache()
                header = (cache or b"").split(b"\n", 1)[0].decode()
                if header != f"TRT-{s['code']}-EntropyCalibration2":
                    # TensorRT skips a cache of another version or calibrator silently and calibrates from images.
                    calibrator.get_batch(["input"])
                    self.logger.log(ILogger.ERROR, "Calibration failure occurred with no scaling factors detected.")
                    return None
            return json.dumps({"version": version, "flags": sorted(config.flags), "pools": config.pools,
                               "profiles": [p.shapes for p in config.profiles], "device": getattr(getattr(config, "default_device_type", None), "name", None),
                               "dla_core": getattr(config, "DLA_core", None), "calibrator": calibrator is not None,
                               "hardware_compatibility": getattr(getattr(config, "hardware_compatibility_level", None), "name", None),
                               "network_flags": network.flags, "strongly_typed": network.strongly_typed}).encode()

        @staticmethod
        def _refusal(network, config):
            precision = {"FP16", "INT8", "BF16", "FP8"} & config.flags
            if network.strongly_typed and precision:
                return f"precision flags {sorted(precision)} are not allowed on a strongly typed network"
            if network.has_qdq and not network.strongly_typed and "INT8" not in config.flags:
                return "int8 is not configured in the builder, but the network has Q/DQ layers"
            if network.has_qdq and getattr(config, "int8_calibrator", None) is not None:
                return "Calibration is only allowed when there are no Q/DQ layers"
            if getattr(config, "int8_calibrator", None) is not None and "INT8" not in config.flags:
                return "a calibrator was given without the INT8 flag"
            return None

    if s["build_engine"]:
        def build_engine(self, network, config):  # exists in 8.x (deprecated): tledge must never call it
            raise AssertionError("build_engine was called; it is removed in TensorRT 10")
        Builder.build_engine = build_engine

    trt.Builder = Builder
    trt.OnnxParser = OnnxParser
    _add_runtime(trt, version, s)
    return trt


def _add_runtime(trt, version: str, s: dict) -> None:
    """The runtime side: the name-based I/O API (8.5+); the binding-index API exists on 8.x only, and calling it
    fails the test. The "engine" computes logits[b, k] = mean(x[b]) * (k + 1) for a 3-class model, reading and
    writing the device addresses it is given (host memory in the tests), so a runner's copies are checked."""
    import ctypes

    import numpy as np

    trt.TensorIOMode = enum.Enum("TensorIOMode", {"NONE": 0, "INPUT": 1, "OUTPUT": 2})
    trt.DataType = enum.Enum("DataType", {"FLOAT": 0, "HALF": 1, "INT8": 2, "INT32": 3})
    trt.nptype = lambda dtype: {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32}[dtype.name]
    classes = 3

    class Context:
        __slots__ = ("engine", "shapes", "addresses")

        def __init__(self, engine):
            self.engine, self.shapes, self.addresses = engine, {}, {}

        def set_input_shape(self, name, shape):
            lo, _, hi = self.engine.profile
            ok = len(shape) == len(lo) and all(a <= d <= b for a, d, b in zip(lo, shape, hi))
            if ok:
                self.shapes[name] = tuple(shape)
            return ok

        def get_tensor_shape(self, name):
            return (self.shapes["input"][0], classes) if name == "logits" else self.shapes[name]

        def set_tensor_address(self, name, ptr):
            self.addresses[name] = ptr
            return True

        def execute_async_v3(self, stream_handle):
            shape = self.shapes["input"]
            n = int(np.prod(shape))
            x = np.frombuffer(ctypes.string_at(self.addresses["input"], n * 4), np.float32).reshape(shape)
            out = (x.reshape(shape[0], -1).mean(1)[:, None] * np.arange(1, classes + 1)).astype(np.float32)
            ctypes.memmove(self.addresses["logits"], out.ctypes.data, out.nbytes)
            trt.calls.append(f"execute_async_v3(batch {shape[0]})")
            return True

    class Engine:
        __slots__ = ("profile",)

        def __init__(self, profile):
            self.profile = profile

        @property
        def num_io_tensors(self):
            return 2

        def get_tensor_name(self, i):
            return ("input", "logits")[i]

        def get_tensor_mode(self, name):
            return trt.TensorIOMode.INPUT if name == "input" else trt.TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name):
            return trt.DataType.FLOAT

        def create_execution_context(self):
            return Context(self)

    if version.startswith("8"):
        def binding_api(self, *args):  # still in 8.x, gone in 10.0: tledge must never use it
            raise AssertionError("the binding-index API was called; it is removed in TensorRT 10")
        for name in ("get_binding_index", "get_binding_shape", "binding_is_input", "execute_async_v2"):
            setattr(Engine, name, binding_api)

    runtime_slots = ["logger", "DLA_core"] + (["engine_host_code_allowed"] if s["hw_compat"] else [])

    class Runtime:
        __slots__ = tuple(runtime_slots)

        def __init__(self, logger):
            self.logger = logger

        def deserialize_cuda_engine(self, data):
            record = json.loads(bytes(data))
            if record["version"] != version:
                self.logger.log(ILogger_ERROR, "The engine plan file is not compatible with this version of TensorRT")
                return None
            profile = record["profiles"][0]["input"]
            return Engine(tuple(tuple(p) for p in profile))

    ILogger_ERROR = trt.ILogger.ERROR
    trt.Runtime = Runtime
