"""What every benchmark does the same way: name the machine, and print and record its table."""

from __future__ import annotations

import os
import platform
from pathlib import Path

# The instruction sets that decide how fast these models run (lscpu's flags, by their names there).
ISA_FLAGS = (
    ("avx2", "AVX2"),
    ("avx512f", "AVX-512"),
    ("avx512_vnni", "VNNI"),
    ("avx512_bf16", "AVX512-BF16"),
    ("amx_bf16", "AMX-BF16"),
    ("amx_int8", "AMX-INT8"),
)


def machine() -> str:
    """The CPU model (what ``lscpu`` calls "Model name"), its ISA flags and core count, to stand beside every number.

    Machines of the same kind differ (an AVX-512 CPU runs these models about 2.5x faster than an
    AVX2 one), so only ratios measured in one run carry over, and a table says where it ran.
    """
    model = platform.processor() or platform.machine()
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == (platform.processor() or platform.machine()):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = [name for flag, name in ISA_FLAGS if flag in flags]
    return f"{model} ({', '.join(isa) or 'ISA flags unknown'}), {os.cpu_count()} cores"


def publish(report: str, out: str | os.PathLike[str] | None) -> None:
    """Print ``report`` and, given ``out``, write it there (through a temporary file, then renamed)."""
    print(report, end="" if report.endswith("\n") else "\n")
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.part")
        tmp.write_text(report if report.endswith("\n") else report + "\n")
        tmp.replace(path)
