"""TensorRT's INT8 calibration cache, for implicit quantization (TensorRT 8.5 to 10.x; DLA on 8.x needs it).

The format is text: a header ``TRT-<version code>-<calibrator>``, then one line per tensor,
``<ONNX tensor name>: <hex>``, the hex being the IEEE-754 bit pattern of the float32 scale ``amax / 127``.
The version code is ``major*1000 + minor*100 + patch`` for TensorRT 8 (``8502``) and ``major*10000 + minor*100 +
patch`` from TensorRT 10 on (``100300``). TensorRT ignores, silently, a cache whose header names another version,
so a cache is written for one version and re-headed (:func:`retarget`) for another: the scales are tledge's own
(from its calibration statistics), not TensorRT's, and do not depend on the version. TensorRT 11 has no implicit
INT8 (no calibrators), so no cache is written for it.

>>> text = format_cache({"input": 2.5}, "10.3.0")
>>> text.splitlines()[0], parse_cache(text)[1]["input"] * 127  # doctest: +ELLIPSIS
('TRT-100300-EntropyCalibration2', 2.5...)
"""

from __future__ import annotations

import re
import struct

from tledge.errors import TledgeError

# The calibrator class that reads the cache on the device must match the header's algorithm; EntropyCalibration2
# is the one DLA requires, so it is the default whatever statistic chose the ranges.
DEFAULT_CALIBRATOR = "EntropyCalibration2"
CALIBRATORS = ("EntropyCalibration2", "EntropyCalibration", "MinMaxCalibration", "LegacyCalibration")
INT8_LEVELS = 127
_HEADER = re.compile(r"^TRT-(\d+)-([A-Za-z0-9]+)$")


def version_code(version: str) -> int:
    """TensorRT's version code in cache headers: ``"8.5.2"`` -> 8502, ``"10.3.0"`` -> 100300."""
    parts = version.strip().split(".")
    try:
        major, minor, patch = (int(p) for p in (parts + ["0", "0"])[:3])
    except ValueError:
        raise TledgeError(f"TensorRT version must look like 8.5.2 or 10.3.0, got {version!r}") from None
    if major < 8 or (major == 8 and minor < 5):
        raise TledgeError(f"TensorRT {version} is older than 8.5, the oldest version tledge supports")
    if major >= 11:
        raise TledgeError(f"TensorRT {version} has no implicit INT8 (calibrators were removed in 11.0): use the Q/DQ model")
    return major * 1000 + minor * 100 + patch if major < 10 else major * 10000 + minor * 100 + patch


def scale_hex(scale: float) -> str:
    """The float32 bit pattern of ``scale`` in lower-case hex without leading zeros, as TensorRT prints it."""
    return format(struct.unpack(">I", struct.pack(">f", scale))[0], "x")


def format_cache(amax: dict[str, float], trt_version: str, calibrator: str = DEFAULT_CALIBRATOR) -> str:
    """The cache text for per-tensor absolute maxima ``amax`` (scale = amax / 127), tensors in sorted order."""
    if calibrator not in CALIBRATORS:
        raise TledgeError(f"calibrator must be one of {CALIBRATORS}, got {calibrator!r}")
    lines = [f"TRT-{version_code(trt_version)}-{calibrator}"]
    for name in sorted(amax):
        value = float(amax[name])
        if not (value >= 0 and value != float("inf")):
            raise TledgeError(f"tensor {name!r} has no finite range ({value}); the calibration images did not reach it")
        if ":" in name or "\n" in name:
            raise TledgeError(f"tensor name {name!r} cannot be written to a TensorRT cache line")
        lines.append(f"{name}: {scale_hex(value / INT8_LEVELS)}")
    return "\n".join(lines) + "\n"


def parse_cache(text: str) -> tuple[dict, dict[str, float]]:
    """``({"version_code", "calibrator"}, {tensor: scale})`` from a cache's text; a malformed one is an error."""
    lines = [line.rstrip("\r") for line in text.splitlines() if line.strip()]
    match = _HEADER.match(lines[0]) if lines else None
    if match is None:
        raise TledgeError("not a TensorRT calibration cache: the first line must be TRT-<version>-<calibrator>")
    scales = {}
    for number, line in enumerate(lines[1:], start=2):
        name, sep, value = line.rpartition(": ")
        try:
            if not sep or not name:
                raise ValueError
            scales[name] = struct.unpack(">f", struct.pack(">I", int(value, 16)))[0]
        except (ValueError, struct.error):
            raise TledgeError(f"TensorRT calibration cache line {number} is not '<tensor>: <hex scale>': {line[:80]!r}") from None
    return {"version_code": int(match.group(1)), "calibrator": match.group(2)}, scales


def retarget(text: str, trt_version: str) -> str:
    """The same scales under the header of another TensorRT version."""
    header, _ = parse_cache(text)
    body = text.split("\n", 1)[1] if "\n" in text else ""
    return f"TRT-{version_code(trt_version)}-{header['calibrator']}\n{body}"
