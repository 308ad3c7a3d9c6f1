"""Benchmarks for jet images and training throughput; prints markdown tables for docs/.

    python -m benchmarks.ml images   --data jets.h5         # or --generate 2000
    python -m benchmarks.ml training --data jets.h5 --image-size 64

``images``: ``jet_images`` with centring, rotation, flip and normalisation at 40x40 and 224x224,
against (a) a straightforward per-jet reference (the same preprocessing in numpy, one
``np.histogram2d`` per jet, as energyflow's ``pixelate``) and (b) at 224x224 the memory floor:
allocating the zeroed output and scatter-adding 60 constituents per jet. ``training``: steps/s
of the real training loop with on-the-fly images against a bare loop over pre-made image tensors
of the same size and batch. Every figure is the best of several repeats, measured in the same
process, so a busy neighbour on the shared cores slows both sides of a ratio alike; the load
average is printed beside them.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from toptagger.cli import positive_int, run_cli
from toptagger.errors import ConfigError
from toptagger.images import ImageConfig, jet_images
from toptagger.jets.dataset import JetBatch, read_jets
from toptagger.jets.kinematics import eta, phi, pt

PREPROCESSING = {"center": "centroid", "rotate": True, "flip": True, "normalize": True}


def best_rate(work: Callable[[], None], items: int, repeats: int) -> float:
    """Items per second of the fastest of ``repeats`` runs (after one warm-up run)."""
    work()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - start)
    return items / best


def reference_images(constituents: np.ndarray, size: int, half_width: float = 1.0) -> np.ndarray:
    """Per-jet reference: the same preprocessing as jet_images, one jet and one histogram at a time."""
    out = np.zeros((len(constituents), 1, size, size), np.float32)
    edges = np.linspace(-half_width, half_width, size + 1)
    for n, jet in enumerate(constituents):
        jet = jet[jet[:, 0] != 0].astype(np.float64)
        if len(jet) == 0:
            continue
        w, x, y = pt(jet), eta(jet), phi(jet)
        y = (y - y[np.argmax(w)] + np.pi) % (2 * np.pi) - np.pi
        x, y = x - np.average(x, weights=w), y - np.average(y, weights=w)
        theta = 0.5 * np.arctan2(2 * np.sum(w * x * y), np.sum(w * x * x) - np.sum(w * y * y))
        x, y = x * np.cos(theta) + y * np.sin(theta), y * np.cos(theta) - x * np.sin(theta)
        quadrant = np.array([np.sum(w[(np.sign(x) == sx) & (np.sign(y) == sy)]) for sx in (-1, 1) for sy in (-1, 1)])
        hottest = int(np.argmax(quadrant))
        x, y = x * (1 if hottest >= 2 else -1), y * (1 if hottest % 2 else -1)
        image, _, _ = np.histogram2d(x, y, bins=(edges, edges), weights=w)
        out[n, 0] = image / max(image.sum(), 1e-30)
    return out


def bench_images(jets: JetBatch, n_jets: int, batch: int, repeats: int, reference_jets: int) -> list[str]:
    constituents = np.concatenate([jets.constituents] * (-(-n_jets // len(jets))))[:n_jets]
    rows = ["| image | what | jets/s | ratio |", "|---|---|---|---|"]

    def ours(size: int, count: int) -> Callable[[], None]:
        def work() -> None:
            for start in range(0, count, batch):
                jet_images(constituents[start : start + batch], image_size=size, **PREPROCESSING)

        return work

    def floor(size: int, count: int) -> Callable[[], None]:
        index = torch.randint(0, size * size, (batch, 60))
        ones = torch.ones(batch, 60)

        def work() -> None:
            for start in range(0, count, batch):
                n = min(batch, count - start)
                out = torch.zeros(n, size * size)
                out.scatter_add_(1, index[:n], ones[:n])

        return work

    ref_sample = constituents[:reference_jets]
    fast40 = best_rate(ours(40, n_jets), n_jets, repeats)
    slow40 = best_rate(lambda: reference_images(ref_sample, 40), len(ref_sample), 1)
    rows.append(f"| 40×40 | `jet_images` (batches of {batch}) | {fast40:,.0f} | target ≥ 250,000 |")
    rows.append(
        f"| 40×40 | per-jet reference (`np.histogram2d`) | {slow40:,.0f} | ours ÷ reference = {fast40 / slow40:.1f} |"
    )
    n224 = min(n_jets, 20 * batch)
    fast224 = best_rate(ours(224, n224), n224, repeats)
    floor224 = best_rate(floor(224, n224), n224, repeats)
    rows.append(
        f"| 224×224 | `jet_images` (batches of {batch}) | {fast224:,.0f} | ours ÷ floor = {fast224 / floor224:.2f} |"
    )
    rows.append(f"| 224×224 | floor: zeroed output + 60 scatter-adds per jet | {floor224:,.0f} | 1 |")
    return rows


def bench_training(jets: JetBatch, image_size: int, batch: int, steps: int, repeats: int) -> list[str]:
    from toptagger.model import TaggerConfig, build_model
    from toptagger.training.data import JetImageLoader

    image = ImageConfig(image_size=image_size, **PREPROCESSING)
    torch.manual_seed(0)
    model = build_model(TaggerConfig(image=image)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = nn.CrossEntropyLoss()
    loader = JetImageLoader(jets, image, batch, seed=0, device=torch.device("cpu"), max_steps=steps)
    premade = [(images.clone(), labels.clone()) for images, labels in loader]

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(images), labels).backward()
        optimizer.step()

    def with_loader() -> None:
        for images, labels in loader:
            step(images, labels)

    def bare() -> None:
        for images, labels in premade:
            step(images, labels)

    render = best_rate(lambda: [None for _ in loader], steps * batch, repeats)
    rates = {"bare": 0.0, "loader": 0.0}
    for _ in range(repeats):  # interleaved, so that a neighbour's load hits both alike
        rates["bare"] = max(rates["bare"], best_rate(bare, steps * batch, 1))
        rates["loader"] = max(rates["loader"], best_rate(with_loader, steps * batch, 1))
    ratio = rates["loader"] / rates["bare"]
    return [
        "| loop | jets/s | ratio |",
        "|---|---|---|",
        f"| bare torch loop over pre-made {image_size}×{image_size} images, batch {batch} | {rates['bare']:.1f} | 1 |",
        f"| training loop, images rendered on the fly | {rates['loader']:.1f} | {ratio:.3f} |",
        f"| loader alone (render {image_size}×{image_size}, no model) | {render:,.0f} | |",
    ]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ml", description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=("images", "training"))
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="generated or reference jets (path or s3://)")
    source.add_argument("--generate", type=positive_int, help="generate this many jets (half top) first")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--jets", type=positive_int, default=50_000, help="images: jets per timing (data is tiled)")
    parser.add_argument("--batch", type=positive_int, default=None, help="jets per call (images 4096, training 32)")
    parser.add_argument("--reference-jets", type=positive_int, default=2000, help="images: jets for the slow reference")
    parser.add_argument("--image-size", type=positive_int, default=64, help="training: image size")
    parser.add_argument("--steps", type=positive_int, default=6, help="training: steps per timing")
    parser.add_argument("--repeats", type=positive_int, default=3)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.data:
        jets = read_jets(args.data)
    else:
        from toptagger.jets.generator import generate_jets

        jets = generate_jets(args.generate - args.generate // 2, args.generate // 2, seed=args.seed, progress=True)
    if args.what == "training" and len(jets) < (args.batch or 32) * args.steps:
        raise ConfigError(f"training benchmark needs at least batch × steps = {(args.batch or 32) * args.steps} jets")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {len(jets)} distinct jets")
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    if args.what == "images":
        rows = bench_images(jets, args.jets, args.batch or 4096, args.repeats, args.reference_jets)
    else:
        rows = bench_training(jets, args.image_size, args.batch or 32, args.steps, args.repeats)
    print("\n".join(rows))
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
