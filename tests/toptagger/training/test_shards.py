"""Each rank's share of the jets, streamed from the file: the same rows from every source, bounded memory."""

from __future__ import annotations

import tracemalloc
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from toptagger.errors import DataError
from toptagger.jets.compact import save_jets
from toptagger.jets.dataset import JetBatch, write_jets
from toptagger.training.config import TrainConfig
from toptagger.training.data import RankData, rank_data, split_indices
from toptagger.training.distributed import World
from toptagger.training.shards import count_rows, read_shares


@pytest.fixture(scope="module")
def sources(small_jets: JetBatch, jets_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    compact = tmp_path_factory.mktemp("shards") / "fit.npz"
    save_jets(compact, small_jets)
    return {"memory": small_jets, "reference": jets_file, "compact": compact}


def _same(got: JetBatch, expected: JetBatch) -> None:
    width = got.constituents.shape[1]
    np.testing.assert_array_equal(got.constituents, expected.constituents[:, :width])
    assert not expected.constituents[:, width:].any()  # only padding was trimmed
    for field in ("labels", "truth", "ttv"):
        np.testing.assert_array_equal(getattr(got, field), getattr(expected, field))


@pytest.mark.parametrize("chunk_size", [1, 7, 10_000])
def test_every_source_gives_the_rows_asked_for(
    small_jets: JetBatch, sources: dict[str, object], chunk_size: int
) -> None:
    rng = np.random.default_rng(chunk_size)
    rows = [np.sort(rng.choice(len(small_jets), size, replace=False)) for size in (0, 1, 37, len(small_jets))]
    for name, source in sources.items():
        assert count_rows(source) == len(small_jets), name
        shares = read_shares(source, rows, chunk_size=chunk_size)
        for wanted, share in zip(rows, shares, strict=True):
            _same(share, small_jets[wanted])
            assert share.constituents.flags.c_contiguous and share.constituents.dtype == np.float32


def test_bad_sources_and_rows_are_named(sources: dict[str, object], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sorted"):
        read_shares(sources["reference"], [np.array([3, 1])])
    with pytest.raises(DataError, match=r"fit\.npz: holds 400 jets, row 400"):
        read_shares(sources["compact"], [np.array([0, 400])])
    (tmp_path / "notes.txt").write_text("not jets")
    with pytest.raises(DataError, match=r"notes\.txt: neither the reference layout"):
        count_rows(tmp_path / "notes.txt")
    with pytest.raises(DataError, match=r"missing\.npz: no such file"):
        read_shares(tmp_path / "missing.npz", [np.arange(3)])
    with zipfile.ZipFile(tmp_path / "other.npz", "w") as archive:
        archive.writestr("weights.npy", b"")
    with pytest.raises(DataError, match=r"other\.npz: not a compact jet file \(no constituents"):
        count_rows(tmp_path / "other.npz")


def test_ranks_read_disjoint_shares_that_make_up_the_splits(
    small_jets: JetBatch, sources: dict[str, object], train_config: TrainConfig
) -> None:
    config = replace(train_config, max_steps_per_epoch=None, batch_size=24)
    train_rows, val_rows, test_rows = split_indices(len(small_jets), config.seed, config.val_fraction)
    for world_size in (1, 3):
        parts = [
            rank_data(config, sources["reference"], World(r, world_size), chunk_size=50) for r in range(world_size)
        ]
        for rank, part in enumerate(parts):
            assert (part.n_val, part.n_test, part.plan.n_jets) == (len(val_rows), len(test_rows), len(train_rows))
            _same(part.train, small_jets[train_rows[part.plan.held()]])
            _same(part.val, small_jets[val_rows[rank::world_size]])
            # the same share from the other formats
            for other in ("memory", "compact"):
                again = rank_data(config, sources[other], World(rank, world_size))
                np.testing.assert_array_equal(again.train.labels, part.train.labels)
        held = np.sort(np.concatenate([train_rows[p.plan.held()] for p in parts]))
        np.testing.assert_array_equal(held, train_rows)
        assert sum(len(p.val) for p in parts) == len(val_rows)


def test_a_separate_validation_file_is_sharded_too(
    small_jets: JetBatch, sources: dict[str, object], train_config: TrainConfig, tmp_path: Path
) -> None:
    write_jets(tmp_path / "val.h5", small_jets[:50])
    config = replace(train_config, val_data=str(tmp_path / "val.h5"))
    parts = [rank_data(config, sources["compact"], World(r, 2)) for r in range(2)]
    assert [len(p.val) for p in parts] == [25, 25] and all(p.n_val == 50 and p.n_test == 0 for p in parts)
    assert sum(len(p.train) for p in parts) == len(small_jets)


def test_a_rank_holds_its_share_not_the_file(small_jets: JetBatch, train_config: TrainConfig, tmp_path: Path) -> None:
    """What a rank allocates while reading: its share plus a chunk, not the file (numpy's allocations,
    which tracemalloc sees, are where the jets live)."""
    jets = JetBatch.concatenate([small_jets] * 10)  # 4000 jets, 12.8 MB in the reference layout
    path = tmp_path / "big.h5"
    write_jets(path, jets)
    config = replace(train_config, batch_size=32)

    def peak(world_size: int) -> tuple[int, RankData]:
        tracemalloc.start()
        try:
            share = rank_data(config, path, World(0, world_size), chunk_size=100)
            return tracemalloc.get_traced_memory()[1], share
        finally:
            tracemalloc.stop()

    whole, one = peak(1)
    quarter, share = peak(4)
    assert len(share.train) < len(one.train) / 3
    # the jets themselves: a quarter of the file; the rest (a chunk, indices) is small beside them
    assert quarter < 0.4 * whole, (quarter, whole)
    assert whole < 1.5 * (one.train.constituents.nbytes + one.val.constituents.nbytes), whole
