"""Data-parallel training on 1 rank and on N gloo ranks: throughput and agreement, or memory per rank.

    python -m benchmarks.training --generate 1200 --ranks 1 2 --out docs/benchmarks/training.md
    python -m benchmarks.training --generate 2000 --memory 1200000 --ranks 1 2

Each world size runs the real ``python -m toptagger.training`` (under ``torchrun --standalone`` for
more than one rank) on the same jets, settings and epochs, one after the other in this process's
sitting. Reported per world size: training jets/s (the trainer's own per-epoch figure, which
leaves out validation and checkpoints; the mean over the epochs after the first, which warms up),
its ratio to 1 rank, the wall time, and the validation AUC of the best model with its bootstrap
error (toptagger.evaluation.metrics.tagger_metrics on the validation split). ``batch_size`` is the
batch over all ranks, so the runs take the same steps and only the per-rank batch-norm statistics
and float rounding tell them apart: their AUCs should agree within the bootstrap error.

With ``--memory N`` the runs train a few steps on a reference-format file of N jets (the
generated jets tiled: memory does not care which jets they are) and the table gives each world
size's peak resident memory per rank (the trainer's ``peak_rss_mb``), against the file and the
reading buffer (``--chunk-size`` jets): each rank holds only its share of the file, so the peak
is that share plus a constant (torch, the network, the optimiser).

Every rank gets cores / ranks torch threads (toptagger.training.distributed.threads_per_rank): on
2 cores, 2 ranks run 1 thread each, against 2 threads for the single rank. CPU-only: on a GPU
node the same commands with ``--device cuda`` use nccl.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from benchmarks.common import machine, publish
from toptagger.cli import positive_int, run_cli
from toptagger.errors import DataError, TaggerError
from toptagger.jets.compact import save_jets
from toptagger.jets.dataset import JetBatch
from toptagger.training.config import DEFAULT_IMAGE, TrainConfig, to_arguments

REPO = Path(__file__).resolve().parents[1]


def command(ranks: int, args: list[str]) -> list[str]:
    """``python -m toptagger.training`` for one rank, else torchrun with ``ranks`` local processes."""
    if ranks == 1:
        return [sys.executable, "-m", "toptagger.training", *args]
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    return [*run, "-m", "toptagger.training", *args]


def run_training(
    ranks: int, data: Path, out: Path, config: TrainConfig, extra: Sequence[str] = ()
) -> tuple[dict, float]:
    """Train with ``ranks`` processes; the run's training.json and its wall time."""
    args = ["--data", str(data), "--out", str(out), "--device", "cpu", "--no-progress", *to_arguments(config), *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    result = subprocess.run(command(ranks, args), cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise TaggerError(f"training with {ranks} rank(s) failed:\n{result.stderr[-3000:]}")
    return json.loads((out / "training.json").read_text()), seconds


def validation_metric(jets: JetBatch, model_dir: Path, config: TrainConfig, n_bootstrap: int) -> tuple[float, float]:
    """AUC and bootstrap error of the saved model on the run's validation split."""
    from toptagger.evaluation.metrics import tagger_metrics
    from toptagger.model import load_model, score_jets
    from toptagger.training.data import split_indices

    _, val_idx, _ = split_indices(len(jets), config.seed, config.val_fraction, config.test_fraction)
    val = jets[val_idx]
    scores = score_jets(load_model(model_dir), val.constituents, logits=True)
    result = tagger_metrics(val.labels, scores, n_bootstrap=n_bootstrap, seed=0)["auc"]
    return result.value, result.error


def steady_rate(history: list[dict]) -> float:
    """Mean training jets/s over the epochs after the first (which includes warm-up), else the first."""
    rates = [h["jets_per_second"] for h in history]
    return float(np.mean(rates[1:] if len(rates) > 1 else rates))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.training", description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="jets (path or s3://): reference layout or compact .npz")
    source.add_argument("--generate", type=positive_int, help="generate this many jets (half top) first")
    parser.add_argument("--seed", type=int, default=1, help="generation and training seed")
    parser.add_argument("--ranks", type=positive_int, nargs="+", default=[1, 2], help="world sizes to run")
    parser.add_argument("--image-size", type=positive_int, default=32)
    parser.add_argument("--epochs", type=positive_int, default=2)
    parser.add_argument("--batch-size", type=positive_int, default=32, help="jets per step over all ranks")
    parser.add_argument("--max-steps-per-epoch", type=positive_int, default=None)
    parser.add_argument("--bootstrap", type=positive_int, default=200, help="bootstrap replicas of the AUC")
    parser.add_argument(
        "--memory",
        type=positive_int,
        metavar="N",
        help="measure peak memory per rank instead, on a reference-format file of N jets (the jets tiled)",
    )
    parser.add_argument("--chunk-size", type=positive_int, default=5000, help="with --memory: jets read at a time")
    parser.add_argument("--val-fraction", type=float, default=0.15, help="share of the jets that validates")
    parser.add_argument("--out", help="also write the markdown table here (e.g. docs/benchmarks/training.md)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from toptagger.training.data import load_training_jets

    args = build_parser().parse_args(argv)
    if 1 not in args.ranks:
        raise DataError("--ranks must include 1: the other world sizes are compared with it")
    if args.data:
        jets = load_training_jets(args.data)
    else:
        from toptagger.jets.generator import generate_jets

        jets = generate_jets(args.generate - args.generate // 2, args.generate // 2, seed=args.seed, progress=True)
    config = TrainConfig(
        image=dataclasses.replace(DEFAULT_IMAGE, image_size=args.image_size),
        epochs=args.epochs,
        batch_size=args.batch_size,
        max_steps_per_epoch=args.max_steps_per_epoch,
        patience=args.epochs,
        seed=args.seed,
        val_fraction=args.val_fraction,
    )
    if args.memory:
        publish(memory_report(jets, args, config, argv), args.out)
        return 0
    load_before = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-training-") as tmp:
        data = Path(tmp) / "jets.npz"
        save_jets(data, jets)
        for ranks in sorted(set(args.ranks)):
            summary, seconds = run_training(ranks, data, Path(tmp) / f"ranks{ranks}", config)
            auc, error = validation_metric(jets, Path(tmp) / f"ranks{ranks}" / "model", config, args.bootstrap)
            rows.append((ranks, steady_rate(summary["history"]), seconds, auc, error, summary))
    base = rows[0]
    n_train, n_val = base[5]["n_train"], base[5]["n_val"]
    lines = [
        f"Measured with `python -m benchmarks.training {' '.join(argv if argv is not None else sys.argv[1:])}` "
        f"on {machine()}, {time.strftime('%Y-%m-%d')}; load average {load_before:.2f} before, "
        f"{os.getloadavg()[0]:.2f} after.",
        "",
        f"ResNet-50, {args.image_size}×{args.image_size} images, batch {args.batch_size} over all ranks, "
        f"{args.epochs} epoch(s), {n_train} training and {n_val} validation jets, CPU (gloo), "
        f"cores / ranks threads per rank.",
        "",
        "| ranks | threads per rank | training jets/s | ratio to 1 rank | wall time | best val AUC ± bootstrap |",
        "|---|---|---|---|---|---|",
    ]
    cores = len(os.sched_getaffinity(0))
    for ranks, rate, seconds, auc, error, _ in rows:
        lines.append(
            f"| {ranks} | {max(1, cores // ranks)} | {rate:.1f} | {rate / base[1]:.2f} | {seconds:.0f} s | "
            f"{auc:.4f} ± {error:.4f} |"
        )
    lines.append("")
    for ranks, _, _, auc, error, _ in rows[1:]:
        combined = float(np.hypot(error, base[4]))
        verdict = "within" if abs(auc - base[3]) <= combined else "outside"
        lines.append(
            f"- {ranks} ranks against 1: ΔAUC = {auc - base[3]:+.4f}, {verdict} the combined bootstrap error "
            f"{combined:.4f}."
        )
    publish("\n".join(lines) + "\n", args.out)
    return 0


def tiled(jets: JetBatch, n: int, chunk: int) -> Iterator[JetBatch]:
    """``n`` jets: ``jets`` over and over, ``chunk`` at a time."""
    for first in range(0, n, chunk):
        rows = np.arange(first, min(first + chunk, n)) % len(jets)
        yield jets[rows]


def memory_report(jets: JetBatch, args: argparse.Namespace, config: TrainConfig, argv: Sequence[str] | None) -> str:
    """Peak resident memory per rank for each world size, on one reference-format file of ``args.memory`` jets."""
    from toptagger.jets.dataset import COLUMNS, write_jet_chunks

    load_before = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-training-memory-") as tmp:
        data = Path(tmp) / "train.h5"
        write_jet_chunks(data, tiled(jets, args.memory, 20_000))
        file_mb = data.stat().st_size / 2**20
        for ranks in sorted(set(args.ranks)):
            extra = ["--chunk-size", str(args.chunk_size), "--prefetch", "0"]
            summary, seconds = run_training(ranks, data, Path(tmp) / f"ranks{ranks}", config, extra)
            rows.append((ranks, max(summary["peak_rss_mb"]), summary["peak_rss_mb"], seconds))
    buffer_mb = args.chunk_size * len(COLUMNS) * 4 / 2**20  # one chunk of the table, as read
    base = rows[0][1]
    command_line = " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        f"Measured with `python -m benchmarks.training {command_line}` on {machine()}, "
        f"{time.strftime('%Y-%m-%d')}; load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after.",
        "",
        f"A reference-format file of {args.memory} jets ({file_mb:.0f} MB; {len(jets)} generated jets tiled), "
        f"read {args.chunk_size} jets at a time (a {buffer_mb:.0f} MB buffer: the file is "
        f"{file_mb / buffer_mb:.0f}× it); ResNet-50 at {config.image.image_size}×{config.image.image_size}, "
        f"batch {config.batch_size}, {config.max_steps_per_epoch or 'all'} step(s), validation share "
        f"{config.val_fraction}. Peak RSS is each rank's own (getrusage), as the trainer reports it.",
        "",
        "| ranks | peak RSS per rank (largest) | each rank | ratio to 1 rank | wall time |",
        "|---|---|---|---|---|",
    ]
    for ranks, peak, each, seconds in rows:
        shown = ", ".join(f"{mb:.0f}" for mb in each)
        lines.append(f"| {ranks} | {peak:.0f} MB | {shown} MB | {peak / base:.2f} | {seconds:.0f} s |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
