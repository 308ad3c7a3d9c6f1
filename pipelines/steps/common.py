"""What several steps share: compact jet files, the dataset hash, the code version."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np

from components.errors import DataError
from components.jetdata import JetBatch

log = logging.getLogger("pipelines")
CODE_VERSION_ENV = "TOPTAGGER_CODE_VERSION"
REPO = Path(__file__).resolve().parents[2]


def save_jets(path: str | os.PathLike[str], jets: JetBatch) -> None:
    """Write jets as an uncompressed ``.npz`` (np.load needs no pickle), trailing padding trimmed."""
    from components.train import trim_padding

    with open(path, "wb") as fh:  # a file object keeps numpy from appending ".npz" to the name
        np.savez(fh, constituents=trim_padding(jets.constituents), labels=jets.labels, truth=jets.truth, ttv=jets.ttv)


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


def code_version() -> str:
    """The git commit of the code: ``$TOPTAGGER_CODE_VERSION`` (images), else read from ``.git``."""
    if os.environ.get(CODE_VERSION_ENV):
        return os.environ[CODE_VERSION_ENV]
    git = REPO / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head
        ref = head[len("ref: ") :]
        if (git / ref).is_file():
            return (git / ref).read_text().strip()
        for line in (git / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0]
    except OSError:
        pass
    return "unknown"
