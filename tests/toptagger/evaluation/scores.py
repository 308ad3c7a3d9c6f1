"""Seeded scores with a known separation, for the metrics and evaluation tests."""

from __future__ import annotations

import numpy as np


def known_scores(n: int = 3000, seed: int = 0, ties: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    scores = rng.normal(labels * 1.5, 1.0)
    if ties:
        scores = np.round(scores, 1)  # many equal scores, as saturated probabilities give
    return labels, scores
