"""The evaluation's PNG figures: the ROC as the landscape paper draws it, and the score distributions."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from toptagger.evaluation.metrics import SIGNAL_EFFICIENCIES, roc_curve


def plot_roc(labels: np.ndarray, scores: dict[str, np.ndarray], path: Path) -> None:
    """1/eps_B against eps_S, log y, one curve per tagger (the landscape paper's figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for name, score in scores.items():
        fpr, tpr, _ = roc_curve(labels, score)
        keep = fpr > 0
        ax.plot(tpr[keep], 1.0 / fpr[keep], label=name)
    for eff in SIGNAL_EFFICIENCIES:
        ax.axvline(eff, color="grey", lw=0.6, ls=":")
    ax.set_yscale("log")
    ax.set_xlim(0, 1)
    ax.set_xlabel(r"signal efficiency $\epsilon_S$")
    ax.set_ylabel(r"background rejection $1/\epsilon_B$")
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)


def plot_scores(labels: np.ndarray, probability: np.ndarray, path: Path) -> None:
    """Histogram of the network's top probability for top and QCD jets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.0))
    bins = np.linspace(0, 1, 41)
    for label, name in ((1, "top"), (0, "QCD")):
        ax.hist(probability[labels == label], bins=bins, histtype="step", density=True, label=name)
    ax.set_yscale("log")
    ax.set_xlabel("network top probability")
    ax.set_ylabel("density")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)
