"""OpenCL device discovery and selection: ACCELERATOR (FPGA) first, then GPU, then CPU.

A device can be pinned by name with ``device=`` or the environment variable
``TOPTAGGER_OPENCL_DEVICE``: ``"SUBSTRING"`` matches the platform or device name, ``"PLATFORM:DEVICE"``
matches both parts, case-insensitive.

A device *type* can be required with ``device_type=`` or ``TOPTAGGER_OPENCL_DEVICE_TYPE``
(``ACCELERATOR``, alias ``FPGA``; ``GPU``; ``CPU``). An FPGA pod sets ``ACCELERATOR``, so that a node
whose board or driver is missing fails to load (not ready, with the reason) instead of quietly
running the kernels on PoCL's CPU device at a fraction of the speed.

    python -m fpga_runtime.devices          # list devices and the one the engine would pick
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyopencl as cl

from fpga_runtime.errors import POCL_HINT, NoDeviceError
from toptagger.errors import ConfigError

ENV_DEVICE = "TOPTAGGER_OPENCL_DEVICE"
ENV_DEVICE_TYPE = "TOPTAGGER_OPENCL_DEVICE_TYPE"
TYPE_ORDER = ("ACCELERATOR", "GPU", "CPU")
TYPE_ALIASES = {"FPGA": "ACCELERATOR"}


def _writable(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except OSError:
        return False
    return True


def ensure_pocl_cache() -> str:
    """Point PoCL at a writable kernel cache before the first OpenCL call; returns the directory.

    PoCL silently reports *no device* when it cannot write its cache (default under $HOME), which
    happens in read-only containers. A caller's writable POCL_CACHE_DIR is kept as it is.
    """
    current = os.environ.get("POCL_CACHE_DIR")
    if current and _writable(Path(current)):
        return current
    candidates = [
        Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "top-tagger" / "pocl",
        Path(tempfile.gettempdir()) / f"top-tagger-pocl-{os.getuid()}",
    ]
    for path in candidates:
        if _writable(path):
            os.environ["POCL_CACHE_DIR"] = str(path)
            if not os.environ.get("XDG_CACHE_HOME") or not _writable(Path(os.environ["XDG_CACHE_HOME"])):
                os.environ["XDG_CACHE_HOME"] = str(path.parent.parent)
            return str(path)
    return current or ""


@dataclass(frozen=True)
class DeviceInfo:
    """What the engine needs to know about one device, without holding it open."""

    platform: str
    name: str
    kind: str
    version: str
    driver: str
    compute_units: int
    global_mem: int
    fp16: bool
    index: tuple[int, int]

    def label(self) -> str:
        return f"{self.platform} : {self.name}"


def device_kind(device: cl.Device) -> str:
    for kind in TYPE_ORDER:
        if device.type & getattr(cl.device_type, kind):
            return kind
    return "OTHER"


def describe(device: cl.Device, index: tuple[int, int] = (-1, -1)) -> DeviceInfo:
    return DeviceInfo(
        platform=device.platform.name.strip(),
        name=device.name.strip(),
        kind=device_kind(device),
        version=device.version.strip(),
        driver=device.driver_version.strip(),
        compute_units=device.max_compute_units,
        global_mem=device.global_mem_size,
        fp16="cl_khr_fp16" in device.extensions.split(),
        index=index,
    )


# A trivial kernel: a device that cannot build it cannot run the engine's kernels either.
_PROBE_KERNEL = "__kernel void probe(__global float *x) { x[get_global_id(0)] *= 2.0f; }"
_compiler_checked: dict[int, str | None] = {}


def compiler_problem(device: cl.Device) -> str | None:
    """Why ``device`` cannot compile OpenCL C here, or None; checked once per device and process.

    PoCL's bundled LLVM does not know CPUs newer than itself (the pyopencl wheel's PoCL 3.0 with
    LLVM 14 on an AMD Zen 5, for one): it then reports the device, with "generic" as its CPU in
    the version string, and fails every build with "unknown target CPU 'generic'". Such a device
    is left out, so that another platform's device (Debian's pocl-opencl-icd, which ``make``
    installs when it finds none that builds) is chosen instead. Accelerators are not checked:
    FPGAs load prebuilt binaries and cannot compile at run time anyway.
    """
    if device_kind(device) == "ACCELERATOR":
        return None
    key = device.int_ptr
    if key not in _compiler_checked:
        try:
            cl.Program(cl.Context([device]), _PROBE_KERNEL).build(devices=[device])
            _compiler_checked[key] = None
        except cl.Error as exc:
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            reason = next((line for line in lines if "error" in line.lower()), lines[0] if lines else str(exc))
            _compiler_checked[key] = f"cannot compile OpenCL C ({reason})"
    return _compiler_checked[key]


def all_devices() -> list[tuple[DeviceInfo, cl.Device]]:
    """Every usable device of every platform; NoDeviceError (naming what was seen) when there is none."""
    ensure_pocl_cache()
    try:
        platforms = cl.get_platforms()
    except cl.Error as exc:
        raise NoDeviceError(f"no OpenCL platform found ({exc}). Is an ICD installed? {POCL_HINT}") from None
    found, unusable = [], []
    for pi, platform in enumerate(platforms):
        try:
            devices = platform.get_devices()
        except cl.Error:
            continue  # a platform with no devices raises DEVICE_NOT_FOUND; others may still have some
        for di, device in enumerate(devices):
            info = describe(device, (pi, di))
            problem = compiler_problem(device)
            if problem:
                unusable.append(f"{info.label()} ({info.version}): {problem}")
            else:
                found.append((info, device))
    if not found and unusable:
        raise NoDeviceError(
            f"no usable OpenCL device: {'; '.join(unusable)}. PoCL's LLVM may not know this CPU; "
            "Debian's pocl-opencl-icd package brings a PoCL that does (make installs it when needed)"
        )
    if not found:
        raise NoDeviceError(
            f"OpenCL platforms {[p.name for p in platforms]} report no devices. {POCL_HINT} "
            f"(now POCL_CACHE_DIR={os.environ.get('POCL_CACHE_DIR')!r})"
        )
    return found


def _matches(info: DeviceInfo, pin: str) -> bool:
    pin = pin.lower().strip()
    if ":" in pin:
        plat, dev = (s.strip() for s in pin.split(":", 1))
        return plat in info.platform.lower() and dev in info.name.lower()
    return pin in info.name.lower() or pin in info.platform.lower()


def required_type(device_type: str | None = None) -> str | None:
    """The device type asked for (argument, else $TOPTAGGER_OPENCL_DEVICE_TYPE), checked; None = any."""
    wanted = device_type if device_type is not None else os.environ.get(ENV_DEVICE_TYPE, "")
    wanted = wanted.strip().upper()
    if not wanted:
        return None
    wanted = TYPE_ALIASES.get(wanted, wanted)
    if wanted not in TYPE_ORDER:
        choices = ", ".join([*TYPE_ORDER, *TYPE_ALIASES])
        raise ConfigError(f"unknown OpenCL device type {wanted!r} (device_type= or ${ENV_DEVICE_TYPE}); use {choices}")
    return wanted


def select_device(pin: str | None = None, device_type: str | None = None) -> tuple[DeviceInfo, cl.Device]:
    """The device the engine runs on.

    Candidates: every device, or those of the required type (``device_type`` or
    $TOPTAGGER_OPENCL_DEVICE_TYPE), narrowed by ``pin`` (or $TOPTAGGER_OPENCL_DEVICE); among them
    the first by type order (accelerator, GPU, CPU).
    """
    found = all_devices()
    wanted = required_type(device_type)
    if wanted:
        of_type = [f for f in found if f[0].kind == wanted]
        if not of_type:
            names = "; ".join(f"{info.label()} ({info.kind})" for info, _ in found)
            raise NoDeviceError(
                f"no OpenCL {wanted} device (required by device_type= or ${ENV_DEVICE_TYPE}); available: {names}"
            )
        found = of_type
    pin = pin if pin is not None else os.environ.get(ENV_DEVICE) or None
    if pin:
        matching = [f for f in found if _matches(f[0], pin)]
        if not matching:
            names = "; ".join(info.label() for info, _ in found)
            raise NoDeviceError(f"no OpenCL device matches {pin!r} (from device= or ${ENV_DEVICE}); available: {names}")
        found = matching
    rank = {kind: i for i, kind in enumerate(TYPE_ORDER)}
    return min(found, key=lambda f: (rank.get(f[0].kind, len(rank)), f[0].index))


def readiness(pin: str | None = None, device_type: str | None = None) -> tuple[bool, str]:
    """(ready, reason) for a server's readiness probe; never raises for a missing device."""
    try:
        info, _ = select_device(pin, device_type)
    except (NoDeviceError, ConfigError) as exc:
        return False, str(exc)
    return True, f"OpenCL device {info.label()} ({info.kind})"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fpga_runtime.devices", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", help=f"pin a device by name (default: ${ENV_DEVICE})")
    parser.add_argument(
        "--device-type", help=f"require ACCELERATOR (FPGA), GPU or CPU (default: ${ENV_DEVICE_TYPE}, else any)"
    )
    args = parser.parse_args(argv)
    found = all_devices()
    picked, _ = select_device(args.device, args.device_type)
    print(f"POCL_CACHE_DIR={os.environ.get('POCL_CACHE_DIR', '')}")
    for info, _ in found:
        mark = "*" if info == picked else " "
        print(
            f"{mark} [{info.index[0]}.{info.index[1]}] {info.kind:<11} {info.label()} | {info.version} | "
            f"{info.compute_units} CU | {info.global_mem / 2**30:.1f} GiB | fp16={'yes' if info.fp16 else 'no'}"
        )
    print(f"would pick: {picked.label()} ({picked.kind})")
    return 0


if __name__ == "__main__":
    from toptagger.cli import run_cli

    raise SystemExit(run_cli(main))
