"""Triton's checksum repository agent block: the MD5 of every model file, in config.pbtxt and in ModelConfig.

SONIC's newest ``TritonClient`` compares the ``model_repository_agents`` block named
``checksum`` in its local ``config.pbtxt`` with the one in the server's ``ModelConfig``, and stops
with ``ModelVersioning`` when they differ (reference §12): a client built against one model
version is never served another. The block's format is Triton's checksum agent's: one parameter
per file, key ``"<ALGORITHM>:<path relative to the model folder>"`` (``MD5`` is the one algorithm
it knows), value the lowercase hex digest.

Both sides compute it here, from the same files: :mod:`serving.triton.repository` writes it for the
copy of the model folder in ``top-tagger/1/tagger/``, and the predictor answers it for the folder
it serves, with the same keys, so the two agree exactly when the files are the same.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from serving.triton.model import MODEL_FOLDER
from toptagger.constants import MODEL_VERSION

AGENT = "checksum"
ALGORITHM = "MD5"  # the one algorithm Triton's checksum agent supports
PREFIX = f"{MODEL_VERSION}/{MODEL_FOLDER}"  # where the repository puts the model folder, under the model's
_CHUNK = 1 << 20


def file_md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)  # an identity check, as Triton's agent's; not security
    with path.open("rb") as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def model_checksums(model_dir: str | Path) -> dict[str, str]:
    """``{"MD5:1/tagger/<file>": digest}`` for every file of the model folder, in path order."""
    root = Path(model_dir)
    files = sorted(path for path in root.rglob("*") if path.is_file())
    return {f"{ALGORITHM}:{PREFIX}/{path.relative_to(root).as_posix()}": file_md5(path) for path in files}


def agents_pbtxt(checksums: dict[str, str]) -> str:
    """The ``model_repository_agents`` block of ``config.pbtxt`` (empty without checksums)."""
    if not checksums:
        return ""
    parameters = "\n".join(
        f'      parameters {{ key: "{_quoted(key)}" value: "{_quoted(value)}" }}' for key, value in checksums.items()
    )
    return f'model_repository_agents {{\n  agents [\n    {{\n      name: "{AGENT}"\n{parameters}\n    }}\n  ]\n}}\n'


def _quoted(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')
