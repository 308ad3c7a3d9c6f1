"""What every benchmark does the same way: name the machine, and print and record its table."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

from toptagger.precision.cpu import cpu_flags, describe

# The instruction sets that decide how fast these models run (lscpu's flags, by their names there);
# toptagger.precision.cpu reads the flags, this only names them.
ISA_FLAGS = (
    ("avx2", "AVX2"),
    ("avx512f", "AVX-512"),
    ("avx512_vnni", "VNNI"),
    ("avx_vnni", "AVX-VNNI"),
    ("avx512_bf16", "AVX512-BF16"),
    ("amx_bf16", "AMX-BF16"),
    ("amx_int8", "AMX-INT8"),
)


def machine_info() -> dict[str, Any]:
    """``{"cpu": model name, "isa": [ISA names], "cores": n}``: what :func:`machine` says, for a JSON record.

    The flags come from :func:`toptagger.precision.cpu.cpu_flags`, the one reader of /proc/cpuinfo
    (serving's ``auto`` decides from the same flags), and the model name from its ``describe``.
    """
    model = describe().rsplit(" (", 1)[0]  # "<model name> (<units>)"
    if model == "unknown CPU":  # no /proc/cpuinfo (not Linux)
        model = platform.processor() or platform.machine()
    flags = cpu_flags()
    return {"cpu": model, "isa": [name for flag, name in ISA_FLAGS if flag in flags], "cores": os.cpu_count()}


def machine() -> str:
    """The CPU model (what ``lscpu`` calls "Model name"), its ISA flags and core count, to stand beside every number.

    Machines of the same kind differ (an AVX-512 CPU runs these models about 2.5x faster than an
    AVX2 one), so only ratios measured in one run carry over, and a table says where it ran.
    """
    info = machine_info()
    return f"{info['cpu']} ({', '.join(info['isa']) or 'ISA flags unknown'}), {info['cores']} cores"


def publish(report: str, out: str | os.PathLike[str] | None) -> None:
    """Print ``report`` and, given ``out``, write it there (through a temporary file, then renamed)."""
    print(report, end="" if report.endswith("\n") else "\n")
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.part")
        tmp.write_text(report if report.endswith("\n") else report + "\n")
        tmp.replace(path)
