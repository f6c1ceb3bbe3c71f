"""Which TensorRT path, which flags and which API calls, as plain functions of the TensorRT version.

Nothing here imports TensorRT: :func:`make_plan` turns an :class:`EngineConfig`, the installed TensorRT version
and what the device has (DLA cores, Jetson or not, compute capability) into a :class:`BuildPlan` that names every
choice, and :mod:`tledge.trt.engine` carries it out with the fewest possible TensorRT calls. The rules
(tensorrt.md sections 1-4, NVIDIA's API docs per release):

* INT8 **explicit** (the Q/DQ ONNX): 8.5 and later, the only INT8 path on 11.x. Weakly typed networks (8.x, 10.x)
  need ``BuilderFlag.INT8`` or TensorRT refuses the Q/DQ layers; a Q/DQ network never gets a calibrator.
  On 11.x every network is strongly typed: no precision flags at all (they were removed).
* INT8 **implicit** (the FP32 ONNX plus ``calibration.cache``): 8.5 to 10.x (deprecated from 10.1), through a
  calibrator whose ``read_calibration_cache`` returns the cache. DLA on 8.x takes only this path.
* Network creation: 8.x ``create_network(1 << EXPLICIT_BATCH)``; 10.x ``create_network(0)``; 11.x
  ``create_network()`` (the name ``EXPLICIT_BATCH`` no longer exists).
* Workspace by ``set_memory_pool_limit(WORKSPACE, bytes)`` (``max_workspace_size`` is gone in 10.0); the engine by
  ``build_serialized_network`` (``build_engine`` is gone in 10.0).
* DLA: FP16/INT8 only, static shapes, GPU fallback on; hardware compatibility (Ampere+) and version compatibility
  from 8.6, hardware compatibility not on a Jetson.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Tuple

from tledge.errors import TledgeError

PRECISIONS = ("int8", "fp16", "fp32")
INT8_PATHS = ("auto", "explicit", "implicit")
# Newest ONNX opset each TensorRT line is known to parse (tensorrt.md section 4); None: no limit known here.
MAX_OPSET = {(8, 5): 17, (8, 6): 17, (10, 0): 20, (10, 1): 20}
MAX_OPSET_11 = 25


@dataclass(frozen=True, order=True)
class TrtVersion:
    major: int
    minor: int
    patch: int = 0

    @classmethod
    def parse(cls, text: str) -> "TrtVersion":
        """``"10.3.0.30"`` -> 10.3.0; anything older than 8.5 is refused (tledge's oldest target, JetPack 5.1)."""
        match = re.match(r"^\s*(\d+)\.(\d+)(?:\.(\d+))?", str(text))
        if match is None:
            raise TledgeError(f"TensorRT version must look like 8.5.2 or 10.3.0, got {text!r}")
        version = cls(int(match.group(1)), int(match.group(2)), int(match.group(3) or 0))
        if (version.major, version.minor) < (8, 5):
            raise TledgeError(f"TensorRT {version} is older than 8.5 (JetPack 5.1), the oldest version tledge builds for")
        return version

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"

    @property
    def line(self) -> Tuple[int, int]:
        return self.major, self.minor


@dataclass(frozen=True)
class Device:
    """What the build machine is, as far as the plan cares (filled from CUDA by :func:`tledge.cuda.device_info`)."""

    gpu: str  # e.g. "NVIDIA H100 80GB HBM3", "Orin"
    compute_capability: str  # "8.7"
    jetson: Optional[dict] = None  # {"l4t": "R36 (release), REVISION: 4.0", "jetpack": "6.1"} on a Jetson
    dla_cores: int = 0

    def tag(self) -> str:
        """A file-name-safe id of the GPU model: engines and timing caches are valid for one GPU model only."""
        name = re.sub(r"^nvidia[ _-]*", "", self.gpu.strip(), flags=re.I)
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"
        return f"{slug}-sm{self.compute_capability.replace('.', '')}"


@dataclass(frozen=True)
class EngineConfig:
    """Settings for :func:`tledge.trt.engine.build_engine`.

    ``batch`` is the optimization profile of the batch axis (min, opt, max); None takes 1, 1 and the bundle's
    ``max_batch``. ``dla_core`` None builds for the GPU. The engine goes into the bundle folder, named after its
    precision, GPU model and TensorRT version, so one bundle can carry engines for several devices.
    """

    bundle: Path
    precision: str = "int8"
    int8_path: str = "auto"  # auto: explicit Q/DQ, except DLA on TensorRT 8.x (implicit, from calibration.cache)
    batch: Optional[Tuple[int, int, int]] = None
    dla_core: Optional[int] = None
    workspace_mib: int = 1024
    hardware_compatible: bool = False  # one engine for every Ampere-or-newer datacenter GPU (8.6+, not Jetson)
    version_compatible: bool = False  # loadable by later TensorRT versions (8.6+)
    timing_cache_dir: Optional[Path] = None  # default: $TLEDGE_CACHE/trt-timing

    def __post_init__(self):
        object.__setattr__(self, "bundle", Path(self.bundle))
        if self.timing_cache_dir is not None:
            object.__setattr__(self, "timing_cache_dir", Path(self.timing_cache_dir))
        if self.precision not in PRECISIONS:
            raise TledgeError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.int8_path not in INT8_PATHS:
            raise TledgeError(f"--int8-path must be one of {', '.join(INT8_PATHS)}, got {self.int8_path!r}")
        if self.batch is not None:
            b = tuple(int(v) for v in self.batch)
            if len(b) != 3 or b[0] < 1 or not b[0] <= b[1] <= b[2]:
                raise TledgeError(f"--batch takes min,opt,max with 1 <= min <= opt <= max, got {','.join(map(str, self.batch))}")
            object.__setattr__(self, "batch", b)
        if self.dla_core is not None and self.dla_core < 0:
            raise TledgeError(f"--dla takes a DLA core number (0 or 1), got {self.dla_core}")
        if self.workspace_mib < 1:
            raise TledgeError(f"--workspace takes MiB (at least 1), got {self.workspace_mib}")


@dataclass(frozen=True)
class BuildPlan:
    """Every choice of one engine build; :mod:`tledge.trt.engine` only carries it out."""

    trt_version: str
    precision: str
    onnx: str  # the bundle file TensorRT parses
    int8_path: Optional[str]  # "explicit", "implicit" or None (no INT8)
    strongly_typed: bool
    network_call: str  # "flag-explicit-batch" (8.x), "zero" (10.x), "no-argument" (11.x)
    network_flags: Tuple[str, ...]  # NetworkDefinitionCreationFlag names to OR in
    builder_flags: Tuple[str, ...]  # BuilderFlag names to set
    calibration_cache: Optional[str]  # bundle file read by the calibrator (implicit path only)
    input_name: str
    profile: Tuple[Tuple[int, ...], Tuple[int, ...], Tuple[int, ...]]  # min, opt, max input shapes
    workspace_bytes: int
    dla_core: Optional[int]
    hardware_compatibility: Optional[str]  # HardwareCompatibilityLevel name
    version_compatible: bool
    timing_cache: str  # file name: one per GPU model and TensorRT version
    engine: str  # file name in the bundle
    notes: Tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return asdict(self)


def _max_opset(v: TrtVersion) -> Optional[int]:
    return MAX_OPSET_11 if v.major >= 11 else MAX_OPSET.get(v.line)


def check_opset(opset: int, trt_version: str) -> None:
    """A clear error before parsing when the ONNX opset is newer than this TensorRT reads."""
    v = TrtVersion.parse(trt_version)
    limit = _max_opset(v)
    if limit is not None and opset > limit:
        raise TledgeError(f"the ONNX model has opset {opset}; TensorRT {v} reads opsets up to {limit}. "
                          f"Re-export it with `tledge export --opset {min(limit, 17)}`")


def engine_name(precision: str, device: Device, trt_version: str, dla_core: Optional[int] = None, portable: bool = False) -> str:
    """``model.int8.orin-sm87.trt10.3.0.engine``: a bundle may carry engines for several devices side by side."""
    target = "ampere-plus" if portable else device.tag()
    return f"model.{precision}.{target}.trt{TrtVersion.parse(trt_version)}{f'.dla{dla_core}' if dla_core is not None else ''}.engine"


def timing_cache_name(device: Device, trt_version: str) -> str:
    return f"timing-{device.tag()}-trt{TrtVersion.parse(trt_version)}.cache"


def make_plan(cfg: EngineConfig, trt_version: str, device: Device, manifest: dict, files: set) -> BuildPlan:
    """The plan for ``cfg`` on this device and TensorRT, or a :class:`TledgeError` saying why it cannot be built.

    ``manifest`` is the bundle's ``manifest.json`` (input name and shape, max batch); ``files`` the names of the
    files the bundle holds.
    """
    v = TrtVersion.parse(trt_version)
    notes = []
    dla = cfg.dla_core
    if dla is not None:
        if device.dla_cores == 0:
            raise TledgeError(f"--dla {dla}: this device ({device.gpu}) has no DLA (Orin Nano and discrete GPUs have none); build for the GPU without --dla")
        if dla >= device.dla_cores:
            raise TledgeError(f"--dla {dla}: this device has {device.dla_cores} DLA core(s), numbered from 0")
        if cfg.precision == "fp32":
            raise TledgeError("DLA runs FP16 and INT8 only: use --precision int8 or fp16 with --dla")
    if cfg.hardware_compatible:
        if v.line < (8, 6):
            raise TledgeError(f"--hardware-compatible needs TensorRT 8.6 or later (this is {v})")
        if device.jetson is not None:
            raise TledgeError("--hardware-compatible is not supported on Jetson: build the engine on the device it runs on")
        if float(device.compute_capability) < 8.0:
            raise TledgeError(f"--hardware-compatible builds for Ampere and newer (compute capability 8.0+); this GPU is {device.compute_capability}")
        if dla is not None:
            raise TledgeError("--hardware-compatible and --dla cannot be combined")
    if cfg.version_compatible and v.line < (8, 6):
        raise TledgeError(f"--version-compatible needs TensorRT 8.6 or later (this is {v})")

    # Precision and INT8 path.
    strongly_typed = v.major >= 11
    flags = []
    int8_path, cache = None, None
    if cfg.precision == "int8":
        int8_path = cfg.int8_path
        if int8_path == "auto":
            int8_path = "implicit" if (dla is not None and v.major == 8) else "explicit"
            if int8_path == "implicit":
                notes.append("DLA on TensorRT 8.x does not take Q/DQ: implicit INT8 from calibration.cache (layers without a scale run in FP16)")
        if int8_path == "implicit":
            if v.major >= 11:
                raise TledgeError(f"TensorRT {v} has no implicit INT8 (calibrators were removed in 11.0): use --int8-path explicit (the Q/DQ model)")
            if "calibration.cache" not in files:
                raise TledgeError("implicit INT8 needs calibration.cache in the bundle; re-run `tledge quantize` (it writes one) or use --int8-path explicit")
            if "model.fp32.onnx" not in files:
                raise TledgeError("implicit INT8 needs model.fp32.onnx in the bundle")
            onnx_file, cache = "model.fp32.onnx", "calibration.cache"
            flags.append("INT8")
            if v.major == 10:
                notes.append(f"implicit INT8 is deprecated in TensorRT {v}; the Q/DQ model (--int8-path explicit) is the lasting path")
        else:
            if dla is not None and v.major == 8:
                raise TledgeError(f"DLA on TensorRT {v} does not take a Q/DQ (explicit INT8) network: use --int8-path implicit (calibration.cache)")
            if "model.int8.qdq.onnx" not in files:
                raise TledgeError("explicit INT8 needs model.int8.qdq.onnx in the bundle; re-run `tledge quantize --target tensorrt`")
            onnx_file = "model.int8.qdq.onnx"
            if not strongly_typed:
                flags.append("INT8")  # without it TensorRT rejects the Q/DQ layers ("int8 is not configured")
        if dla is not None and not strongly_typed:
            flags.append("FP16")  # DLA runs the layers that have no INT8 scale in FP16
    else:
        if "model.fp32.onnx" not in files:
            raise TledgeError("the bundle has no model.fp32.onnx")
        onnx_file = "model.fp32.onnx"
        if cfg.precision == "fp16":
            if strongly_typed:
                raise TledgeError(f"TensorRT {v} builds strongly typed networks only: FP16 needs an FP16 ONNX, and the bundle's is FP32. "
                                  "Use --precision int8 (the Q/DQ model) or fp32")
            flags.append("FP16")
    if dla is not None:
        flags.append("GPU_FALLBACK")
    if cfg.version_compatible:
        flags.append("VERSION_COMPATIBLE")

    if v.major == 8:
        network_call, network_flags = "flag-explicit-batch", ("EXPLICIT_BATCH",)
    elif v.major == 10:
        network_call, network_flags = "zero", ()
    else:
        network_call, network_flags = "no-argument", ()

    # Optimization profile of the batch axis.
    inp = manifest.get("input") or {}
    name, shape = inp.get("name"), inp.get("shape")
    if not name or not isinstance(shape, list) or len(shape) < 2:
        raise TledgeError("manifest.json has no input name and shape; re-run `tledge bundle` on the build folder")
    max_batch = int(inp.get("max_batch") or 8)
    batch = cfg.batch or (1, 1, max_batch)
    if batch[2] > max_batch:
        raise TledgeError(f"--batch max {batch[2]} is larger than the ONNX model's largest batch ({max_batch})")
    if dla is not None and not batch[0] == batch[1] == batch[2]:
        raise TledgeError(f"DLA needs a static shape: give --batch N,N,N (got {','.join(map(str, batch))})")
    dims = tuple(int(d) for d in shape[1:])
    profile = tuple((b, *dims) for b in batch)

    return BuildPlan(
        trt_version=str(v), precision=cfg.precision, onnx=onnx_file, int8_path=int8_path, strongly_typed=strongly_typed,
        network_call=network_call, network_flags=network_flags, builder_flags=tuple(flags), calibration_cache=cache,
        input_name=name, profile=profile, workspace_bytes=cfg.workspace_mib << 20, dla_core=dla,
        hardware_compatibility="AMPERE_PLUS" if cfg.hardware_compatible else None, version_compatible=cfg.version_compatible,
        timing_cache=timing_cache_name(device, str(v)),
        engine=engine_name(cfg.precision, device, str(v), dla, cfg.hardware_compatible),
        notes=tuple(notes),
    )
