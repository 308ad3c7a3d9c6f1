"""Start-up probes: run risky kernels in a child process, so that a crash inside the OpenCL driver
(PoCL aborts in LLVM on some vector types, and segfaults on a truncated binary) becomes a
:class:`KernelProbeError` in the server instead of killing it.

``probe_engine_kernels`` builds the engine's kernels for one device, precision and tile set in a
child, runs every kernel through a small residual network and checks the logits against the torch
reference. ``probe_source`` runs one kernel of an arbitrary .cl file. Both are also a CLI:

    python -m fpga_runtime.probe engine --precision int8
    python -m fpga_runtime.probe source suspect.cl --kernel k
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fpga_runtime import errors

# This module is the child's side and the CLI, above the engine (the child runs one). The parent's
# side, which starts this module as a child and reads its verdict, is fpga_runtime.isolation, below
# the engine that probes its kernels on start-up; it is re-exported here.
from fpga_runtime.isolation import probe_engine_kernels, probe_source

__all__ = ["TOLERANCE", "main", "probe_engine_kernels", "probe_source"]

# Worst acceptable relative error of the probe network: the narrow modes are compared with their own
# emulation in the reference, so only gross failures (wrong kernel, garbage memory) exceed these.
TOLERANCE = {"fp32": 1e-3, "fp16": 1e-2, "int8": 5e-2, "bfp8": 5e-2}


# ---- child side -----------------------------------------------------------------------------------


def _child_engine(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import torch
    from torchvision.models.resnet import Bottleneck, ResNet

    from fpga_runtime.engine import Engine
    from fpga_runtime.export import export_model
    from fpga_runtime.program import Tiles
    from fpga_runtime.reference import run_reference

    torch.manual_seed(0)
    # A one-block-per-stage bottleneck ResNet with narrow inner widths: every kernel, stride,
    # padding and epilogue of resnet50, at a fraction of the weights.
    model = ResNet(Bottleneck, [1, 1, 1, 1], num_classes=2, width_per_group=16).eval()
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, 3, 32, 32)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        pkg = export_model(model, Path(tmp) / "pkg", [args.precision], image_size=32, calibration=images)
        engine = Engine.from_package(
            pkg,
            device=args.device,
            precision=args.precision,
            probe=False,
            tiles=Tiles(args.mr, args.vw, args.wg_rows, args.wg_panels),
            use_binary=args.binary_dir is not None,
            binary_dir=args.binary_dir,
            allow_fp16_emulation=True,
        )
        got = engine.logits(images)
        ref = run_reference(engine.package.plan, engine.package.weights(args.precision), args.precision, images)
    err = float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-12))
    if not np.isfinite(got).all() or err > TOLERANCE[args.precision]:
        return {
            "ok": False,
            "error_type": "KernelProbeError",
            "message": f"kernels ran but computed wrong logits (relative error {err:.2e})",
        }
    return {"ok": True, "max_rel_error": err}


def _child_source(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import pyopencl as cl

    from fpga_runtime.devices import select_device
    from fpga_runtime.program import build_from_source, shared_context

    _, device = select_device(args.device)
    ctx = shared_context(device)
    program = build_from_source(ctx, device, args.options, Path(args.path).read_text())
    queue = cl.CommandQueue(ctx, device)
    buf = cl.Buffer(ctx, cl.mem_flags.READ_WRITE | cl.mem_flags.COPY_HOST_PTR, hostbuf=np.zeros(1024, np.float32))
    getattr(program, args.kernel)(queue, (64,), None, buf)
    queue.finish()
    return {"ok": True}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fpga_runtime.probe", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="mode", required=True)
    eng = sub.add_parser("engine", help="probe the engine kernels of one precision")
    eng.add_argument("--device", help="device pin (default: automatic selection)")
    eng.add_argument("--precision", default="fp32", choices=tuple(TOLERANCE))
    for name, default in (("--mr", 12), ("--vw", 16), ("--wg-rows", 1), ("--wg-panels", 8)):
        eng.add_argument(name, type=int, default=default)
    eng.add_argument("--binary-dir", help="load prebuilt binaries from here instead of compiling")
    src = sub.add_parser("source", help="build one .cl file and run one kernel(float*) of it")
    src.add_argument("path")
    src.add_argument("--kernel", required=True)
    src.add_argument("--device")
    src.add_argument("--options", default="")
    args = parser.parse_args(argv)
    try:
        result = _child_engine(args) if args.mode == "engine" else _child_source(args)
    except errors.OpenCLRuntimeError as exc:
        result = {"ok": False, "error_type": type(exc).__name__, "message": str(exc)}
    print(json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
