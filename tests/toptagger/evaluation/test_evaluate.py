"""Evaluation: the mass-window baseline, and metrics.json and the PNGs with the baseline beside."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from tests.tolerances import EPS32
from tests.toptagger.evaluation.scores import known_scores
from toptagger.evaluation.evaluate import METRICS_FILE, ROC_FILE, SCORES_FILE, evaluate_scores, mass_window_score

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_mass_window_prefers_the_top_mass() -> None:
    def jet(mass: float) -> np.ndarray:
        out = np.zeros((200, 4), np.float32)
        out[0] = [math.sqrt(600.0**2 + mass**2), 600.0, 0.0, 0.0]
        return out

    def slack(mass: float) -> float:
        # E = sqrt(600^2 + m^2) stored as float32 (u E) moves m^2 = E^2 - p^2 by 2 E^2 u, so m by
        # E^2 u / m; doubled for the float64 arithmetic that follows
        return 2 * (600.0**2 + mass**2) * EPS32 / mass

    score = mass_window_score(np.stack([jet(175.0), jet(80.0), jet(260.0), jet(150.0)]))
    assert score[0] == pytest.approx(0.0, abs=slack(175.0))
    assert score[0] > score[3] > score[1]
    assert score[1] == pytest.approx(-95.0, abs=slack(80.0)) and score[2] == pytest.approx(-85.0, abs=slack(260.0))


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
