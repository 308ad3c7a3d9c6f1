"""Evaluate a saved tagger on a test sample, beside the jet-mass-window baseline.

Writes ``metrics.json``, ``roc.png`` (background rejection 1/eps_B against signal efficiency eps_S,
log scale, as in the landscape paper) and ``scores.png`` (score distribution per class) into an
output folder, for the pipeline to log to MLflow and the Kubeflow UI.

The baseline is always computed on the same jets: score = -|m_jet - 175 GeV|. On generated jets
without detector smearing it is strong (AUC about 0.96, 1/eps_B about 330 at eps_S = 0.3), so a
network is only worth something where it beats it by more than the combined uncertainty.

    python -m components.evaluate --model runs/demo/model --data test.h5 --out runs/demo/eval
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from components.cli import positive_int, run_cli
from components.errors import ConfigError
from components.jetdata import JetBatch, read_jets
from components.kinematics import jet_four_momentum, mass
from components.metrics import SIGNAL_EFFICIENCIES, Metric, roc_curve, tagger_metrics
from components.model import JetTagger, load_model, score_jets

log = logging.getLogger(__name__)

TOP_MASS_GEV = 175.0
METRICS_FILE = "metrics.json"
ROC_FILE = "roc.png"
SCORES_FILE = "scores.png"


def mass_window_score(constituents: np.ndarray) -> np.ndarray:
    """The baseline tagger: -|m_jet - 175 GeV| (closer to the top mass = more top-like)."""
    return -np.abs(mass(jet_four_momentum(constituents)) - TOP_MASS_GEV)


def _rejections() -> list[str]:
    return [f"rejection_{eff}" for eff in SIGNAL_EFFICIENCIES]


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _compare(network: Metric, baseline: Metric) -> dict[str, Any]:
    """Network minus baseline, and whether it exceeds the combined bootstrap uncertainty."""
    difference = network.value - baseline.value
    combined = math.hypot(network.error, baseline.error)
    # NaN (an error from replicas with no background left) compares False: no claim is made.
    beats = bool(difference > combined)
    return {
        "difference": _finite(difference),
        "combined_error": _finite(combined),
        "network_beats_baseline": beats,
    }


def _summary(metrics: dict[str, Metric]) -> dict[str, Any]:
    return {name: metric.to_dict() for name, metric in metrics.items()}


def evaluate_scores(
    labels: np.ndarray,
    network_logit: np.ndarray,
    network_probability: np.ndarray,
    baseline_score: np.ndarray,
    out_dir: Path,
    n_bootstrap: int = 200,
    seed: int = 0,
) -> dict[str, Any]:
    """Metrics JSON and plots for given scores (the model-free half of :func:`evaluate_model`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    # Logits rank jets without the ties that float32 probabilities saturating at 1.0 would make.
    network = tagger_metrics(labels, network_logit, network_probability, n_bootstrap, seed)
    baseline = tagger_metrics(labels, baseline_score, None, n_bootstrap, seed)
    comparison = {name: _compare(network[name], baseline[name]) for name in ("auc", *_rejections())}
    result = {
        "n_jets": len(labels),
        "n_top": int(np.sum(labels == 1)),
        "n_qcd": int(np.sum(labels == 0)),
        "bootstrap_replicas": n_bootstrap,
        "network": _summary(network),
        "mass_window": _summary(baseline) | {"definition": f"-|m_jet - {TOP_MASS_GEV} GeV|"},
        "network_vs_mass_window": comparison,
    }
    with (out_dir / METRICS_FILE).open("w") as fh:
        json.dump(result, fh, indent=2, allow_nan=False)
    plot_roc(labels, {"ResNet-50": network_logit, "mass window": baseline_score}, out_dir / ROC_FILE)
    plot_scores(labels, network_probability, out_dir / SCORES_FILE)
    return result


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


def evaluate_model(
    model: JetTagger,
    jets: JetBatch,
    out_dir: str | Path,
    n_bootstrap: int = 200,
    seed: int = 0,
    batch_size: int = 256,
    device: str = "cpu",
) -> dict[str, Any]:
    """Score ``jets`` with ``model`` and write the metrics JSON and PNGs into ``out_dir``."""
    logit = score_jets(model, jets.constituents, batch_size=batch_size, device=device, logits=True)
    probability = 1.0 / (1.0 + np.exp(-logit))
    baseline = mass_window_score(jets.constituents)
    return evaluate_scores(jets.labels, logit, probability, baseline, Path(out_dir), n_bootstrap, seed)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m components.evaluate",
        description="Evaluate a saved tagger on a test sample, beside the jet-mass-window baseline.",
    )
    parser.add_argument("--model", required=True, help="saved model: folder, s3:// prefix or models:/name@alias")
    parser.add_argument("--data", required=True, help="test jets in the reference layout (path or s3://)")
    parser.add_argument("--out", required=True, type=Path, help="folder for metrics.json, roc.png, scores.png")
    parser.add_argument(
        "--split",
        choices=("all", "test"),
        default="all",
        help="'all' jets of --data (a separate test file), or the seeded 'test' split made by training",
    )
    parser.add_argument(
        "--split-seed", type=int, default=0, help="seed of the train/val/test split (with --split test)"
    )
    parser.add_argument("--val-fraction", type=float, default=0.15)
    parser.add_argument("--test-fraction", type=float, default=0.15)
    parser.add_argument("--bootstrap", type=int, default=200, help="bootstrap replicas for the uncertainties")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--batch-size", type=positive_int, default=256)
    parser.add_argument("--device", default="cpu")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.bootstrap < 0:
        raise ConfigError(f"--bootstrap must be >= 0, got {args.bootstrap}")
    jets = read_jets(args.data)
    if args.split == "test":
        from components.train import split_indices

        jets = jets[split_indices(len(jets), args.split_seed, args.val_fraction, args.test_fraction)[2]]
    model = load_model(args.model)
    result = evaluate_model(model, jets, args.out, args.bootstrap, args.seed, args.batch_size, args.device)
    net, base = result["network"], result["mass_window"]
    for name in ("auc", *_rejections()):
        print(f"{name:16s} network {_fmt(net[name])}   mass window {_fmt(base[name])}")
    print(f"accuracy         network {_fmt(net['accuracy'])}")
    print(f"wrote {args.out / METRICS_FILE}, {args.out / ROC_FILE}, {args.out / SCORES_FILE}")
    return 0


def _fmt(metric: dict[str, float | None]) -> str:
    value, error = metric["value"], metric["error"]
    if value is None:
        return "inf (no background left)"
    return f"{value:.4g} ± {error:.2g}" if error is not None else f"{value:.4g}"


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
