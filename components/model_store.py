"""Resolve a model URI to a local folder: local paths, ``s3://`` prefixes and MLflow URIs.

Accepted forms:
- a local folder, including ``/mnt/models`` as KServe's storage initializer lays it out;
- ``s3://bucket/prefix`` (MinIO in Kubeflow), downloaded with :mod:`components.storage`;
- ``models:/name@alias``, ``models:/name/version`` and ``runs:/<run>/path`` through MLflow, which
  reads ``MLFLOW_TRACKING_URI`` from the environment.

Downloads go to a cache folder keyed by the URI, so a restarted server does not fetch again.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from components import storage
from components.errors import StorageError

MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")
CACHE = Path(os.environ.get("TOPTAGGER_MODEL_CACHE", Path.home() / ".cache" / "top-tagger" / "models"))


def is_mlflow_uri(uri: str) -> bool:
    return uri.startswith(MLFLOW_SCHEMES)


def fetch(uri: str | os.PathLike[str], cache: Path | None = None) -> Path:
    """A local file or folder holding what ``uri`` names; raises :class:`StorageError` naming the URI.

    An ``s3://`` URI names one object when an object has exactly that key, and a prefix (a
    folder) otherwise.
    """
    uri = str(uri)
    if not uri:
        raise StorageError("empty model URI")
    if not (storage.is_s3(uri) or is_mlflow_uri(uri)):
        path = Path(uri.removeprefix("file://"))
        if not path.exists():
            raise StorageError(f"{uri}: no such file or folder")
        return path
    if storage.is_s3(uri):
        single = storage.cached_object(uri)  # cached by ETag, so never stale
        if single is not None:
            return single
    target = (cache or CACHE) / hashlib.sha256(f"{storage.endpoint_url()}|{uri}".encode()).hexdigest()[:20]
    # A fixed MLflow version never changes; an alias (models:/name@alias) may move and an S3
    # prefix may be overwritten, so those are fetched again.
    if target.exists() and is_mlflow_uri(uri) and "@" not in uri:
        return _content(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".staging-"))
    try:
        if is_mlflow_uri(uri):
            _download_mlflow(uri, staging)
        else:
            storage.download_dir(uri, staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)  # appears whole or not at all
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return _content(target)


def _content(folder: Path) -> Path:
    """A cached download: the single file it holds, or the folder itself."""
    entries = list(folder.iterdir())
    return entries[0] if len(entries) == 1 and entries[0].is_file() else folder


def fetch_model_dir(uri: str | os.PathLike[str], cache: Path | None = None) -> Path:
    """A local folder holding the model at ``uri`` (a saved tagger, optionally with its OpenCL package)."""
    path = fetch(uri, cache)
    if not path.is_dir():
        raise StorageError(f"{uri}: a model URI names a folder, not a file")
    return path


def _download_mlflow(uri: str, dest: Path) -> None:
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest))
    except MlflowException as exc:
        raise StorageError(f"{uri}: cannot resolve in MLflow at {mlflow.get_tracking_uri()} ({exc.message})") from None
    except OSError as exc:
        raise StorageError(f"{uri}: cannot download the model's artifacts ({exc})") from None
