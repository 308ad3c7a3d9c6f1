"""Benchmark of the OpenCL engine against torch on the same machine, in one run.

Correctness (fp32 engine vs torch fp32 on random and jet-like images), throughput at each batch
size (engine and torch measured alternately, median of --repeats), and the per-layer profile from
OpenCL events with GFLOP/s per layer. Prints Markdown; --out also writes it to a file. Runs
unchanged on any OpenCL device (pin one with --device or $TOPTAGGER_OPENCL_DEVICE).

    python -m benchmarks.opencl --image-size 64 --batch-sizes 1 16 --profile-batches 1 16
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import machine, publish
from fpga_runtime import synthetic
from fpga_runtime.engine import Engine, LayerTime
from fpga_runtime.export import export_model, load_torch_model
from fpga_runtime.quantize import PRECISIONS
from toptagger.cli import positive_int


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    """max |got - ref| / max |ref|: relative to the logit scale, so near-zero logits do not blow up."""
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def _median_time(fn: Callable[[], object], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def throughput(
    engine: Engine, model: torch.nn.Module, x: np.ndarray, repeats: int, torch_device: str
) -> tuple[float, float]:
    """(engine img/s, torch img/s), medians, with the two measured alternately to share the noise."""
    xt = torch.from_numpy(x).to(torch_device)

    def run_torch() -> None:
        with torch.no_grad():
            model(xt)
        if torch_device.startswith("cuda"):
            torch.cuda.synchronize()

    engine.logits(x)  # warm-up: buffers, first-launch costs
    run_torch()
    te, tt = [], []
    for _ in range(repeats):
        te += _median_time(lambda: engine.logits(x), 1)
        tt += _median_time(run_torch, 1)
    return len(x) / statistics.median(te), len(x) / statistics.median(tt)


def profile_table(rows: list[LayerTime], batch: int) -> str:
    total = sum(r.seconds for r in rows)
    flops = sum(r.flops for r in rows)
    lines = [
        f"#### Batch {batch}: {total * 1e3:.1f} ms device time, {flops / total / 1e9:.1f} GFLOP/s overall",
        "",
        "| layer | kind | ms | % | GFLOP/s |",
        "|---|---|---:|---:|---:|",
    ]
    for r in rows:
        gf = f"{r.gflops:.1f}" if r.flops else ""
        lines.append(f"| {r.layer} | {r.kind} | {r.seconds * 1e3:.3f} | {100 * r.seconds / total:.1f} | {gf} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.opencl", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="trained tagger (.safetensors state_dict); default: random-init resnet50")
    parser.add_argument("--channels", type=positive_int, default=3, help="image channels of the random model")
    parser.add_argument("--image-size", type=positive_int, default=64)
    parser.add_argument("--batch-sizes", type=positive_int, nargs="+", default=[1, 16])
    parser.add_argument("--profile-batches", type=positive_int, nargs="*", default=[1, 16])
    parser.add_argument(
        "--precision",
        nargs="+",
        default=["fp32"],
        choices=PRECISIONS,
        help="engine precisions to time (correctness is always checked in fp32)",
    )
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--device", help="OpenCL device pin (default: automatic)")
    parser.add_argument("--torch-device", default="cpu", help="torch baseline device (cpu, cuda)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    parser.add_argument("--out", help="also write the Markdown report to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_torch_model(args.model) if args.model else synthetic.random_tagger(args.channels)
    channels = model.conv1.in_channels
    s = args.image_size
    calib = synthetic.jet_images(16, s, channels, seed=100)
    precisions = list(dict.fromkeys(["fp32", *args.precision]))
    out: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        pkg = export_model(model, Path(tmp) / "pkg", precisions, image_size=s, calibration=calib)
        engines = {
            p: Engine.from_package(
                pkg,
                device=args.device,
                precision=p,
                max_batch_size=max(args.batch_sizes + args.profile_batches),
                allow_fp16_emulation=True,
            )
            for p in precisions
        }
    fp32 = engines["fp32"]
    model = model.to(args.torch_device)
    out += [
        f"### Run: {time.strftime('%Y-%m-%d %H:%M')}, {fp32.info.label()} ({fp32.info.kind}), "
        f"torch {torch.__version__} on {args.torch_device} ({torch.get_num_threads()} threads), "
        f"{machine()}",
        "",
        f"Image {channels}x{s}x{s}, tiles {fp32.tiles}, build options `{fp32.options}`.",
        "",
    ]
    out += [
        "#### Correctness (fp32 engine vs torch fp32, max |diff| / max |logit|)",
        "",
        "| images | N | relative error | target |",
        "|---|---:|---:|---|",
    ]
    for name, x in (
        ("random normal", synthetic.random_images(16, s, channels, seed=1)),
        ("jet-like", synthetic.jet_images(16, s, channels, seed=2)),
    ):
        with torch.no_grad():
            ref = model(torch.from_numpy(x).to(args.torch_device)).cpu().numpy()
        err = rel_err(fp32.logits(x), ref)
        out.append(f"| {name} | {len(x)} | {err:.2e} | {'ok' if err <= 1e-4 else 'FAIL'} (<= 1e-4) |")
    out += [
        "",
        "#### Throughput (median of alternating runs)",
        "",
        "| precision | batch | engine img/s | torch img/s | engine / torch |",
        "|---|---:|---:|---:|---:|",
    ]
    for p in precisions:
        for b in args.batch_sizes:
            x = synthetic.jet_images(b, s, channels, seed=3)
            eng, ref = throughput(engines[p], model, x, args.repeats, args.torch_device)
            out.append(f"| {p} | {b} | {eng:.1f} | {ref:.1f} | {eng / ref:.2f} |")
    for b in args.profile_batches:
        x = synthetic.jet_images(b, s, channels, seed=4)
        fp32.profile(x)  # warm
        out += ["", profile_table(fp32.profile(x), b)]
    publish("\n".join(out) + "\n", args.out)
    return 0


if __name__ == "__main__":
    from toptagger.cli import run_cli

    raise SystemExit(run_cli(main))
