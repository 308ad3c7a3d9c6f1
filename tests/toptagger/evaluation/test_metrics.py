"""Figures of merit: ROC, AUC and 1/eps_B against scikit-learn, bootstrap errors, bad scores."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from tests.tolerances import gamma64
from tests.toptagger.evaluation.scores import known_scores
from toptagger.errors import DataError
from toptagger.evaluation.metrics import auc, rejection, roc_curve, tagger_metrics


@pytest.mark.parametrize("ties", [False, True])
def test_roc_auc_and_rejection_agree_with_sklearn(ties: bool) -> None:
    labels, scores = known_scores(ties=ties)
    fpr, tpr, thresholds = roc_curve(labels, scores)
    sk_fpr, sk_tpr, sk_thresholds = sk_roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    np.testing.assert_allclose(thresholds[1:], sk_thresholds[1:])
    # two float64 trapezoid sums over at most n points, whose terms add up to the AUC <= 1
    assert float(auc(fpr, tpr)) == pytest.approx(roc_auc_score(labels, scores), abs=2 * gamma64(len(labels)))
    for eff in (0.3, 0.5):
        assert rejection(fpr, tpr, eff) == pytest.approx(1 / np.interp(eff, sk_tpr, sk_fpr))
    metrics = tagger_metrics(labels, scores, n_bootstrap=0)
    assert metrics["auc"].value == pytest.approx(roc_auc_score(labels, scores), abs=2 * gamma64(len(labels)))
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
