"""What every benchmark does the same way: name the machine, and print and record its table."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def machine() -> str:
    """The CPU model (what ``lscpu`` calls "Model name") and core count, to stand beside every number.

    Machines of the same kind differ (an AVX-512 CPU runs these models about 2.5x faster than an
    AVX2 one), so only ratios measured in one run carry over, and a table says where it ran.
    """
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def publish(report: str, out: str | os.PathLike[str] | None) -> None:
    """Print ``report`` and, given ``out``, write it there (through a temporary file, then renamed)."""
    print(report, end="" if report.endswith("\n") else "\n")
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.part")
        tmp.write_text(report if report.endswith("\n") else report + "\n")
        tmp.replace(path)
