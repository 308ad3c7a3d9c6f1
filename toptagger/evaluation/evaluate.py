"""Evaluate a saved tagger on a test sample, beside the jet-mass-window baseline.

Writes ``metrics.json``, ``roc.png`` (background rejection 1/eps_B against signal efficiency eps_S,
log scale, as in the landscape paper) and ``scores.png`` (score distribution per class) into an
output folder, for the pipeline to log to MLflow and the Kubeflow UI.

The baseline is always computed on the same jets: score = -|m_jet - 175 GeV|. On generated jets
without detector smearing it is strong (AUC about 0.96, 1/eps_B about 330 at eps_S = 0.3), so a
network is only worth something where it beats it by more than the combined uncertainty.
The command line is ``python -m components.evaluate`` (the pipeline's evaluate step).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from toptagger.evaluation.metrics import SIGNAL_EFFICIENCIES, Metric, tagger_metrics
from toptagger.evaluation.plots import plot_roc, plot_scores
from toptagger.jets.dataset import JetBatch
from toptagger.jets.kinematics import jet_four_momentum, mass
from toptagger.model import JetTagger, score_jets

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


def network_scores(
    model: JetTagger, constituents: np.ndarray, batch_size: int = 256, device: str = "cpu"
) -> tuple[np.ndarray, np.ndarray]:
    """(top-minus-QCD logit, top probability) of each jet; logits rank without float32 saturation ties."""
    logit = score_jets(model, constituents, batch_size=batch_size, device=device, logits=True)
    return logit, 1.0 / (1.0 + np.exp(-logit))


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
    logit, probability = network_scores(model, jets.constituents, batch_size, device)
    baseline = mass_window_score(jets.constituents)
    return evaluate_scores(jets.labels, logit, probability, baseline, Path(out_dir), n_bootstrap, seed)


def flatten(result: dict[str, Any]) -> dict[str, float]:
    """Scalar metrics: ``test_*`` for the network, ``mass_window_*`` for the baseline (None dropped)."""
    flat: dict[str, float] = {"test_jets": float(result["n_jets"])}
    for prefix, block in (("test", result["network"]), ("mass_window", result["mass_window"])):
        for name, metric in block.items():
            if isinstance(metric, dict) and metric.get("value") is not None:
                flat[f"{prefix}_{name}"] = float(metric["value"])
                if metric.get("error") is not None:
                    flat[f"{prefix}_{name}_error"] = float(metric["error"])
    return flat
