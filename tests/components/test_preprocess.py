"""The preprocess component's function: a seeded split with a held-out test part, stored compact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from kfp import dsl

from components.preprocess import split_dataset
from tests.components.artifacts import artifact
from toptagger.errors import ConfigError
from toptagger.jets.compact import jets_hash, load_jets
from toptagger.jets.dataset import JetBatch


def test_preprocess_holds_out_a_test_split(tiny_file: Path, tiny_jets: JetBatch, tmp_path: Path) -> None:
    dataset = artifact(dsl.Dataset, tiny_file)
    fit, test = artifact(dsl.Dataset, tmp_path / "fit"), artifact(dsl.Dataset, tmp_path / "test")
    summary = split_dataset(dataset, fit, test, seed=3, val_fraction=0.15, test_fraction=0.2)
    fit_jets, test_jets = load_jets(fit.path), load_jets(test.path)
    assert (len(fit_jets), len(test_jets)) == (96, 24) == (summary["n_fit"], summary["n_test"])
    # Together exactly the input jets, none twice: compare whole rows as bytes.
    rows = {r.tobytes() for r in tiny_jets.constituents.reshape(120, -1)}
    width = max(fit_jets.constituents.shape[1], test_jets.constituents.shape[1])
    got = []
    for part in (fit_jets, test_jets):
        padded = np.zeros((len(part), 200, 4), np.float32)
        padded[:, : part.constituents.shape[1]] = part.constituents
        got += [r.tobytes() for r in padded.reshape(len(part), -1)]
    assert set(got) == rows and len(got) == 120 and width < 200  # stored compact
    assert fit.metadata["dataset_sha256"] == test.metadata["dataset_sha256"] == jets_hash(tiny_jets)
    assert test.metadata["n_top"] == int(test_jets.labels.sum())
    with pytest.raises(ConfigError, match="promotion gate needs test jets"):
        split_dataset(dataset, fit, test, seed=3, val_fraction=0.15, test_fraction=0.0)
