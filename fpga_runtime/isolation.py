"""The parent side of the start-up probes: run ``python -m fpga_runtime.probe`` in a child process.

A crash inside the OpenCL driver (PoCL aborts in LLVM on some vector types, and segfaults on a
truncated binary) would kill the server. The engine therefore has its kernels run first in a child
(:mod:`fpga_runtime.probe`, the child side and the CLI), and this module turns the child's death,
timeout or failed check into a :class:`~fpga_runtime.errors.KernelProbeError` (or the OpenCL error
the child reported). The child is named, not imported: the child imports the engine, and the
engine imports this module.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from fpga_runtime import errors
from fpga_runtime.devices import DeviceInfo

CHILD_MODULE = "fpga_runtime.probe"
DEFAULT_TIMEOUT_S = 300.0

_lock = threading.Lock()
_passed: set[tuple[Any, ...]] = set()


def _run_child(args: list[str], what: str, timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", CHILD_MODULE, *args]
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise errors.KernelProbeError(f"{what}: probe did not finish within {timeout:.0f} s") from None
    tail = "\n".join((proc.stderr or "").strip().splitlines()[-15:])
    if proc.returncode < 0:
        sig = signal.Signals(-proc.returncode).name
        raise errors.KernelProbeError(
            f"{what}: the probe process died with {sig}; the kernels would crash this process too. Last output:\n{tail}"
        )
    lines = [ln for ln in (proc.stdout or "").splitlines() if ln.startswith("{")]
    if not lines:
        raise errors.KernelProbeError(f"{what}: probe exited with status {proc.returncode} without a result:\n{tail}")
    result = json.loads(lines[-1])
    if not result.get("ok"):
        cls = getattr(errors, str(result.get("error_type")), errors.KernelProbeError)
        if not (isinstance(cls, type) and issubclass(cls, errors.OpenCLRuntimeError)):
            cls = errors.KernelProbeError
        raise cls(f"{what}: {result.get('message')}")
    return result


def probe_engine_kernels(
    info: DeviceInfo, precision: str, tiles: Any, binary_dir: Path | None, timeout: float = DEFAULT_TIMEOUT_S
) -> dict[str, Any] | None:
    """Probe the engine kernels for (device, precision, tiles) once per process; raises on failure."""
    key = (info.platform, info.name, precision, tiles, str(binary_dir))
    with _lock:
        if key in _passed:
            return None
    args = [
        "engine",
        "--device",
        f"{info.platform}:{info.name}",
        "--precision",
        precision,
        "--mr",
        str(tiles.mr),
        "--vw",
        str(tiles.vw),
        "--wg-rows",
        str(tiles.wg_rows),
        "--wg-panels",
        str(tiles.wg_panels),
    ]
    if binary_dir is not None:
        args += ["--binary-dir", str(binary_dir)]
    result = _run_child(args, f"{precision} kernels on {info.label()}", timeout)
    with _lock:
        _passed.add(key)
    return result


def probe_source(
    path: str | Path, kernel: str, device: str | None = None, options: str = "", timeout: float = DEFAULT_TIMEOUT_S
) -> dict[str, Any]:
    """Build ``path`` and launch ``kernel(float* buf)`` over 64 items in a child process."""
    args = ["source", str(path), "--kernel", kernel, "--options", options]
    if device:
        args += ["--device", device]
    return _run_child(args, f"kernel {kernel} of {path}", timeout)
