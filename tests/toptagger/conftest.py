"""Real MLflow SQLite stores in tmp folders, for the registry and MLflow Model tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from toptagger import registry


@pytest.fixture(scope="session")
def empty_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty, migrated MLflow database: creating one takes seconds, copying it does not."""
    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    from mlflow import MlflowClient

    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


def local_store(state: Path, monkeypatch: pytest.MonkeyPatch, empty_db: Path | None = None) -> str:
    """The pipeline's local store in ``state`` (a copy of ``empty_db``, else new), set in the environment."""
    monkeypatch.delenv(registry.TRACKING_ENV, raising=False)
    monkeypatch.delenv(registry.ARTIFACTS_ENV, raising=False)
    uri = registry.use_local_store_unless_configured(state)
    if empty_db is not None:
        shutil.copyfile(empty_db, state / "mlflow" / "mlflow.db")
    # use_local_store_unless_configured writes os.environ; let monkeypatch restore it afterwards.
    monkeypatch.setenv(registry.TRACKING_ENV, uri)
    monkeypatch.setenv(registry.ARTIFACTS_ENV, str(state / "mlflow" / "artifacts"))
    return uri


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, empty_db: Path) -> str:
    return local_store(tmp_path / "state", monkeypatch, empty_db)
