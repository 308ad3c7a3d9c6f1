"""Reference-layout I/O: exact columns, round trips, streaming, S3, and every bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from toptagger.errors import DataError, StorageError
from toptagger.jets.dataset import (
    COLUMNS,
    KEY,
    JetBatch,
    count_jets,
    iter_jets,
    read_jets,
    write_jets,
)


def test_columns_are_the_reference_layout() -> None:
    assert len(COLUMNS) == 806
    assert COLUMNS[:8] == ("E_0", "PX_0", "PY_0", "PZ_0", "E_1", "PX_1", "PY_1", "PZ_1")
    assert COLUMNS[796:800] == ("E_199", "PX_199", "PY_199", "PZ_199")
    assert COLUMNS[800:] == ("truthE", "truthPX", "truthPY", "truthPZ", "ttv", "is_signal_new")


def test_round_trip_through_plain_pandas(small_jets: JetBatch, jets_file: Path) -> None:
    frame = pd.read_hdf(jets_file, KEY)
    assert list(frame.columns) == list(COLUMNS)
    assert len(frame) == len(small_jets)
    np.testing.assert_array_equal(frame["is_signal_new"].to_numpy(), small_jets.labels)
    np.testing.assert_array_equal(frame[["E_0", "PX_0", "PY_0", "PZ_0"]].to_numpy(), small_jets.constituents[:, 0])

    back = read_jets(jets_file)
    assert back.constituents.dtype == np.float32 and back.constituents.shape == (len(small_jets), 200, 4)
    assert back.labels.dtype == np.int64
    np.testing.assert_array_equal(back.constituents, small_jets.constituents)
    np.testing.assert_array_equal(back.truth, small_jets.truth)
    np.testing.assert_array_equal(back.labels, small_jets.labels)


def test_reads_a_file_written_by_plain_pandas_in_float64(small_jets: JetBatch, tmp_path: Path) -> None:
    # The reference files come from other writers; float64 columns and fixed format must work too.
    n = len(small_jets)
    frame = pd.DataFrame(small_jets.constituents.reshape(n, -1).astype(np.float64), columns=list(COLUMNS[:800]))
    for i, name in enumerate(COLUMNS[800:804]):
        frame[name] = small_jets.truth[:, i].astype(np.float64)
    frame["ttv"] = 0
    frame["is_signal_new"] = small_jets.labels
    for fmt in ("fixed", "table"):
        path = tmp_path / f"{fmt}.h5"
        frame.to_hdf(path, key=KEY, format=fmt)
        chunks = list(iter_jets(path, chunk_size=150))
        assert [len(c) for c in chunks] == [150, 150, n - 300]
        # float32 through HDF5 and back: exact
        np.testing.assert_array_equal(JetBatch.concatenate(chunks).constituents, small_jets.constituents)


def test_columns_in_another_order_are_reordered(small_jets: JetBatch, tmp_path: Path) -> None:
    frame = pd.read_hdf(_write(small_jets, tmp_path / "a.h5"), KEY)
    path = tmp_path / "shuffled.h5"
    frame[list(reversed(COLUMNS))].to_hdf(path, key=KEY, format="table")
    np.testing.assert_array_equal(read_jets(path).constituents, small_jets.constituents)


def test_streaming_in_chunks_matches_a_full_read(jets_file: Path, small_jets: JetBatch) -> None:
    chunks = list(iter_jets(jets_file, chunk_size=64))
    assert all(len(c) == 64 for c in chunks[:-1])
    assert sum(len(c) for c in chunks) == len(small_jets) == count_jets(jets_file)
    np.testing.assert_array_equal(JetBatch.concatenate(chunks).constituents, small_jets.constituents)
    window = read_jets(jets_file, start=10, stop=30)
    np.testing.assert_array_equal(window.labels, small_jets.labels[10:30])


def test_s3_round_trip(small_jets: JetBatch, s3_env: str) -> None:
    uri = f"{s3_env}/datasets/jets.h5"
    write_jets(uri, small_jets)
    back = read_jets(uri)
    np.testing.assert_array_equal(back.constituents, small_jets.constituents)
    assert count_jets(uri) == len(small_jets)
    # Overwritten under the same key: the next read sees the new file, not a stale cached copy.
    write_jets(uri, small_jets[:50])
    assert len(read_jets(uri)) == 50


def _write(batch: JetBatch, path: Path) -> Path:
    write_jets(path, batch)
    return path


# --- bad input: one clear DataError naming the file and the problem -------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.h5"
    with pytest.raises(DataError, match=rf"{path}: no such file"):
        read_jets(path)


def test_missing_s3_object(s3_env: str) -> None:
    with pytest.raises(StorageError, match="no such object"):
        read_jets(f"{s3_env}/absent.h5")


def test_not_an_hdf5_file(tmp_path: Path) -> None:
    path = tmp_path / "text.h5"
    path.write_text("E_0,PX_0\n1,2\n")
    with pytest.raises(DataError, match="not a readable HDF5 file"):
        read_jets(path)


def test_file_without_table_key(small_jets: JetBatch, tmp_path: Path) -> None:
    path = tmp_path / "other_key.h5"
    pd.read_hdf(_write(small_jets, tmp_path / "a.h5"), KEY).to_hdf(path, key="jets", format="table")
    with pytest.raises(DataError, match=r"no 'table' key .*keys found: \['jets'\]"):
        read_jets(path)


def test_missing_columns(small_jets: JetBatch, tmp_path: Path) -> None:
    path = tmp_path / "missing.h5"
    frame = pd.read_hdf(_write(small_jets, tmp_path / "a.h5"), KEY)
    frame.drop(columns=["PZ_17", "is_signal_new"]).to_hdf(path, key=KEY, format="table")
    with pytest.raises(DataError, match=r"missing 2 of the 806 reference columns: PZ_17, is_signal_new"):
        read_jets(path)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values(small_jets: JetBatch, tmp_path: Path, bad: float) -> None:
    path = tmp_path / "nan.h5"
    frame = pd.read_hdf(_write(small_jets, tmp_path / "a.h5"), KEY)
    frame.loc[frame.index[37], "PX_3"] = bad
    frame.to_hdf(path, key=KEY, format="table")
    with pytest.raises(DataError, match=rf"{path}: non-finite \(NaN or Inf\) constituent value in row 37"):
        read_jets(path)


@pytest.mark.parametrize("label", [2, -1, 0.5])
def test_labels_other_than_0_1(small_jets: JetBatch, tmp_path: Path, label: float) -> None:
    path = tmp_path / "labels.h5"
    frame = pd.read_hdf(_write(small_jets, tmp_path / "a.h5"), KEY)
    frame["is_signal_new"] = frame["is_signal_new"].astype(np.float64)
    frame.loc[frame.index[5], "is_signal_new"] = label
    frame.to_hdf(path, key=KEY, format="table")
    with pytest.raises(DataError, match=rf"{path}: labels .*must be 0 or 1, found {label} in row 5"):
        read_jets(path)


def test_writer_refuses_invalid_batches(small_jets: JetBatch, tmp_path: Path) -> None:
    constituents = small_jets.constituents[:10].copy()  # a copy: the fixture is shared
    constituents[3, 0, 1] = np.nan
    broken = JetBatch.from_jets(constituents, small_jets.labels[:10])
    with pytest.raises(DataError, match="non-finite"):
        write_jets(tmp_path / "x.h5", broken)
    assert not (tmp_path / "x.h5").exists()


def test_writer_refuses_a_missing_folder(small_jets: JetBatch, tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="does not exist"):
        write_jets(tmp_path / "no" / "such" / "x.h5", small_jets)


def test_interrupted_write_leaves_no_file(
    small_jets: JetBatch, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "jets.h5"

    def explode(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(pd.HDFStore, "append", explode)
    with pytest.raises(KeyboardInterrupt):
        write_jets(target, small_jets)
    assert list(tmp_path.iterdir()) == []
