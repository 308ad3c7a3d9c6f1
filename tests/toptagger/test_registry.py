"""toptagger.registry on a real MLflow SQLite store: runs, versions, the promotion gate, retries."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest

from toptagger import registry
from toptagger.errors import ConfigError

NAME = "top-tagger"


def new_version(auc: float | None, pipeline_run: str, tag_auc: bool = True) -> str:
    """A run (with a test_auc metric unless auc is None) registered as a version of NAME."""
    run_id = registry.find_or_create_run("exp", pipeline_run)
    if auc is not None:
        registry.log_run(run_id, metrics={registry.AUC_KEY: auc})
    source = f"file:///nowhere/{pipeline_run}"
    version = registry.register_version(NAME, run_id, source, auc if auc is not None else 0.5)
    if not tag_auc:  # a champion registered by some other tool, without our tag
        registry.client().delete_model_version_tag(NAME, version, registry.AUC_KEY)
    return version


def test_local_store_sits_in_the_state_folder(store: str, tmp_path: Path) -> None:
    assert store == f"sqlite:///{(tmp_path / 'state' / 'mlflow' / 'mlflow.db').resolve()}"
    run_id = registry.find_or_create_run("exp", "p1")
    artifacts = registry.artifact_uri(run_id)
    assert artifacts.startswith((tmp_path / "state" / "mlflow" / "artifacts" / "exp").resolve().as_uri())


def test_an_existing_tracking_uri_is_left_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(registry.TRACKING_ENV, "http://mlflow.kubeflow:5000")
    assert registry.use_local_store_unless_configured(tmp_path) == "http://mlflow.kubeflow:5000"
    assert not (tmp_path / "mlflow").exists()


def test_missing_tracking_uri_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(registry.TRACKING_ENV, raising=False)
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_URI is not set"):
        registry.check_tracking()


def test_unreachable_server_fails_at_once_with_one_message(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv(registry.TRACKING_ENV, f"http://127.0.0.1:{port}")
    with pytest.raises(registry.RegistryError, match=rf"MLflow tracking server http://127.0.0.1:{port} is unreachable"):
        registry.check_tracking(timeout_s=5)


def test_one_run_per_pipeline_run_and_no_duplicate_metrics(store: str) -> None:
    run_id = registry.find_or_create_run("exp", "pipeline-1")
    assert registry.find_or_create_run("exp", "pipeline-1") == run_id
    assert registry.find_or_create_run("exp", "pipeline-2") != run_id
    history = [{"epoch": 0, "val_auc": 0.9, "train_loss": 0.4}, {"epoch": 1, "val_auc": 0.95, "train_loss": 0.2}]
    for _ in range(2):  # a retried task logs everything again
        registry.log_run(run_id, params={"epochs": 2, "image.size": 40}, epoch_metrics=history,
                         metrics={"test_auc": 0.97}, tags={"dataset_hash": "abc"})  # fmt: skip
    client = registry.client()
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "val_auc")] == [(0, 0.9), (1, 0.95)]
    assert len(client.get_metric_history(run_id, "test_auc")) == 1
    run = client.get_run(run_id)
    assert run.data.params == {"epochs": "2", "image.size": "40"}
    assert run.data.tags["dataset_hash"] == "abc"
    with pytest.raises(registry.RegistryError, match="already has epochs='2', not '3'"):
        registry.log_run(run_id, params={"epochs": 3})


def test_registration_retry_creates_no_duplicate_version(store: str) -> None:
    run_id = registry.find_or_create_run("exp", "pipeline-1")
    first = registry.register_version(NAME, run_id, "file:///model", 0.97, {"pipeline_run_id": "pipeline-1"})
    again = registry.register_version(NAME, run_id, "file:///model", 0.97, {"pipeline_run_id": "pipeline-1"})
    assert first == again == "1"
    assert len(registry.client().search_model_versions(f"name = '{NAME}'")) == 1
    assert registry.aliases(NAME, first) == [registry.CHALLENGER]
    tags = registry.client().get_model_version(NAME, first).tags
    assert float(tags[registry.AUC_KEY]) == 0.97 and tags["pipeline_run_id"] == "pipeline-1"


def test_gate_promotes_first_and_better_or_equal_versions_and_keeps_worse_ones(store: str) -> None:
    client = registry.client()
    v1 = new_version(0.95, "p1")
    d1 = registry.promote(NAME, v1, 0.95)
    assert (d1.promoted, d1.decision) == (True, registry.PROMOTED) and "no champion yet" in d1.reason

    v2 = new_version(0.93, "p2")
    d2 = registry.promote(NAME, v2, 0.93)
    assert (d2.promoted, d2.decision) == (False, registry.KEPT)
    assert d2.reason == "test AUC 0.9300 < champion version 1's 0.9500"
    assert str(client.get_model_version_by_alias(NAME, registry.CHAMPION).version) == v1
    assert str(client.get_model_version_by_alias(NAME, registry.CHALLENGER).version) == v2  # every new version

    v3 = new_version(0.95, "p3")  # equal is good enough: "at least the champion's"
    d3 = registry.promote(NAME, v3, 0.95)
    assert d3.promoted and d3.reason == "test AUC 0.9500 >= champion version 1's 0.9500"
    assert registry.aliases(NAME, v3) == [registry.CHALLENGER, registry.CHAMPION]
    assert registry.aliases(NAME, v1) == []
    tags = client.get_model_version(NAME, v2).tags
    assert (tags[registry.DECISION_TAG], tags[registry.REASON_TAG]) == (registry.KEPT, d2.reason)


def test_gate_reads_the_champions_run_metric_when_its_tag_is_missing(store: str) -> None:
    v1 = new_version(0.96, "p1", tag_auc=False)
    registry.promote(NAME, v1, 0.96)
    v2 = new_version(0.95, "p2")
    assert registry.promote(NAME, v2, 0.95).reason == "test AUC 0.9500 < champion version 1's 0.9600"


@pytest.mark.parametrize("damage", ["no tag, no metric", "garbage tag"])
def test_gate_refuses_when_the_champions_auc_cannot_be_read(store: str, damage: str) -> None:
    client = registry.client()
    if damage == "no tag, no metric":
        v1 = new_version(None, "p1", tag_auc=False)
    else:
        v1 = new_version(0.9, "p1")
        client.set_model_version_tag(NAME, v1, registry.AUC_KEY, "n/a")
    client.set_registered_model_alias(NAME, registry.CHAMPION, v1)
    v2 = new_version(0.99, "p2")
    decision = registry.promote(NAME, v2, 0.99)
    assert (decision.promoted, decision.decision) == (False, registry.REFUSED)
    assert decision.reason.startswith("cannot read the test AUC of the champion, version 1: ")
    assert ("logged no test_auc metric" if damage == "no tag, no metric" else "'n/a', not a number") in decision.reason
    assert str(client.get_model_version_by_alias(NAME, registry.CHAMPION).version) == v1
    assert client.get_model_version(NAME, v2).tags[registry.DECISION_TAG] == registry.REFUSED


def test_a_retried_promotion_keeps_the_first_decision(store: str) -> None:
    v1 = new_version(0.95, "p1")
    registry.promote(NAME, v1, 0.95)
    v2 = new_version(0.93, "p2")
    first = registry.promote(NAME, v2, 0.93)
    # Even if the champion got worse meanwhile, the recorded decision for v2 stands.
    registry.client().set_model_version_tag(NAME, v1, registry.AUC_KEY, "0.5")
    assert registry.promote(NAME, v2, 0.93) == first
    assert str(registry.client().get_model_version_by_alias(NAME, registry.CHAMPION).version) == v1


def test_bad_inputs_name_the_problem(store: str) -> None:
    run_id = registry.find_or_create_run("exp", "p1")
    with pytest.raises(ConfigError, match=r"test AUC must be a number in \[0, 1\], got nan"):
        registry.register_version(NAME, run_id, "file:///m", float("nan"))
    with pytest.raises(ConfigError, match="pipeline run id is needed"):
        registry.find_or_create_run("exp", "")
    with pytest.raises(ConfigError, match="experiment name is empty"):
        registry.experiment_id("")


def test_a_sqlite_store_given_by_uri_keeps_artifacts_beside_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               empty_db: Path) -> None:  # fmt: skip
    shutil.copyfile(empty_db, tmp_path / "elsewhere.db")
    monkeypatch.setenv(registry.TRACKING_ENV, f"sqlite:///{tmp_path / 'elsewhere.db'}")
    monkeypatch.delenv(registry.ARTIFACTS_ENV, raising=False)
    run_id = registry.find_or_create_run("exp", "p1")
    assert registry.artifact_uri(run_id).startswith((tmp_path / "artifacts" / "exp").as_uri())


def test_a_version_of_a_logged_model_has_its_files_and_carries_descriptions(store: str) -> None:
    run_id = registry.find_or_create_run("exp", "p1")
    client = registry.client()
    experiment = client.get_run(run_id).info.experiment_id
    logged = client.create_logged_model(experiment, name=NAME, source_run_id=run_id)
    version = registry.register_version(NAME, run_id, f"models:/{logged.model_id}", 0.9)
    for _ in range(2):  # a retried task sets the same texts again
        registry.describe(NAME, "what the model is", version, "how this version did")
    assert client.get_registered_model(NAME).description == "what the model is"
    mv = client.get_model_version(NAME, version)
    assert (mv.description, mv.source) == ("how this version did", f"models:/{logged.model_id}")
    # The version's files are the logged model's (what model_uri.resolve returns).
    assert client.get_model_version_download_uri(NAME, version) == logged.artifact_location
    with pytest.raises(registry.RegistryError, match=r"describing top-tagger version 7: .*"):
        registry.describe(NAME, "text", "7", "text")
