"""The CPU cores this process may use: one answer for training and serving.

A container sees every core of its node in ``os.cpu_count()``, and often in its CPU affinity too,
while its pod's ``limits.cpu`` is a CFS quota in its cgroup. Threads beyond the quota run no
faster: the kernel throttles them, and a process that starts one thread per node core under a
2-core limit spends most of its time descheduled. So the training ranks (torch threads per rank,
:mod:`toptagger.training.distributed`) and the predictor's runtimes (ONNX Runtime and OpenVINO
threads, :mod:`serving.backends`) size their thread pools with :func:`cpu_limit`.

Only the standard library: the predictor's image copies this module (``serving/Dockerfile``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
# cgroup v1 mounts the CPU controller under one of these names (a container usually sees both).
V1_CPU_DIRS = ("cpu", "cpu,cpuacct")


def cpu_limit(root: str | Path = CGROUP_ROOT) -> int:
    """Cores this process may use: its cgroup CPU quota, rounded up, never more than its CPU affinity.

    Reads cgroup v2's ``cpu.max`` ("QUOTA PERIOD", or "max PERIOD" without a limit) or, where
    there is none, cgroup v1's ``cpu.cfs_quota_us`` (-1 without a limit) and ``cpu.cfs_period_us``.
    Without a quota, or with contents it cannot read, the affinity. ``root`` is where the cgroup
    filesystem is mounted (tests point it at fake files). At least 1.
    """
    root = Path(root)
    try:
        quota = _quota_v2((root / "cpu.max").read_text())
    except OSError:  # no such file: cgroup v1, or not Linux
        quota = _quota_v1(root)
    cores = affinity()
    return max(1, cores if quota is None else min(cores, quota))


def affinity() -> int:
    """The CPUs the scheduler may run this process on (all of them where affinity is unknown)."""
    if hasattr(os, "sched_getaffinity"):  # Linux; not macOS
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _cores(quota: int, period: int) -> int | None:
    """Whole cores of a quota per period; None for "no limit" (-1 in v1) or nonsense."""
    if quota <= 0 or period <= 0:
        return None
    return math.ceil(quota / period)


def _quota_v2(text: str) -> int | None:
    try:
        quota, period = text.split()
        return None if quota == "max" else _cores(int(quota), int(period))
    except ValueError:  # unexpected contents: no limit we can trust
        return None


def _quota_v1(root: Path) -> int | None:
    for name in V1_CPU_DIRS:
        folder = root / name
        try:
            quota = int((folder / "cpu.cfs_quota_us").read_text())
            period = int((folder / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return _cores(quota, period)
    return None
