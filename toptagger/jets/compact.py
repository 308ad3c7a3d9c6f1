"""Compact jet files between pipeline steps: trailing padding trimmed, pickle-free ``.npz``.

The reference format stores 200 constituent slots per jet, of which jets use about a third;
every consumer (images, kinematics, the server) accepts ``[N, M, 4]`` for any M, so the split
steps hand the training and evaluation steps only the slots some jet uses.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

from toptagger.errors import DataError
from toptagger.jets.dataset import JetBatch


def trim_padding(constituents: np.ndarray) -> np.ndarray:
    """Drop the constituent slots that are padding (E = 0) in every jet: a compact, exact copy."""
    used = np.flatnonzero((constituents[..., 0] != 0).any(axis=0))
    width = int(used[-1]) + 1 if len(used) else 1
    return np.ascontiguousarray(constituents[:, :width])


def save_jets(path: str | os.PathLike[str], jets: JetBatch) -> None:
    """Write jets as an uncompressed ``.npz`` (np.load needs no pickle), trailing padding trimmed."""
    with open(path, "wb") as fh:  # a file object keeps numpy from appending ".npz" to the name
        # C order throughout: training streams the constituents row by row (toptagger.training.shards).
        arrays = {"labels": jets.labels, "truth": jets.truth, "ttv": jets.ttv}
        np.savez(
            fh, constituents=trim_padding(jets.constituents), **{k: np.ascontiguousarray(v) for k, v in arrays.items()}
        )


def load_jets(path: str | os.PathLike[str]) -> JetBatch:
    """Read jets written by :func:`save_jets` (constituents stay trimmed: every consumer accepts [N, M, 4])."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return JetBatch(
                data["constituents"].astype(np.float32, copy=False),
                data["labels"].astype(np.int64, copy=False),
                data["truth"].astype(np.float32, copy=False),
                data["ttv"].astype(np.int64, copy=False),
            )
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"{path}: not a compact jet file written by the preprocess step ({exc})") from None


def jets_hash(jets: JetBatch) -> str:
    """SHA-256 of the jets' content (constituents, labels), independent of the file format."""
    digest = hashlib.sha256()
    for array in (jets.constituents, jets.labels):
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()
