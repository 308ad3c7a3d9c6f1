"""Model URIs: a registered version resolves to where its files are."""

from __future__ import annotations

from pathlib import Path

import pytest

from toptagger import model_uri
from toptagger.errors import ConfigError, StorageError
from toptagger.mlflow_store import local_store

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
    with pytest.raises(StorageError, match="models:/top-tagger@nobody: cannot resolve in MLflow at sqlite:"):
        model_uri.resolve("models:/top-tagger@nobody")
    with pytest.raises(ConfigError, match="name a version or an alias"):
        model_uri.resolve("models:/top-tagger")


def test_without_a_tracking_uri_the_pipelines_local_store_is_read_and_none_is_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # MLflow's own default would create ./mlflow.db here
    state = tmp_path / "state"
    monkeypatch.setenv("STATE", str(state))
    for uri in ("models:/top-tagger@champion", "runs:/0123/model"):
        with pytest.raises(StorageError, match=rf"MLFLOW_TRACKING_URI is unset and .*{state}/mlflow/mlflow.db"):
            model_uri.fetch(uri) if uri.startswith("runs:") else model_uri.resolve(uri)
    assert not list(tmp_path.rglob("*.db")), "a command that only reads must not create a store"
    # The store make demo leaves behind is found without any setting.
    store, _ = local_store(state)
    (state / "mlflow").mkdir(parents=True)
    client = MlflowClient(tracking_uri=store)
    client.create_registered_model("top-tagger")
    version = client.create_model_version("top-tagger", source=URI).version
    client.set_registered_model_alias("top-tagger", "champion", version)
    assert model_uri.resolve("models:/top-tagger@champion") == URI
    with pytest.raises(StorageError, match=rf"cannot resolve in MLflow at {store}"):
        model_uri.resolve("models:/top-tagger@nobody")


def mlflow_model(folder: Path, artifacts: object) -> Path:
    """An MLflow Model's MLmodel file (as MLflow writes it) naming ``artifacts`` in its pyfunc flavor."""
    import yaml

    folder.mkdir(parents=True)
    flavor = {"loader_module": "mlflow.pyfunc.loaders.code_model", "artifacts": artifacts}
    (folder / model_uri.MLMODEL_FILE).write_text(yaml.safe_dump({"flavors": {"python_function": flavor}}))
    return folder


def test_an_mlflow_model_is_opened_to_its_tagger_folder_and_a_plain_folder_is_kept(tmp_path: Path) -> None:
    model = mlflow_model(tmp_path / "m-1", {"model": {"path": "artifacts/model", "uri": "/train/model"}})
    (model / "artifacts" / "model").mkdir(parents=True)
    (model / "artifacts" / "model" / "tagger.json").write_text("{}")
    assert model_uri.fetch(model) == model / "artifacts" / "model"
    assert model_uri.fetch_model_dir(f"file://{model}") == model / "artifacts" / "model"
    plain = model / "artifacts" / "model"  # how versions registered before the MLflow Model were stored
    assert model_uri.fetch(plain) == plain


@pytest.mark.parametrize(
    ("artifacts", "message"),
    [
        ({"weights": {"path": "artifacts/weights"}}, "an MLflow Model without the tagger's folder: its MLmodel names"),
        (None, "names no artifact 'model' in the python_function flavor"),
        ({"model": {"path": "artifacts/model"}}, "the tagger's folder artifacts/model named by its MLmodel is missing"),
        ({"model": {"path": "../../etc"}}, r"points the tagger's folder outside the model \(../../etc\)"),
    ],
    ids=["other artifact", "no artifacts", "folder missing", "outside"],
)
def test_an_mlflow_model_without_the_tagger_folder_is_refused_naming_it(
    tmp_path: Path, artifacts: object, message: str
) -> None:
    model = mlflow_model(tmp_path / "m-2", artifacts)
    with pytest.raises(StorageError, match=rf"{model}: .*{message}"):
        model_uri.fetch_model_dir(model)
