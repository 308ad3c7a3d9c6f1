"""Summarise a reference-format jet file: counts, kinematics per class, and a PNG of the jet mass.

python -m toptagger.jets.summary jets.h5 [--plot jets_summary.png]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from toptagger.cli import run_cli
from toptagger.jets import kinematics as kin
from toptagger.jets.dataset import iter_jets

CLASSES = {1: "top", 0: "QCD"}


def jet_table(uri: str) -> dict[str, np.ndarray]:
    """Per-jet label, pT, eta, mass and multiplicity, streamed so a full reference file fits."""
    columns: dict[str, list[np.ndarray]] = {"label": [], "pt": [], "eta": [], "mass": [], "n": []}
    for batch in iter_jets(uri):
        jets = kin.jet_four_momentum(batch.constituents)
        columns["label"].append(batch.labels)
        columns["pt"].append(kin.pt(jets))
        columns["eta"].append(kin.eta(jets))
        columns["mass"].append(kin.mass(jets))
        columns["n"].append((batch.constituents[..., 0] > 0).sum(axis=1))
    return {k: np.concatenate(v) for k, v in columns.items()}


def class_statistics(table: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    stats: dict[str, dict[str, float]] = {}
    for label, name in CLASSES.items():
        sel = table["label"] == label
        if not sel.any():
            stats[name] = {"jets": 0}
            continue
        stats[name] = {
            "jets": int(sel.sum()),
            "pt_mean": float(table["pt"][sel].mean()),
            "abs_eta_max": float(np.abs(table["eta"][sel]).max()),
            "mass_mean": float(table["mass"][sel].mean()),
            "constituents_mean": float(table["n"][sel].mean()),
        }
    return stats


def plot_mass(data: dict[str, np.ndarray], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.linspace(0, 300, 61)
    for label, name in CLASSES.items():
        ax.hist(data["mass"][data["label"] == label], bins=bins, histtype="step", density=True, label=name, lw=1.5)
    ax.axvline(175, color="grey", ls=":", lw=1)
    ax.set_xlabel("jet mass [GeV]")
    ax.set_ylabel("normalised jets")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m toptagger.jets.summary", description=__doc__.split("\n\n")[0])
    parser.add_argument("uri", help="reference-format .h5 file or s3:// URI")
    parser.add_argument("--plot", type=Path, help="write a jet-mass histogram PNG here")
    args = parser.parse_args(argv)
    table = jet_table(args.uri)
    stats = class_statistics(table)
    print(f"{args.uri}: {sum(s['jets'] for s in stats.values()):,} jets")
    print(f"{'class':<6} {'jets':>8} {'<pT> GeV':>9} {'max|eta|':>9} {'<mass> GeV':>11} {'<constituents>':>15}")
    for name, s in stats.items():
        if not s["jets"]:
            print(f"{name:<6} {0:>8}")
            continue
        print(
            f"{name:<6} {s['jets']:>8,} {s['pt_mean']:>9.1f} {s['abs_eta_max']:>9.2f} "
            f"{s['mass_mean']:>11.1f} {s['constituents_mean']:>15.1f}"
        )
    if args.plot:
        plot_mass(table, args.plot)
        print(f"jet-mass plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
