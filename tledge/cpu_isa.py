"""Which integer arithmetic this CPU's INT8 kernels use, and which CPU classes a CPU INT8 model is valid on.

ONNX Runtime's x86 int8 kernels multiply uint8 activations by int8 weights. With VNNI (AVX512-VNNI, AVX-VNNI)
or AMX the products are summed straight into int32. Without them (AVX2, AVX-512 without VNNI) the kernels use
``vpmaddubsw``, which adds two neighbouring products into a *saturating int16*: full 8-bit weights can overflow
it and the model silently computes something else. ARM's NEON and dot-product kernels, and every GPU, accumulate
in int32. So the same CPU INT8 file can be right on one machine and wrong on another; a *CPU target* names the
classes a model is built to be right on.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass

from tledge.errors import TledgeError

# CPU classes, from most to least capable int8 arithmetic.
X86_AMX, X86_VNNI, X86_AVX512, X86_AVX2, X86_OLD = "x86-amx", "x86-vnni", "x86-avx512", "x86-avx2", "x86-no-avx2"
ARM_DOTPROD, ARM_NEON = "arm64-dotprod", "arm64"
UNKNOWN = "unknown"
# Classes whose int8 kernels add u8 x s8 products in int32 (cannot overflow with 8-bit weights).
INT32_ACCUMULATING = frozenset({X86_AMX, X86_VNNI, ARM_DOTPROD, ARM_NEON})
ALL_CLASSES = (X86_AMX, X86_VNNI, X86_AVX512, X86_AVX2, X86_OLD, ARM_DOTPROD, ARM_NEON)


@dataclass(frozen=True)
class CpuTarget:
    """A named set of CPU classes that a CPU INT8 model must compute correctly on."""

    name: str
    description: str
    classes: frozenset
    full_range_weights: bool  # False: weights are constrained so that no int16 pair sum can saturate

    def covers(self, cpu_class: str) -> bool:
        return cpu_class in self.classes


CPU_TARGETS = {
    "portable": CpuTarget(
        "portable",
        "every x86 class (AVX2, AVX-512, VNNI, AMX) and ARM: weights narrowed only where an int16 pair could overflow",
        frozenset(ALL_CLASSES), full_range_weights=False,
    ),
    "vnni": CpuTarget(
        "vnni",
        "CPUs that accumulate int8 products in int32 (x86 with AVX512-VNNI, AVX-VNNI or AMX; ARM): full 8-bit weights",
        INT32_ACCUMULATING, full_range_weights=True,
    ),
}
CPU_TARGET_CHOICES = (*CPU_TARGETS, "native")


def cpu_flags() -> set[str]:
    """Instruction-set flags of this CPU from /proc/cpuinfo (x86 'flags', ARM 'Features'); empty if unreadable."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key = line.split(":", 1)[0].strip()
                if key in ("flags", "Features"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def classify(machine: str, flags: set[str]) -> str:
    """The int8 class of a CPU from its architecture name and flags.

    >>> classify("x86_64", {"avx2", "avx512f", "avx512bw", "avx512_vnni"})
    'x86-vnni'
    """
    machine = machine.lower()
    if machine in ("x86_64", "amd64", "i686", "x86"):
        if "amx_int8" in flags:
            return X86_AMX
        if "avx512_vnni" in flags or "avx_vnni" in flags:
            return X86_VNNI
        if "avx512bw" in flags:
            return X86_AVX512
        if "avx2" in flags:
            return X86_AVX2
        return X86_OLD if flags else UNKNOWN
    if machine in ("aarch64", "arm64"):
        return ARM_DOTPROD if "asimddp" in flags else ARM_NEON
    return UNKNOWN


def this_cpu() -> dict:
    """This machine's CPU class and the flags that decided it, for records and reports."""
    flags = cpu_flags()
    relevant = sorted(f for f in flags if f in {"avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp"})
    return {"class": classify(platform.machine(), flags), "machine": platform.machine(), "int8_flags": relevant}


def resolve_cpu_target(name: str) -> tuple[CpuTarget, str]:
    """The target for ``name`` and why: ``native`` picks ``vnni`` on an int32-accumulating CPU, else ``portable``."""
    if name == "native":
        cpu = this_cpu()["class"]
        target = CPU_TARGETS["vnni" if cpu in INT32_ACCUMULATING else "portable"]
        return target, f"native: this CPU is {cpu}"
    if name not in CPU_TARGETS:
        raise TledgeError(f"--cpu-target must be one of {list(CPU_TARGET_CHOICES)}, got {name!r}")
    return CPU_TARGETS[name], name
