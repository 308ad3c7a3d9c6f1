"""Which reduced-precision units this CPU has, from the flags in ``/proc/cpuinfo``.

int8 graphs run everywhere, but only VNNI or AMX make them faster than float32; bf16 is emulated
(slowly) without AVX512-BF16 or AMX. Serving's ``auto`` skips a precision the CPU has no units for.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@cache
def cpu_flags() -> frozenset[str]:
    """The first processor's flags; empty where /proc/cpuinfo cannot be read (not Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def has_units(precision: str, flags: frozenset[str] | None = None) -> bool:
    """Whether the CPU runs ``precision`` natively (fp32 always does)."""
    flags = cpu_flags() if flags is None else flags
    if precision == "int8":
        return any(f in flags for f in INT8_FLAGS)
    if precision == "bf16":
        return any(f in flags for f in BF16_FLAGS)
    return True


def describe() -> str:
    """``Intel(R) Xeon(R) ... (VNNI, AVX512-BF16, AMX-INT8)``: the CPU and the units that matter here."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    units = [flag for flag in (*INT8_FLAGS, *BF16_FLAGS) if flag in cpu_flags()]
    return f"{model} ({', '.join(units) or 'no int8/bf16 units'})"
