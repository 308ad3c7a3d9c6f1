"""Building the kernels: from source (CPU, GPU) or from a prebuilt binary (FPGA, or any device).

Programs are cached per process by (device, options), so many engines in one process compile each
option set once; PoCL additionally caches the compiled code on disk (POCL_CACHE_DIR).

A binary is saved with a JSON manifest (device, driver, build options, source hash, binary hash).
The manifest is checked *before* the bytes reach the driver: PoCL segfaults on a truncated binary
rather than returning CL_INVALID_BINARY.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import pyopencl as cl

from fpga_runtime.devices import DeviceInfo, describe
from fpga_runtime.errors import BinaryMismatchError, KernelBuildError

KERNEL_DIR = Path(__file__).parent / "kernels"
KERNEL_FILES = ("common.cl", "conv.cl", "pool.cl")
PRECISION_DEFINES = {"fp32": "PREC_FP32", "fp16": "PREC_FP16", "int8": "PREC_INT8", "bfp8": "PREC_FP32"}


@dataclass(frozen=True)
class Tiles:
    """Register-blocking of the conv kernel: MR output pixels x VW output channels per work-item,
    and the work-group shape (rows, panels) the host launches."""

    mr: int = 12
    vw: int = 16
    wg_rows: int = 1
    wg_panels: int = 8


def default_tiles(info: DeviceInfo) -> Tiles:
    """Tile sizes per device kind; the CPU values were tuned on PoCL (see docs/fpga_runtime.md)."""
    if info.kind == "GPU":
        # Small per-item blocks and 64-item groups keep registers and occupancy sane on GPUs.
        return Tiles(mr=4, vw=4, wg_rows=16, wg_panels=4)
    if info.kind == "ACCELERATOR":
        return Tiles(mr=4, vw=16, wg_rows=1, wg_panels=1)
    return Tiles()


def kernel_source() -> str:
    return "\n".join((KERNEL_DIR / f).read_text() for f in KERNEL_FILES)


def build_options(precision: str, tiles: Tiles, info: DeviceInfo) -> str:
    opts = [f"-D{PRECISION_DEFINES[precision]}", f"-DMR={tiles.mr}", f"-DVW={tiles.vw}", "-cl-mad-enable"]
    if info.kind == "ACCELERATOR":
        vendor = "FPGA_XILINX" if "xilinx" in info.platform.lower() else "FPGA_INTEL"
        opts.append(f"-D{vendor}")
    return " ".join(opts)


_lock = threading.Lock()
_contexts: dict[int, cl.Context] = {}
_programs: dict[tuple[int, str, str], cl.Program] = {}


def shared_context(device: cl.Device) -> cl.Context:
    """One context per device and process, so compiled programs can be shared between engines."""
    with _lock:
        key = device.int_ptr
        if key not in _contexts:
            _contexts[key] = cl.Context([device])
        return _contexts[key]


def _build_log(program: cl.Program, device: cl.Device) -> str:
    try:
        return str(program.get_build_info(device, cl.program_build_info.LOG)).strip()
    except cl.Error:
        return "(no build log available)"


def build_from_source(ctx: cl.Context, device: cl.Device, options: str, source: str | None = None) -> cl.Program:
    """Compile ``source`` (default: the engine's kernels); KernelBuildError carries the build log."""
    source = kernel_source() if source is None else source
    key = (device.int_ptr, options, hashlib.sha256(source.encode()).hexdigest())
    with _lock:
        if key in _programs:
            return _programs[key]
    program = cl.Program(ctx, source)
    try:
        program.build(options=options, devices=[device])
    except cl.Error as exc:
        log = _build_log(program, device) or str(exc)
        where = f"{device.name.strip()} with options {options!r}"
        raise KernelBuildError(f"OpenCL build failed on {where}:\n{log}") from None
    with _lock:
        _programs[key] = program
    return program


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:80]


def binary_stem(info: DeviceInfo, precision: str) -> str:
    return f"{_slug(info.name)}--{precision}"


def save_binary(program: cl.Program, device: cl.Device, directory: str | Path, precision: str, options: str) -> Path:
    """Write the program binary of ``device`` plus its manifest into ``directory``; returns the .bin path."""
    info = describe(device)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    binary = program.get_info(cl.program_info.BINARIES)[program.devices.index(device)]
    stem = binary_stem(info, precision)
    path = directory / f"{stem}.bin"
    path.write_bytes(binary)
    manifest = {
        "device": info.name,
        "platform": info.platform,
        "driver": info.driver,
        "precision": precision,
        "options": options,
        "source_sha256": hashlib.sha256(kernel_source().encode()).hexdigest(),
        "binary_sha256": hashlib.sha256(binary).hexdigest(),
        "bytes": len(binary),
    }
    (directory / f"{stem}.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return path


def load_binary(ctx: cl.Context, device: cl.Device, directory: str | Path, precision: str, options: str) -> cl.Program:
    """Load the prebuilt binary for ``device`` from ``directory``, after checking its manifest."""
    info = describe(device)
    directory = Path(directory)
    stem = binary_stem(info, precision)
    manifest_path, bin_path = directory / f"{stem}.json", directory / f"{stem}.bin"
    if not manifest_path.is_file() or not bin_path.is_file():
        others = sorted(p.stem for p in directory.glob("*.json")) if directory.is_dir() else []
        raise BinaryMismatchError(
            f"no {precision} kernel binary for device {info.name!r} in {directory} (looked for {stem}.bin/.json); "
            f"binaries present: {others or 'none'}"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise BinaryMismatchError(f"{manifest_path} is not valid JSON: {exc}") from None
    problems = []
    if manifest.get("device") != info.name or manifest.get("platform") != info.platform:
        problems.append(
            f"built for {manifest.get('platform')} : {manifest.get('device')}, "
            f"this device is {info.platform} : {info.name}"
        )
    if manifest.get("driver") != info.driver:
        problems.append(f"driver {manifest.get('driver')!r} != {info.driver!r}")
    if manifest.get("options") != options:
        problems.append(f"build options {manifest.get('options')!r} != {options!r}")
    if manifest.get("source_sha256") != hashlib.sha256(kernel_source().encode()).hexdigest():
        problems.append("kernel source changed since the binary was built")
    binary = bin_path.read_bytes()
    if manifest.get("binary_sha256") != hashlib.sha256(binary).hexdigest():
        problems.append("binary bytes do not match the manifest's sha256 (corrupt or replaced file)")
    if problems:
        raise BinaryMismatchError(f"kernel binary {bin_path} cannot run here: " + "; ".join(problems))
    try:
        program = cl.Program(ctx, [device], [binary])
        program.build(devices=[device])
    except cl.Error as exc:
        raise BinaryMismatchError(f"device {info.name!r} rejected kernel binary {bin_path}: {exc}") from None
    return program
