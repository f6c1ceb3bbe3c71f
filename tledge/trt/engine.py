"""``tledge engine``: build a TensorRT engine from a bundle, on the device that will run it.

Every choice (INT8 path, flags, network creation, profile, DLA, compatibility) is made by
:func:`tledge.trt.plan.make_plan` as a plain function of the TensorRT version; this module only carries the plan
out, with the calls each supported version documents (8.5, 8.6, 10.x, 11.x), and records what it built in
``engine.json`` so that ``tledge bundle`` signs the engine and ``tledge verify`` can tell whether a device can
run it. ``trt`` is the ``tensorrt`` module; tests pass small modules with one version's API surface instead.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

from tledge.artifacts import read_json, sha256_file, write_bytes, write_json
from tledge.errors import TledgeError, require
from tledge.trt.plan import BuildPlan, Device, EngineConfig, check_opset, make_plan

ENGINE_RECORD = "engine.json"
TRT_INSTALL = "on a Jetson it comes with JetPack (python3-libnvinfer); elsewhere pip install 'tledge[tensorrt]'"


def default_timing_cache_dir() -> Path:
    from tledge.data.datasets import cache_dir

    return cache_dir() / "trt-timing"


def trt_logger(trt):
    """A TensorRT logger that keeps the errors (to name the failing layer) and passes warnings to stderr."""

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors = []

        def log(self, severity, msg):
            if severity in (trt.ILogger.INTERNAL_ERROR, trt.ILogger.ERROR):
                self.errors.append(str(msg))
            if severity in (trt.ILogger.INTERNAL_ERROR, trt.ILogger.ERROR, trt.ILogger.WARNING):
                print(f"tensorrt: {msg}", file=sys.stderr)

    return Logger()


def _cache_calibrator(trt, cache: bytes, batch: int):
    """A calibrator that hands TensorRT the bundle's calibration cache and has no images: if TensorRT asks for a
    batch, it did not accept the cache (TensorRT skips a cache of another version silently), and the build says so."""

    class CacheCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.asked_for_images = False

        def get_batch_size(self):
            return batch

        def get_batch(self, names):
            self.asked_for_images = True
            return None

        def read_calibration_cache(self):
            return cache

        def write_calibration_cache(self, cache):
            return None

    return CacheCalibrator()


def create_network(trt, builder, plan: BuildPlan):
    """The network as each version creates it: 8.x needs EXPLICIT_BATCH, 10.x takes 0, 11.x has no such flag."""
    if plan.network_call == "flag-explicit-batch":
        flags = 0
        for name in plan.network_flags:
            flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, name))
        return builder.create_network(flags)
    if plan.network_call == "zero":
        return builder.create_network(0)
    return builder.create_network()


def configure(trt, builder, config, plan: BuildPlan, cache: Optional[bytes], timing_cache: bytes):
    """Apply ``plan`` to a builder config; returns the calibrator (keep it alive until the build ends) or None."""
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace_bytes)
    for name in plan.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, name))
    profile = builder.create_optimization_profile()
    profile.set_shape(plan.input_name, *plan.profile)
    config.add_optimization_profile(profile)
    calibrator = None
    if plan.int8_path == "implicit":
        calibrator = _cache_calibrator(trt, cache, plan.profile[1][0])
        config.int8_calibrator = calibrator
        config.set_calibration_profile(profile)
    if plan.dla_core is not None:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = plan.dla_core
    if plan.hardware_compatibility:
        config.hardware_compatibility_level = getattr(trt.HardwareCompatibilityLevel, plan.hardware_compatibility)
    config.set_timing_cache(config.create_timing_cache(timing_cache), False)
    return calibrator


def parser_error(parser, onnx_path: Path, node_names: list, node_ops: list) -> TledgeError:
    """One error naming the failing ONNX node(s). TensorRT 8.5/8.6 give only the node's index; 10.x its name too."""
    lines = []
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        name = e.node_name() if hasattr(e, "node_name") else None
        op = e.node_operator() if hasattr(e, "node_operator") else None
        index = e.node()
        if not name and 0 <= index < len(node_names):
            name, op = node_names[index] or f"#{index}", op or node_ops[index]
        where = f"node {name!r} ({op})" if name else "the graph"
        lines.append(f"{where}: {e.desc()}")
    detail = "; ".join(lines) or "no detail given"
    return TledgeError(f"TensorRT cannot parse {onnx_path.name}: {detail}. An unsupported operator or opset needs a re-export "
                       "(`tledge export --opset 17`) or a newer TensorRT")


def _onnx_graph_info(path: Path):
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    return opset, [n.name for n in model.graph.node], [n.op_type for n in model.graph.node]


def this_device(builder=None) -> Device:
    from tledge.cuda import device_info

    info = device_info()
    if info is None:
        raise TledgeError("no NVIDIA GPU is visible (no driver or no device); in a container run it with --runtime nvidia (Jetson) or --gpus all")
    dla = int(getattr(builder, "num_DLA_cores", 0) or 0) if builder is not None else 0
    return Device(info["gpu"], info["compute_capability"], info["jetson"], dla)


def _checked_file(bundle: Path, manifest: dict, name: str) -> Path:
    """A bundle file whose sha256 matches the manifest (an engine is never built from a file that changed)."""
    path = bundle / name
    entry = next((a for a in manifest.get("artifacts", []) if a.get("path") == name), None)
    if entry is None:
        raise TledgeError(f"{bundle}/manifest.json does not sign {name}; re-run `tledge bundle` on the build folder")
    if not path.is_file():
        raise TledgeError(f"{path} is missing from the bundle")
    if sha256_file(path) != entry["sha256"]:
        raise TledgeError(f"{path} does not match its sha256 in manifest.json: the bundle was altered or damaged; copy it again")
    return path


def build_in_bundle(cfg: EngineConfig, trt=None, device: Optional[Device] = None) -> dict:
    """Build the engine ``cfg`` asks for into its bundle with this machine's TensorRT; returns its record (also in
    engine.json). The caller verified the bundle first and signs it again after (:func:`tledge.release.build_engine`)."""
    trt = trt or require("tensorrt", TRT_INSTALL)
    started = time.perf_counter()
    bundle = cfg.bundle
    manifest = read_json(bundle / "manifest.json")
    files = {a.get("path") for a in manifest.get("artifacts", [])}
    version = str(trt.__version__)
    logger = trt_logger(trt)
    builder = trt.Builder(logger)
    device = device or this_device(builder)
    plan = make_plan(cfg, version, device, manifest, files)

    onnx_path = _checked_file(bundle, manifest, plan.onnx)
    opset, node_names, node_ops = _onnx_graph_info(onnx_path)
    check_opset(opset, version)
    cache = _checked_file(bundle, manifest, plan.calibration_cache).read_bytes() if plan.calibration_cache else None
    if cache is not None:
        from tledge.quant.calibration_cache import DEFAULT_CALIBRATOR, parse_cache, retarget, version_code

        text = cache.decode("utf-8")
        header, _ = parse_cache(text)
        if header["version_code"] != version_code(version) or header["calibrator"] != DEFAULT_CALIBRATOR:
            # The scales are tledge's (from its statistics), not TensorRT's: only the header is bound to a version
            # and to the calibrator class that reads it (an IInt8EntropyCalibrator2 here).
            body = text.split("\n", 1)[1] if "\n" in text else ""
            cache = retarget(f"TRT-{header['version_code']}-{DEFAULT_CALIBRATOR}\n{body}", version).encode("utf-8")

    network = create_network(trt, builder, plan)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise parser_error(parser, onnx_path, node_names, node_ops)
    inputs = [network.get_input(i).name for i in range(network.num_inputs)]
    if plan.input_name not in inputs:
        raise TledgeError(f"{onnx_path.name} has inputs {inputs}, manifest.json names {plan.input_name!r}: the bundle is inconsistent")

    timing_dir = cfg.timing_cache_dir or default_timing_cache_dir()
    timing_path = timing_dir / plan.timing_cache
    timing = timing_path.read_bytes() if timing_path.is_file() else b""
    config = builder.create_builder_config()
    calibrator = configure(trt, builder, config, plan, cache, timing)
    serialized = builder.build_serialized_network(network, config)
    if calibrator is not None and calibrator.asked_for_images:
        raise TledgeError("TensorRT did not accept calibration.cache (it asked for calibration images instead); "
                          f"re-run `tledge quantize --trt-version {version}` and bundle again, or use --int8-path explicit")
    if serialized is None:
        detail = "; ".join(logger.errors[-3:]) or "TensorRT gave no reason"
        raise TledgeError(f"TensorRT could not build {plan.engine} from {plan.onnx}: {detail}")
    engine_path = write_bytes(bundle / plan.engine, bytes(serialized))
    write_bytes(timing_path, bytes(config.get_timing_cache().serialize()))

    from tledge.export.onnx_io import read_metadata
    from tledge.machine import package_version

    meta = read_metadata(onnx_path)
    record = {
        "path": plan.engine,
        "sha256": sha256_file(engine_path),
        "tensorrt": version,
        "gpu": device.gpu,
        "compute_capability": device.compute_capability,
        "jetson": device.jetson,
        "dla_core": plan.dla_core,
        "precision": plan.precision,
        "int8_path": plan.int8_path,
        "strongly_typed": plan.strongly_typed,
        "hardware_compatibility": plan.hardware_compatibility,
        "version_compatible": plan.version_compatible,
        "input": plan.input_name,
        "profile": {"min": list(plan.profile[0]), "opt": list(plan.profile[1]), "max": list(plan.profile[2])},
        "workspace_mib": cfg.workspace_mib,
        "from": {"onnx": plan.onnx, "onnx_sha256": sha256_file(onnx_path), "opset": opset,
                 **({"calibration_cache": plan.calibration_cache} if plan.calibration_cache else {})},
        "timing_cache": str(timing_path),
        "timing_cache_reused": bool(timing),
        "build_seconds": round(time.perf_counter() - started, 2),
        "notes": list(plan.notes),
        "builder_flags": list(plan.builder_flags),
        # What bench needs to score the engine like the ONNX it came from (it has no ONNX metadata of its own).
        "model": {"classes": meta["classes"], "preprocess": meta["preprocess"], "precision": f"tensorrt-{plan.precision}",
                  **({"splits_sha256": meta["splits_sha256"]} if "splits_sha256" in meta else {})},
        "versions": {"tensorrt": version, "tledge": package_version("tledge")},
    }
    _update_record(bundle, record)
    return record


def _update_record(bundle: Path, record: dict) -> None:
    """engine.json keeps every engine built into this bundle (one per device kind), newest build of a name wins."""
    path = bundle / ENGINE_RECORD
    old = read_json(path) if path.is_file() else {}
    engines = {k: v for k, v in (old.get("engines") or {}).items() if (bundle / k).is_file()}
    engines[record["path"]] = record
    write_json(path, {"stage": "engine", "engines": engines, "artifacts": sorted(engines) + [ENGINE_RECORD]})


def engine_record(engine_path: Path) -> Optional[dict]:
    """The record ``tledge engine`` wrote for this engine file (from engine.json beside it), or None."""
    path = Path(engine_path).parent / ENGINE_RECORD
    if not path.is_file():
        return None
    return (read_json(path).get("engines") or {}).get(Path(engine_path).name)
