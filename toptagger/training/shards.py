"""Each rank's share of the jets, read from the file without ever holding the whole of it.

Under torchrun every rank holds only the jets it trains and validates on: a reference-format
training file of 1.2M jets is 3.8 GB of constituents, and one copy per rank of an 8-GPU node
would not fit in its memory. :func:`read_shares` streams the file once, in chunks, and copies the
rows asked for into arrays of their final size; peak memory is the share plus one chunk.

Which rows a rank holds follows from :class:`~toptagger.training.batches.BatchPlan` (training)
and a stride of the validation split; the file may be local or ``s3://`` (one download per node,
see :func:`toptagger.training.distributed.local_rank_first`), in the reference layout or the
preprocess step's compact ``.npz``. An in-memory :class:`JetBatch` is a source too (tests,
notebooks): the same rows come out either way.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from toptagger import storage
from toptagger.errors import DataError
from toptagger.jets.dataset import DEFAULT_CHUNK, JetBatch, count_jets, iter_jets

# The first bytes of the two formats training reads: HDF5 (the reference layout, a pandas
# HDFStore) and zip (numpy's .npz, the compact file of the preprocess step).
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
ZIP_SIGNATURE = b"PK\x03\x04"
COMPACT_FIELDS = ("constituents", "labels", "truth", "ttv")

JetSource = JetBatch | str | os.PathLike[str]


def _format(path: Path, uri: str) -> str:
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except FileNotFoundError:
        raise DataError(f"{uri}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{uri}: is a directory, not a jets file") from None
    except OSError as exc:
        raise DataError(f"{uri}: cannot read ({exc.strerror})") from None
    if head.startswith(HDF5_SIGNATURE):
        return "reference"
    if head.startswith(ZIP_SIGNATURE):
        return "compact"
    raise DataError(
        f"{uri}: neither the reference layout (an HDF5 file, read_jets) nor a compact .npz jet file "
        f"(the preprocess step's, load_jets); it starts with {head!r}"
    )


def count_rows(source: JetSource) -> int:
    """How many jets ``source`` holds, without reading them."""
    if isinstance(source, JetBatch):
        return len(source)
    with storage.local_copy(source) as path:
        if _format(path, str(source)) == "reference":
            return count_jets(path)
        return _CompactFile(path, str(source)).rows


def read_shares(source: JetSource, rows: Sequence[np.ndarray], chunk_size: int = DEFAULT_CHUNK) -> list[JetBatch]:
    """The jets of each array of row numbers in ``rows`` (each sorted, ascending), in one pass over ``source``.

    Constituents keep the source's slots (200 in the reference layout): trimming the padding of the
    whole share would need a second copy of it; the loader trims each batch instead.
    """
    rows = [np.asarray(r, dtype=np.int64) for r in rows]
    for r in rows:
        if len(r) and (np.any(np.diff(r) <= 0) or r[0] < 0):
            raise ValueError("row numbers must be sorted, unique and >= 0")
    if isinstance(source, JetBatch):
        return [source[r] for r in rows]
    if chunk_size < 1:
        raise DataError(f"chunk_size must be at least 1, got {chunk_size}")
    with storage.local_copy(source) as path:
        n = count_rows(path)
        for r in rows:
            if len(r) and r[-1] >= n:
                raise DataError(f"{source}: holds {n} jets, row {int(r[-1])} was asked for")
        if _format(path, str(source)) == "reference":
            chunks = iter_jets(path, chunk_size=chunk_size)
        else:
            chunks = _CompactFile(path, str(source)).chunks(chunk_size)
        return _collect(chunks, rows)


def _collect(chunks: Iterator[JetBatch], rows: list[np.ndarray]) -> list[JetBatch]:
    """Copy the wanted rows of each chunk straight into arrays of the final size: the share, once."""
    shares: list[JetBatch] = []
    first = 0
    for chunk in chunks:
        if not shares:
            shares = [_empty_like(chunk, len(wanted)) for wanted in rows]
        last = first + len(chunk)
        for wanted, share in zip(rows, shares, strict=True):
            lo, hi = np.searchsorted(wanted, [first, last])
            for field in ("constituents", "labels", "truth", "ttv"):
                getattr(share, field)[lo:hi] = getattr(chunk, field)[wanted[lo:hi] - first]
        first = last
    return shares or [JetBatch.from_jets(np.zeros((0, 1, 4), np.float32), np.zeros(0, np.int64)) for _ in rows]


def _empty_like(chunk: JetBatch, n: int) -> JetBatch:
    return JetBatch(
        np.empty((n, *chunk.constituents.shape[1:]), np.float32),
        np.empty(n, np.int64),
        np.empty((n, *chunk.truth.shape[1:]), np.float32),
        np.empty(n, np.int64),
    )


class _CompactFile:
    """The preprocess step's ``.npz`` read as a stream: no member is loaded whole (np.load would)."""

    def __init__(self, path: Path, source: str) -> None:
        self.path, self.source = path, source
        try:
            with zipfile.ZipFile(path) as archive:
                missing = [f for f in COMPACT_FIELDS if f"{f}.npy" not in archive.namelist()]
                if missing:
                    raise DataError(f"{source}: not a compact jet file (no {', '.join(missing)})")
                shapes = {f: self._header(archive, f)[0] for f in COMPACT_FIELDS}
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            raise DataError(f"{source}: not a compact jet file written by the preprocess step ({exc})") from None
        self.rows = shapes["labels"][0]
        if any(shape[0] != self.rows for shape in shapes.values()):
            raise DataError(f"{source}: its arrays have different numbers of jets ({shapes})")

    def _header(self, archive: zipfile.ZipFile, field: str) -> tuple[tuple[int, ...], np.dtype, bool]:
        with archive.open(f"{field}.npy") as fh:
            return self._read_header(fh)

    @staticmethod
    def _read_header(fh: object) -> tuple[tuple[int, ...], np.dtype, bool]:
        version = np.lib.format.read_magic(fh)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(fh)
        if dtype.hasobject:
            raise ValueError(f"an array of Python objects ({dtype})")
        return shape, dtype, fortran

    def chunks(self, chunk_size: int) -> Iterator[JetBatch]:
        with zipfile.ZipFile(self.path) as archive:
            small = {f: self._load(archive, f) for f in ("labels", "truth", "ttv")}
            with archive.open("constituents.npy") as fh:
                shape, dtype, fortran = self._read_header(fh)
                if fortran:  # save_jets writes C order; rows of a Fortran-order array are not contiguous
                    raise DataError(f"{self.source}: constituents stored in Fortran order cannot be streamed")
                row_bytes = int(np.prod(shape[1:])) * dtype.itemsize
                for first in range(0, self.rows, chunk_size):
                    count = min(chunk_size, self.rows - first)
                    data = fh.read(count * row_bytes)
                    if len(data) != count * row_bytes:
                        raise DataError(f"{self.source}: truncated at jet {first}")
                    constituents = np.frombuffer(data, dtype).reshape(count, *shape[1:]).astype(np.float32)
                    end = first + count
                    yield JetBatch(
                        constituents,
                        small["labels"][first:end].astype(np.int64),
                        small["truth"][first:end].astype(np.float32),
                        small["ttv"][first:end].astype(np.int64),
                    )

    def _load(self, archive: zipfile.ZipFile, field: str) -> np.ndarray:
        with archive.open(f"{field}.npy") as fh:
            shape, dtype, fortran = self._read_header(fh)
            data = fh.read()
        return np.frombuffer(data, dtype).reshape(shape, order="F" if fortran else "C")
