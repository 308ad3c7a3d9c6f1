"""The data component's function: copy a reference file (or generate), and name bad URIs."""

from __future__ import annotations

from pathlib import Path

import pytest
from kfp import dsl

from components.data import fetch_dataset
from tests.components.artifacts import artifact
from toptagger.errors import ConfigError, DataError, StorageError


def test_fetch_copies_a_reference_file_and_names_bad_uris(tiny_file: Path, tmp_path: Path) -> None:
    out = artifact(dsl.Dataset, tmp_path / "data" / "dataset")
    info = fetch_dataset(out, str(tiny_file), 1, 1, 0)
    assert info == {"source": str(tiny_file), "n_jets": 120} and out.metadata["n_jets"] == 120
    assert Path(out.path).read_bytes() == tiny_file.read_bytes()
    with pytest.raises(StorageError, match=r"/no/such/jets.h5: no such dataset file"):
        fetch_dataset(out, "/no/such/jets.h5", 1, 1, 0)
    junk = tmp_path / "junk.h5"
    junk.write_text("not hdf5")
    with pytest.raises(DataError, match=rf"^{junk}: not a readable HDF5 file"):
        fetch_dataset(out, str(junk), 1, 1, 0)
    with pytest.raises(ConfigError, match="number of signal jets must be a whole number >= 1, got 0"):
        fetch_dataset(out, "", 0, 10, 1)
