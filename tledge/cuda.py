"""The few CUDA calls the device part needs, through ctypes: no torch, no pycuda, no cuda-python.

* :func:`device_info`: this machine's GPU model and compute capability (driver API, ``libcuda``), which decide
  whether an engine runs here; on a Jetson also its L4T release (``/etc/nv_tegra_release``) and JetPack.
* :class:`Cudart`: device memory, copies and a stream for the TensorRT runner (runtime API, ``libcudart``,
  which TensorRT itself links against).

Both return None / raise a clear error where there is no NVIDIA driver, so callers can say why.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import re
from typing import Optional

from tledge.errors import TledgeError

# CUdevice_attribute values (cuda.h; stable across CUDA 11 and 12)
_CC_MAJOR, _CC_MINOR = 75, 76
# cudaMemcpyKind
H2D, D2H = 1, 2
# L4T release -> JetPack (NVIDIA's JetPack archive); the L4T major must match between container and host.
JETPACK = {(35, 1): "5.0.2", (35, 2): "5.1", (35, 3): "5.1.1", (35, 4): "5.1.2", (35, 5): "5.1.3", (35, 6): "5.1.4",
           (36, 2): "6.0 DP", (36, 3): "6.0", (36, 4): "6.1/6.2"}


def _load(names) -> Optional[ctypes.CDLL]:
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


def _module_model() -> Optional[str]:
    """The Jetson module ("NVIDIA Jetson AGX Orin Developer Kit"): every Orin reports the GPU name "Orin" and
    compute capability 8.7, but an AGX Orin and an Orin Nano differ in SMs, and an engine is tuned for one."""
    try:
        with open("/proc/device-tree/model", "rb") as f:
            return f.read().rstrip(b"\0").decode(errors="replace").strip() or None
    except OSError:
        return None


def jetson_release(text: Optional[str] = None, model: Optional[str] = None) -> Optional[dict]:
    """``{"l4t": "36.4.0", "jetpack": "6.1/6.2", "model": ...}`` from ``/etc/nv_tegra_release`` (or its text);
    None elsewhere."""
    if text is None:
        try:
            with open("/etc/nv_tegra_release", encoding="utf-8") as f:
                text = f.readline()
        except OSError:
            return None
        model = model or _module_model()
    match = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*(\d+)(?:\.(\d+))?", text)
    if match is None:
        return {"l4t": text.strip()[:80], "jetpack": None, "model": model}
    major, minor, patch = int(match.group(1)), int(match.group(2)), int(match.group(3) or 0)
    return {"l4t": f"{major}.{minor}.{patch}", "jetpack": JETPACK.get((major, minor)), "model": model}


def device_info(index: int = 0) -> Optional[dict]:
    """``{"gpu", "compute_capability", "jetson"}`` of CUDA device ``index``; None without an NVIDIA driver or GPU."""
    cuda = _load(["libcuda.so.1", "libcuda.so"])
    if cuda is None or cuda.cuInit(0) != 0:
        return None
    count = ctypes.c_int(0)
    if cuda.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value <= index:
        return None
    dev = ctypes.c_int(0)
    if cuda.cuDeviceGet(ctypes.byref(dev), index) != 0:
        return None
    name = ctypes.create_string_buffer(256)
    major, minor = ctypes.c_int(0), ctypes.c_int(0)
    cuda.cuDeviceGetName(name, len(name), dev)
    cuda.cuDeviceGetAttribute(ctypes.byref(major), _CC_MAJOR, dev)
    cuda.cuDeviceGetAttribute(ctypes.byref(minor), _CC_MINOR, dev)
    return {"gpu": name.value.decode(errors="replace").strip(), "compute_capability": f"{major.value}.{minor.value}",
            "jetson": jetson_release()}


def _cudart_candidates() -> list:
    """The loader's libcudart, then CUDA's default prefix (JetPack), then the pip wheels' copy (x86 TensorRT wheels
    bring nvidia-cuda-runtime, which is not on the loader path)."""
    import glob
    import sys

    names = ["libcudart.so", "libcudart.so.12", "libcudart.so.11.0", ctypes.util.find_library("cudart")]
    names += sorted(glob.glob("/usr/local/cuda*/lib64/libcudart.so*"), reverse=True)
    for entry in sys.path:
        names += sorted(glob.glob(f"{entry}/nvidia/cuda_runtime/lib/libcudart.so*"), reverse=True)
    return [n for n in names if n]


class Cudart:
    """Device buffers, host<->device copies and one stream (CUDA runtime API through ctypes)."""

    def __init__(self):
        lib = _load(_cudart_candidates())
        if lib is None:
            raise TledgeError("the CUDA runtime (libcudart) is not loadable; on a Jetson it comes with JetPack, elsewhere with the CUDA toolkit or TensorRT")
        self.lib = lib
        lib.cudaMalloc.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t]
        lib.cudaFree.argtypes = [ctypes.c_void_p]
        lib.cudaMemcpyAsync.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
        lib.cudaStreamCreate.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
        lib.cudaStreamSynchronize.argtypes = [ctypes.c_void_p]
        lib.cudaStreamDestroy.argtypes = [ctypes.c_void_p]
        lib.cudaGetErrorString.restype = ctypes.c_char_p
        stream = ctypes.c_void_p()
        self.check(lib.cudaStreamCreate(ctypes.byref(stream)), "cudaStreamCreate")
        self.stream = stream.value or 0

    def check(self, status: int, what: str) -> None:
        if status != 0:
            raise TledgeError(f"CUDA {what} failed: {self.lib.cudaGetErrorString(status).decode()} (error {status})")

    def malloc(self, nbytes: int) -> int:
        ptr = ctypes.c_void_p()
        self.check(self.lib.cudaMalloc(ctypes.byref(ptr), max(int(nbytes), 1)), f"cudaMalloc({nbytes})")
        return ptr.value

    def free(self, ptr: int) -> None:
        if ptr:
            self.lib.cudaFree(ptr)

    def to_device(self, ptr: int, array) -> None:
        self.check(self.lib.cudaMemcpyAsync(ptr, array.ctypes.data, array.nbytes, H2D, self.stream), "copy to the device")

    def to_host(self, array, ptr: int) -> None:
        self.check(self.lib.cudaMemcpyAsync(array.ctypes.data, ptr, array.nbytes, D2H, self.stream), "copy from the device")

    def synchronize(self) -> None:
        self.check(self.lib.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def close(self) -> None:
        if self.stream:
            self.lib.cudaStreamDestroy(self.stream)
            self.stream = 0
