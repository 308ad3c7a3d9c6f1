"""Metrics against scikit-learn, bootstrap errors, the mass-window baseline, and the evaluation CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from components.cli import run_cli
from components.errors import DataError
from components.evaluate import METRICS_FILE, ROC_FILE, SCORES_FILE, evaluate_scores, main, mass_window_score
from components.images import ImageConfig
from components.jetdata import JetBatch
from components.metrics import auc, rejection, roc_curve, tagger_metrics
from components.model import TaggerConfig, build_model, save_model

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def known_scores(n: int = 3000, seed: int = 0, ties: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    scores = rng.normal(labels * 1.5, 1.0)
    if ties:
        scores = np.round(scores, 1)  # many equal scores, as saturated probabilities give
    return labels, scores


@pytest.mark.parametrize("ties", [False, True])
def test_roc_auc_and_rejection_agree_with_sklearn(ties: bool) -> None:
    labels, scores = known_scores(ties=ties)
    fpr, tpr, thresholds = roc_curve(labels, scores)
    sk_fpr, sk_tpr, sk_thresholds = sk_roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    np.testing.assert_allclose(thresholds[1:], sk_thresholds[1:])
    assert float(auc(fpr, tpr)) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    for eff in (0.3, 0.5):
        assert rejection(fpr, tpr, eff) == pytest.approx(1 / np.interp(eff, sk_tpr, sk_fpr))
    metrics = tagger_metrics(labels, scores, n_bootstrap=0)
    assert metrics["auc"].value == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert metrics["rejection_0.3"].value == pytest.approx(1 / np.interp(0.3, sk_tpr, sk_fpr))


def test_accuracy_and_bootstrap_errors_are_sensible() -> None:
    labels, scores = known_scores(n=4000, seed=1)
    probabilities = 1 / (1 + np.exp(-(scores - 0.75) * 2))
    metrics = tagger_metrics(labels, scores, probabilities, n_bootstrap=300, seed=2)
    assert metrics["accuracy"].value == pytest.approx(np.mean((probabilities > 0.5) == (labels == 1)))
    # Hanley & McNeil (1982): the standard error of an AUC from its value and class counts
    a, n1, n0 = metrics["auc"].value, labels.sum(), (1 - labels).sum()
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    expected = math.sqrt((a * (1 - a) + (n1 - 1) * (q1 - a * a) + (n0 - 1) * (q2 - a * a)) / (n1 * n0))
    assert metrics["auc"].error == pytest.approx(expected, rel=0.25)
    acc = metrics["accuracy"].value
    assert metrics["accuracy"].error == pytest.approx(math.sqrt(acc * (1 - acc) / len(labels)), rel=0.25)
    # a rejection from few background jets is uncertain, and the spread says so
    assert 0 < metrics["rejection_0.3"].error < metrics["rejection_0.3"].value
    again = tagger_metrics(labels, scores, probabilities, n_bootstrap=300, seed=2)
    assert again == metrics


def test_bad_scores_are_named() -> None:
    labels, scores = known_scores(n=50)
    with pytest.raises(DataError, match="0 \\(QCD\\) or 1 \\(top\\)"):
        tagger_metrics(labels * 2, scores)
    with pytest.raises(DataError, match="NaN or infinite"):
        tagger_metrics(labels, np.where(labels == 1, np.nan, scores))
    with pytest.raises(DataError, match="both classes"):
        tagger_metrics(np.ones(50, int), scores)
    with pytest.raises(DataError, match="equal length"):
        tagger_metrics(labels, scores[:-1])


def test_mass_window_prefers_the_top_mass() -> None:
    def jet(mass: float) -> np.ndarray:
        out = np.zeros((200, 4), np.float32)
        out[0] = [math.sqrt(600.0**2 + mass**2), 600.0, 0.0, 0.0]
        return out

    score = mass_window_score(np.stack([jet(175.0), jet(80.0), jet(260.0), jet(150.0)]))
    assert score[0] == pytest.approx(0.0, abs=1e-2)
    assert score[0] > score[3] > score[1]
    assert score[1] == pytest.approx(-95.0, abs=1e-2) and score[2] == pytest.approx(-85.0, abs=1e-2)


def test_results_json_and_pngs_with_the_baseline_beside(tmp_path: Path) -> None:
    labels, scores = known_scores(n=2000, seed=3)
    # a perfect tagger leaves no background at eps_S = 0.3: JSON gets null, not Infinity
    perfect = labels * 10.0 + scores * 1e-3
    result = evaluate_scores(labels, perfect, 1 / (1 + np.exp(-perfect)), scores, tmp_path, n_bootstrap=20)
    stored = json.loads((tmp_path / METRICS_FILE).read_text())
    assert stored == json.loads(json.dumps(result))
    assert stored["network"]["rejection_0.3"]["value"] is None
    assert stored["network"]["auc"]["value"] == pytest.approx(1.0)
    assert stored["mass_window"]["auc"]["value"] == pytest.approx(roc_auc_score(labels, scores))
    assert stored["mass_window"]["rejection_0.3"]["error"] > 0
    assert stored["n_jets"] == 2000 and stored["n_top"] + stored["n_qcd"] == 2000
    assert set(stored["network_vs_mass_window"]) == {"auc", "rejection_0.3", "rejection_0.5"}
    for name in (ROC_FILE, SCORES_FILE):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC


@pytest.mark.slow
def test_cli_evaluates_a_saved_model(
    jets_file: Path, small_jets: JetBatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.manual_seed(0)
    save_model(build_model(TaggerConfig(image=ImageConfig(image_size=32))), tmp_path / "model")
    args = ["--model", str(tmp_path / "model"), "--data", str(jets_file), "--out", str(tmp_path / "eval")]
    assert run_cli(main, [*args, "--bootstrap", "10"]) == 0
    assert "mass window" in capsys.readouterr().out
    stored = json.loads((tmp_path / "eval" / METRICS_FILE).read_text())
    assert stored["n_jets"] == len(small_jets)
    # on generated jets the mass window alone is strong (reference.md: AUC about 0.96)
    assert stored["mass_window"]["auc"]["value"] > 0.85
    assert (tmp_path / "eval" / ROC_FILE).read_bytes()[:8] == PNG_MAGIC
    assert run_cli(main, [*args, "--split", "test", "--bootstrap", "0"]) == 0
    assert json.loads((tmp_path / "eval" / METRICS_FILE).read_text())["n_jets"] == round(0.15 * len(small_jets))
    assert run_cli(main, ["--model", str(tmp_path / "nothing"), "--data", str(jets_file), "--out", str(tmp_path)]) == 2
    assert "nothing: no such file or folder" in capsys.readouterr().err
