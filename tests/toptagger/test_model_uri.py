"""Model URIs: a registered version resolves to where its files are."""

from __future__ import annotations

from pathlib import Path

import pytest

from toptagger import model_uri
from toptagger.errors import ConfigError

URI = "s3://mlflow/3/models/m-0123456789abcdef/artifacts"


def test_resolve_model_uri_asks_the_mlflow_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient()
    client.create_registered_model("top-tagger")
    version = client.create_model_version("top-tagger", source=URI).version
    client.set_registered_model_alias("top-tagger", "champion", version)
    assert model_uri.resolve("models:/top-tagger@champion") == URI
    assert model_uri.resolve(f"models:/top-tagger/{version}") == URI
    assert model_uri.resolve(URI) == URI
    with pytest.raises(ConfigError, match="models:/top-tagger@nobody"):
        model_uri.resolve("models:/top-tagger@nobody")
    with pytest.raises(ConfigError, match="name a version or an alias"):
        model_uri.resolve("models:/top-tagger")
