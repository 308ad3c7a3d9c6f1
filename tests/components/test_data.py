"""The data component's function: copy a reference file (or generate), and name bad URIs."""

from __future__ import annotations

from pathlib import Path

import pytest
from kfp import dsl

from components.data import fetch_dataset, generate_shard_step, shard_plan
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


def test_the_shard_plan_and_a_shard_with_a_dataset_generate_nothing(tiny_file: Path, tmp_path: Path) -> None:
    assert shard_plan("", 3) == [0, 1, 2]
    assert shard_plan(str(tiny_file), 3) == [0]  # one item for the loop; that shard generates nothing
    with pytest.raises(ConfigError, match="n_shards must be >= 1, got 0"):
        shard_plan("", 0)
    jets = artifact(dsl.Dataset, tmp_path / "shard" / "jets")
    info = generate_shard_step(jets, str(tiny_file), 0, 3, 60, 60, 5)
    assert info == {"shard": 0, "n_shards": 3, "blocks": 0, "n_jets": 0} and jets.metadata == info
    with pytest.raises(ConfigError, match=r"workers must be >= 0 \(0: all cores\), got -1"):
        generate_shard_step(jets, "", 0, 3, 60, 60, 5, workers=-1)
    # The data step copies the dataset and ignores the empty shard.
    out = artifact(dsl.Dataset, tmp_path / "data" / "dataset")
    assert fetch_dataset(out, str(tiny_file), 60, 60, 5, shards=[jets])["n_jets"] == 120
    assert Path(out.path).read_bytes() == tiny_file.read_bytes()


def test_the_data_step_merges_shards_and_names_a_missing_one(tiny_file: Path, tmp_path: Path) -> None:
    import pandas as pd

    from toptagger.jets.dataset import KEY

    shards = []
    for shard in range(2):  # 60 + 60 jets, seed 5 as tiny_file: four blocks, two per shard
        jets = artifact(dsl.Dataset, tmp_path / f"shard-{shard}" / "jets")
        assert generate_shard_step(jets, "", shard, 2, 60, 60, 5, workers=1)["blocks"] == 2
        shards.append(jets)
    out = artifact(dsl.Dataset, tmp_path / "data" / "dataset")
    info = fetch_dataset(out, "", 60, 60, 5, shards=shards)
    assert info["n_jets"] == 120 and info["n_shards"] == 2 and info["generator_seed"] == 5
    pd.testing.assert_frame_equal(pd.read_hdf(out.path, KEY), pd.read_hdf(tiny_file, KEY), check_exact=True)
    with pytest.raises(DataError, match=r"the shards lack 2 block\(s\) of the sample"):
        fetch_dataset(out, "", 60, 60, 5, shards=shards[:1])
