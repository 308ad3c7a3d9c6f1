"""Which MLflow store a command reads: ``MLFLOW_TRACKING_URI``, else the pipeline's local store.

``python -m pipelines.run`` (``make demo``) keeps its embedded store in ``<state>/mlflow/`` (state:
``$STATE``, else ``.state`` in the repository). Every command that reads ``models:/`` URIs (the
predictor, ``serving.client``, ``benchmarks.serving``, ``components.deploy``) uses that store when
``MLFLOW_TRACKING_URI`` is unset, and never creates one of its own: MLflow's default would be a
fresh, empty ``./mlflow.db`` in whatever folder the command runs in, where no model is registered.
"""

from __future__ import annotations

import os
from pathlib import Path

from toptagger.errors import StorageError

TRACKING_ENV = "MLFLOW_TRACKING_URI"
STATE_ENV = "STATE"
REPO = Path(__file__).resolve().parents[1]


def state_dir() -> Path:
    """The pipeline's local state folder: ``$STATE``, else ``.state`` in the repository."""
    return Path(os.environ.get(STATE_ENV) or REPO / ".state").resolve()


def local_store(state: str | os.PathLike[str]) -> tuple[str, Path]:
    """The embedded store of ``state``: (``sqlite:///.../mlflow.db``, artifact folder)."""
    root = Path(state).resolve() / "mlflow"
    return f"sqlite:///{root / 'mlflow.db'}", root / "artifacts"


def reading_uri() -> str:
    """The store to read registered models from; a StorageError naming it when there is none."""
    if os.environ.get(TRACKING_ENV):
        return os.environ[TRACKING_ENV]
    uri, _ = local_store(state_dir())
    database = Path(uri.removeprefix("sqlite:///"))
    if not database.is_file():
        raise StorageError(
            f"no MLflow store: {TRACKING_ENV} is unset and the pipeline's local store {database} does not exist "
            "(make demo creates it; or set MLFLOW_TRACKING_URI to the tracking server)"
        )
    return uri
