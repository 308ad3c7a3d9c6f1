"""Fixtures for the pipeline tests: a tiny generated sample, in the reference layout and compact."""

from __future__ import annotations

from pathlib import Path

import pytest

from components.generate import generate_jets
from components.jetdata import JetBatch, write_jets


@pytest.fixture(scope="session")
def tiny_jets() -> JetBatch:
    """60 top + 60 QCD jets from Pythia8 + FastJet (a few seconds on one core)."""
    return generate_jets(60, 60, seed=5, workers=1)


@pytest.fixture(scope="session")
def tiny_file(tiny_jets: JetBatch, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "tiny.h5"
    write_jets(path, tiny_jets)
    return path
