"""Top-tagging figures of merit with bootstrap uncertainties.

The landscape paper (Kasieczka, Plehn et al., SciPost Phys. 7, 014) ranks taggers by accuracy,
ROC AUC and the background rejection 1/eps_B at fixed signal efficiency eps_S (0.3, also 0.5).
The ROC follows scikit-learn's conventions (one point per distinct score, ties grouped), and
1/eps_B at eps_S is read off the ROC by linear interpolation in (eps_S, eps_B).

Bootstrap replicas reweight the test jets with multinomial counts instead of resampling them, so
the scores are sorted once and every replica's ROC is a weighted cumulative sum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from toptagger.errors import DataError

SIGNAL_EFFICIENCIES: tuple[float, ...] = (0.3, 0.5)


@dataclass(frozen=True)
class Metric:
    """A figure of merit and its bootstrap spread (standard deviation over replicas)."""

    value: float
    error: float

    def to_dict(self) -> dict[str, float | None]:
        # JSON has no infinity: a rejection with no background left is reported as null.
        return {
            "value": self.value if math.isfinite(self.value) else None,
            "error": self.error if math.isfinite(self.error) else None,
        }


def check_scores(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels as int64 0/1 and scores as float64, or a DataError naming what is wrong."""
    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.ndim != 1 or scores.shape != labels.shape:
        raise DataError(f"labels and scores must be 1-D of equal length, got {labels.shape} and {scores.shape}")
    if not np.isin(labels, (0, 1)).all():
        raise DataError("labels must be 0 (QCD) or 1 (top)")
    if not np.isfinite(scores).all():
        raise DataError(f"{int((~np.isfinite(scores)).sum())} score(s) are NaN or infinite")
    n_signal = int(labels.sum())
    if n_signal == 0 or n_signal == len(labels):
        raise DataError(f"need both classes to compute a ROC, got {n_signal} top of {len(labels)} jets")
    return labels.astype(np.int64), scores


def _sorted(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    order = np.argsort(-scores, kind="stable")
    s = scores[order]
    # The last jet of each group of equal scores: the ROC moves only there (ties are grouped).
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    return order, last, s


def _weighted_roc(labels_sorted: np.ndarray, weights: np.ndarray, last: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """eps_B (fpr) and eps_S (tpr) with a leading (0, 0), for weights [..., N] in score order."""
    tp = np.cumsum(weights * labels_sorted, axis=-1)[..., last]
    fp = np.cumsum(weights * (1 - labels_sorted), axis=-1)[..., last]
    zero = np.zeros((*tp.shape[:-1], 1))
    tp = np.concatenate([zero, tp], axis=-1)
    fp = np.concatenate([zero, fp], axis=-1)
    return fp / fp[..., -1:], tp / tp[..., -1:]


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(eps_B, eps_S, thresholds), as ``sklearn.metrics.roc_curve(..., drop_intermediate=False)``."""
    labels, scores = check_scores(labels, scores)
    order, last, s = _sorted(labels, scores)
    fpr, tpr = _weighted_roc(labels[order].astype(np.float64), np.ones(len(s)), last)
    return fpr, tpr, np.r_[np.inf, s[last]]


def auc(fpr: np.ndarray, tpr: np.ndarray) -> np.ndarray:
    """Area under the ROC by the trapezoid rule (along the last axis)."""
    return np.trapezoid(tpr, fpr, axis=-1)


def rejection(fpr: np.ndarray, tpr: np.ndarray, signal_efficiency: float) -> float:
    """1/eps_B at ``signal_efficiency``, interpolating the ROC linearly; inf when eps_B is 0 there."""
    if not 0 < signal_efficiency <= 1:
        raise DataError(f"signal efficiency must be in (0, 1], got {signal_efficiency}")
    # tpr is non-decreasing; np.interp wants increasing x, and on flat stretches the
    # right-most point (largest eps_B) is the conservative choice, as in the landscape code.
    eps_b = float(np.interp(signal_efficiency, tpr, fpr))
    return 1.0 / eps_b if eps_b > 0 else math.inf


def accuracy(labels: np.ndarray, probabilities: np.ndarray, threshold: float = 0.5) -> float:
    """Fraction of jets on the right side of ``threshold``."""
    return float(np.mean((np.asarray(probabilities) > threshold) == (np.asarray(labels) == 1)))


def tagger_metrics(
    labels: np.ndarray,
    scores: np.ndarray,
    probabilities: np.ndarray | None = None,
    n_bootstrap: int = 200,
    seed: int = 0,
) -> dict[str, Metric]:
    """AUC, 1/eps_B at each of :data:`SIGNAL_EFFICIENCIES` and, given probabilities, accuracy.

    ``scores`` only need to rank jets (a logit, or minus a mass distance); accuracy needs
    probabilities with a 0.5 threshold. Errors are the standard deviation over ``n_bootstrap``
    replicas of the test set (multinomial reweighting with ``seed``); for 1/eps_B it is the spread
    of eps_B propagated to 1/eps_B. Fewer than 2 replicas give errors of 0.
    """
    labels, scores = check_scores(labels, scores)
    order, last, _ = _sorted(labels, scores)
    y = labels[order].astype(np.float64)
    names = ["auc", *(f"rejection_{eff}" for eff in SIGNAL_EFFICIENCIES)]
    if probabilities is not None:
        names.append("accuracy")
        correct = ((np.asarray(probabilities, np.float64) > 0.5) == (labels == 1))[order].astype(np.float64)

    def evaluate(weights: np.ndarray) -> np.ndarray:
        # eps_B rather than 1/eps_B: a replica with no background left at eps_S has eps_B = 0,
        # which a spread of eps_B handles and a spread of 1/eps_B (infinite) does not.
        fpr, tpr = _weighted_roc(y, weights, last)
        values = [float(auc(fpr, tpr)), *(1.0 / rejection(fpr, tpr, eff) for eff in SIGNAL_EFFICIENCIES)]
        if probabilities is not None:
            values.append(float(np.dot(weights, correct) / weights.sum()))
        return np.array(values)

    central = evaluate(np.ones(len(y)))
    if n_bootstrap > 1:
        rng = np.random.default_rng(seed)
        uniform = np.full(len(y), 1.0 / len(y))
        # One replica at a time keeps memory at O(N); the loop is over replicas, not jets.
        replicas = np.array([evaluate(rng.multinomial(len(y), uniform).astype(np.float64)) for _ in range(n_bootstrap)])
        errors = np.std(replicas, axis=0, ddof=1)
    else:
        errors = np.zeros(len(names))
    # back from eps_B to 1/eps_B, propagating the error: sigma(1/e) = sigma(e) / e^2
    rejection_rows = slice(1, 1 + len(SIGNAL_EFFICIENCIES))
    eps_b, eps_err = central[rejection_rows].copy(), errors[rejection_rows].copy()
    with np.errstate(divide="ignore", invalid="ignore"):
        central[rejection_rows] = np.where(eps_b > 0, 1.0 / eps_b, np.inf)
        errors[rejection_rows] = np.where(eps_b > 0, eps_err / eps_b**2, np.inf)
    return {name: Metric(float(v), float(e)) for name, v, e in zip(names, central, errors, strict=True)}
