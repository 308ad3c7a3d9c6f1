"""Model URIs: the one place that turns a URI into a location (:func:`resolve`) or local files (:func:`fetch`).

Accepted forms:
- a local folder, including ``/mnt/models`` as KServe's storage initializer lays it out;
- ``s3://bucket/prefix`` (MinIO in Kubeflow), downloaded with :mod:`toptagger.storage`;
- ``models:/name@alias``, ``models:/name/version`` and ``runs:/<run>/path`` through MLflow, which
  reads ``MLFLOW_TRACKING_URI`` from the environment.

A registered version (``models:/``) resolves to where its files are (:func:`resolve`: the
``s3://`` URI KServe's storage initializer downloads, or a local folder with the embedded store),
and is fetched from there. Downloads go to a cache folder keyed by the URI, so a restarted server
does not fetch again.

What is fetched may be an MLflow Model (a folder with an ``MLmodel`` file, as the register step
logs every version: :mod:`toptagger.mlflow_model`); :func:`fetch` then returns the tagger's folder
among its artifacts (``artifacts/model``: ``model.safetensors``, ``tagger.json``, ``model.onnx``,
``opencl/``), so the predictor and the pyfunc serve the same files. Older versions, registered as
the plain folder, are returned as they are.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from toptagger import mlflow_store, storage
from toptagger.constants import CACHE_ROOT
from toptagger.errors import ConfigError, StorageError

REGISTRY_SCHEME = "models:/"
MLMODEL_FILE = "MLmodel"
MLFLOW_TAGGER_ARTIFACT = "model"  # the key of the tagger's folder among an MLflow Model's artifacts
MLFLOW_SCHEMES = (REGISTRY_SCHEME, "runs:/", "mlflow-artifacts:/")
CACHE = Path(os.environ.get("TOPTAGGER_MODEL_CACHE", CACHE_ROOT / "models"))


def is_mlflow_uri(uri: str) -> bool:
    return uri.startswith(MLFLOW_SCHEMES)


def version_uri(name: str, version: str) -> str:
    return f"{REGISTRY_SCHEME}{name}/{version}"


def resolve(uri: str) -> str:
    """A ``models:/name/version`` or ``models:/name@alias`` becomes the version's artifact URI.

    The MLflow tracking server (``MLFLOW_TRACKING_URI``) knows where the files of a registered
    version really are; with S3 artifacts that is the ``s3://`` URI KServe downloads. Any other
    URI is returned as it is.
    """
    if not uri.startswith(REGISTRY_SCHEME):
        return uri
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    ref = uri[len(REGISTRY_SCHEME) :]
    store = mlflow_store.reading_uri()
    client = MlflowClient(tracking_uri=store)
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            version = client.get_model_version_by_alias(name, alias).version
        else:
            name, _, version = ref.partition("/")
            if not version:
                raise ConfigError(f"{uri}: name a version or an alias (models:/NAME/VERSION or models:/NAME@ALIAS)")
        return str(client.get_model_version_download_uri(name, version))
    except MlflowException as exc:
        raise StorageError(f"{uri}: cannot resolve in MLflow at {store} ({exc.message})") from None


def fetch(uri: str | os.PathLike[str], cache: Path | None = None) -> Path:
    """A local file or folder holding what ``uri`` names; raises :class:`StorageError` naming the URI.

    An ``s3://`` URI names one object when an object has exactly that key, and a prefix (a
    folder) otherwise. An MLflow Model is opened to the tagger's folder among its artifacts.
    """
    return tagger_folder(_fetch(str(uri), cache), str(uri))


def _fetch(uri: str, cache: Path | None) -> Path:
    if not uri:
        raise StorageError("empty model URI")
    if uri.startswith(REGISTRY_SCHEME):
        # Where the version's files are (a folder of the local store, s3://, ...), then those.
        return _fetch(resolve(uri), cache)
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


def tagger_folder(path: Path, uri: str) -> Path:
    """The tagger's folder inside the MLflow Model at ``path``; ``path`` itself if it is no MLflow Model.

    The folder is the one the ``python_function`` flavor of ``MLmodel`` names as its artifact
    :data:`MLFLOW_TAGGER_ARTIFACT`; it must lie inside the model.
    """
    mlmodel = path / MLMODEL_FILE
    if not mlmodel.is_file():
        return path
    import yaml

    missing = (
        f"{uri}: an MLflow Model without the tagger's folder: its {MLMODEL_FILE} names no artifact "
        f"{MLFLOW_TAGGER_ARTIFACT!r} in the python_function flavor (not registered by the register step?)"
    )
    try:
        meta = yaml.safe_load(mlmodel.read_text())
        relative = meta["flavors"]["python_function"]["artifacts"][MLFLOW_TAGGER_ARTIFACT]["path"]
    except (yaml.YAMLError, OSError) as exc:
        raise StorageError(f"{uri}: unreadable {MLMODEL_FILE} ({exc})") from None
    except (KeyError, TypeError):
        raise StorageError(missing) from None
    folder = (path / str(relative)).resolve()
    if not folder.is_relative_to(path.resolve()):
        raise StorageError(f"{uri}: its {MLMODEL_FILE} points the tagger's folder outside the model ({relative})")
    if not folder.is_dir():
        raise StorageError(f"{uri}: the tagger's folder {relative} named by its {MLMODEL_FILE} is missing")
    return folder


def fetch_model_dir(uri: str | os.PathLike[str], cache: Path | None = None) -> Path:
    """A local folder holding the model at ``uri`` (a saved tagger, optionally with its OpenCL package)."""
    path = fetch(uri, cache)
    if not path.is_dir():
        raise StorageError(f"{uri}: a model URI names a folder, not a file")
    return path


def _download_mlflow(uri: str, dest: Path) -> None:
    import mlflow
    from mlflow.exceptions import MlflowException

    store = mlflow_store.reading_uri()
    try:
        mlflow.artifacts.download_artifacts(
            artifact_uri=uri, dst_path=str(dest), tracking_uri=store, registry_uri=store
        )
    except MlflowException as exc:
        raise StorageError(f"{uri}: cannot resolve in MLflow at {store} ({exc.message})") from None
    except OSError as exc:
        raise StorageError(f"{uri}: cannot download the model's artifacts ({exc})") from None
