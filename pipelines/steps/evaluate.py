"""The evaluate step: the tagger and the jet-mass window on the held-out test jets.

Outputs: scalar ``Metrics``, the ROC as ``ClassificationMetrics`` (the KFP UI draws it), the
evaluation folder (``metrics.json``, ``roc.png``, ``scores.png``) and an HTML report.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

import numpy as np

from components.evaluate import METRICS_FILE, ROC_FILE, SCORES_FILE, evaluate_scores, mass_window_score
from components.metrics import SIGNAL_EFFICIENCIES, roc_curve
from components.model import load_model, score_jets
from components.train import MODEL_DIR
from pipelines.steps.common import load_jets, log

ROC_POINTS = 200  # the UI draws a few hundred points well; a full ROC has one per test jet


def run(
    model: Any,
    test_jets: Any,
    metrics: Any,
    roc: Any,
    evaluation: Any,
    report: Any,
    n_bootstrap: int,
    seed: int,
) -> dict[str, Any]:
    jets = load_jets(test_jets.path)
    tagger = load_model(Path(model.path) / MODEL_DIR)
    out = Path(evaluation.path)
    # evaluate_model's steps, keeping the logits for the ROC artifact instead of scoring twice.
    logit = score_jets(tagger, jets.constituents, logits=True)
    probability = 1.0 / (1.0 + np.exp(-logit))
    baseline = mass_window_score(jets.constituents)
    result = evaluate_scores(jets.labels, logit, probability, baseline, out, n_bootstrap=n_bootstrap, seed=seed)
    flat = flatten(result)
    for key, value in flat.items():
        metrics.log_metric(key, value)
    evaluation.metadata.update(flat)
    log_roc(roc, jets.labels, logit)
    write_report(Path(report.path), result, out)
    log.info(
        "test AUC %.4f (mass window %.4f), 1/eps_B at eps_S=0.3: %s (mass window %s)",
        flat["test_auc"], flat["mass_window_auc"],
        flat.get("test_rejection_0.3", "inf"), flat.get("mass_window_rejection_0.3", "inf"),
    )  # fmt: skip
    return result


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


def log_roc(roc: Any, labels: np.ndarray, scores: np.ndarray) -> None:
    """The network's ROC, thinned to about ROC_POINTS points, as KFP ClassificationMetrics."""
    fpr, tpr, thresholds = roc_curve(labels, scores)
    keep = np.unique(np.linspace(0, len(fpr) - 1, min(ROC_POINTS, len(fpr))).round().astype(int))
    # The first threshold is +inf (nothing selected), which JSON cannot hold.
    finite = np.where(np.isfinite(thresholds), thresholds, np.nanmax(thresholds[np.isfinite(thresholds)]) + 1)
    roc.log_roc_curve(fpr[keep].tolist(), tpr[keep].tolist(), finite[keep].tolist())
    predicted = (scores > 0).astype(int)  # logit 0 = probability 0.5
    matrix = [[int(np.sum((labels == t) & (predicted == p))) for p in (0, 1)] for t in (0, 1)]
    roc.log_confusion_matrix(["qcd", "top"], matrix)


def _png(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def write_report(path: Path, result: dict[str, Any], folder: Path) -> None:
    """A self-contained HTML page (images inlined): the KFP UI shows it as the step's visualization."""

    def cell(metric: dict[str, Any]) -> str:
        if metric.get("value") is None:
            return "∞ (no background left)"
        error = f" ± {metric['error']:.2g}" if metric.get("error") is not None else ""
        return f"{metric['value']:.4g}{error}"

    net, base = result["network"], result["mass_window"]
    rows = [("AUC", "auc"), *((f"1/εB at εS = {e}", f"rejection_{e}") for e in SIGNAL_EFFICIENCIES)]
    body = "".join(
        f"<tr><td>{html.escape(label)}</td><td>{cell(net[key])}</td><td>{cell(base[key])}</td></tr>"
        for label, key in rows
    )
    body += f"<tr><td>accuracy</td><td>{cell(net['accuracy'])}</td><td></td></tr>"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>top-tagger evaluation</title></head><body>"
        f"<h2>Test set: {result['n_top']} top + {result['n_qcd']} QCD jets</h2>"
        "<table border='1' cellpadding='4'><tr><th></th><th>ResNet-50</th><th>mass window</th></tr>"
        f"{body}</table><p>± = standard deviation over {result['bootstrap_replicas']} bootstrap replicas.</p>"
        f"<img alt='ROC' src='data:image/png;base64,{_png(folder / ROC_FILE)}'>"
        f"<img alt='scores' src='data:image/png;base64,{_png(folder / SCORES_FILE)}'>"
        f"<p>Full numbers: {METRICS_FILE} in the evaluation artifact.</p></body></html>\n"
    )
