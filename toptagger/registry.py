"""MLflow tracking and model registry: the stores, one run per pipeline run, versions and the promotion gate.

What a version is (an MLflow Model logged from the run) is :mod:`toptagger.mlflow_model`; what the
registry says about it (:func:`describe`) is written by :mod:`toptagger.model_card`.

Stores: without ``MLFLOW_TRACKING_URI`` the project uses an embedded SQLite database in its local
state folder (``.state/mlflow/mlflow.db``) with artifacts beside it (``.state/mlflow/artifacts``).
``MLFLOW_TRACKING_URI=http://...`` switches to a tracking server; its artifacts live wherever the
server says (S3/MinIO in Kubeflow installs, reached with boto3 and ``MLFLOW_S3_ENDPOINT_URL``).

Everything here is idempotent, because pipeline tasks are retried and caches miss:

- the run of a pipeline run is found again by its ``pipeline_run_id`` tag, never created twice;
- metrics already logged to that run are not logged a second time;
- the version of a run is found again by its MLflow run id, never registered twice;
- a version's promotion decision is made once and recorded as version tags.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toptagger.constants import CHALLENGER, CHAMPION
from toptagger.errors import ConfigError, StorageError, TaggerError
from toptagger.mlflow_store import TRACKING_ENV, local_store

log = logging.getLogger(__name__)

# Where experiments created on the embedded store keep their artifacts (set with the local store).
ARTIFACTS_ENV = "TOPTAGGER_MLFLOW_ARTIFACTS"
PIPELINE_RUN_TAG = "pipeline_run_id"
AUC_KEY = "test_auc"  # run metric and version tag: what the promotion gate compares
DECISION_TAG, REASON_TAG = "promotion.decision", "promotion.reason"
PROMOTED, KEPT, REFUSED = "promoted", "not promoted", "refused"


class RegistryError(TaggerError, RuntimeError):
    """The tracking server or the registry cannot be used, or refused a request."""


# --------------------------------------------------------------------------------------------
# Stores


def use_local_store_unless_configured(state_dir: str | os.PathLike[str]) -> str:
    """Point MLflow at the embedded store unless ``MLFLOW_TRACKING_URI`` is set; returns the URI in use.

    Sets the environment (not only this process's MLflow state) so that pipeline tasks, which
    run as subprocesses, use the same store.
    """
    if os.environ.get(TRACKING_ENV):
        return os.environ[TRACKING_ENV]
    uri, artifacts = local_store(state_dir)
    artifacts.mkdir(parents=True, exist_ok=True)
    os.environ[TRACKING_ENV] = uri
    os.environ[ARTIFACTS_ENV] = str(artifacts)
    return uri


def tracking_uri() -> str:
    if not os.environ.get(TRACKING_ENV):
        # In a pod the pipeline's Secret must provide it; a silent sqlite file in the pod would be lost.
        raise ConfigError(
            f"{TRACKING_ENV} is not set: point it at the MLflow tracking server (on a cluster it comes from the "
            "mlflow-credentials Secret), or run through python -m pipelines.run, which uses the local store"
        )
    return os.environ[TRACKING_ENV]


def check_tracking(timeout_s: float = 10.0) -> str:
    """Fail fast, with one message, when the tracking store cannot be reached; returns its URI.

    MLflow's own client retries an unreachable server for minutes before it gives up, and then
    names neither the server nor the setting to change.
    """
    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as response:
                response.read()
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):
                raise RegistryError(
                    f"MLflow tracking server {uri} refused the credentials ({exc.code}); "
                    "check MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD"
                ) from None
            # Some proxies do not route /health; the server itself answered, which is what counts.
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise RegistryError(
                f"MLflow tracking server {uri} is unreachable ({reason}); check {TRACKING_ENV}"
            ) from None
    elif uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///") :]).parent
        if not folder.is_dir():
            raise RegistryError(f"MLflow store {uri}: the folder {folder} does not exist")
    return uri


def client() -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri())


def mlflow_call(what: str, call: Any, *args: Any, **kwargs: Any) -> Any:
    """Run an MLflow client call; turn its exceptions into one message naming the store."""
    from mlflow.exceptions import MlflowException

    try:
        return call(*args, **kwargs)
    except MlflowException as exc:
        raise RegistryError(f"MLflow ({os.environ.get(TRACKING_ENV)}): {what}: {exc.message}") from None
    except OSError as exc:
        raise RegistryError(f"MLflow ({os.environ.get(TRACKING_ENV)}): {what}: {exc}") from None


def experiment_id(name: str) -> str:
    """The id of experiment ``name``, created on first use (artifacts in the local store's folder)."""
    if not name:
        raise ConfigError("the MLflow experiment name is empty")
    mlflow_client = client()
    found = mlflow_call(f"reading experiment {name!r}", mlflow_client.get_experiment_by_name, name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            raise RegistryError(f"MLflow experiment {name!r} is deleted; restore it or choose another name")
        return str(found.experiment_id)
    location = None
    uri = tracking_uri()
    if os.environ.get(ARTIFACTS_ENV) and not uri.startswith(("http://", "https://")):
        location = (Path(os.environ[ARTIFACTS_ENV]) / name).as_uri()
    elif uri.startswith("sqlite:///"):
        # Beside the database, not MLflow's default ./mlruns in whatever folder the task runs in.
        location = (Path(uri[len("sqlite:///") :]).resolve().parent / "artifacts" / name).as_uri()
    return str(mlflow_call(f"creating experiment {name!r}", mlflow_client.create_experiment, name, location))


# --------------------------------------------------------------------------------------------
# The run of a pipeline run


def find_or_create_run(experiment: str, pipeline_run_id: str, run_name: str | None = None) -> str:
    """The MLflow run of ``pipeline_run_id`` in ``experiment``, created if there is none yet."""
    if not pipeline_run_id:
        raise ConfigError("a pipeline run id is needed to find this pipeline run's MLflow run")
    exp = experiment_id(experiment)
    mlflow_client = client()
    found = mlflow_call(
        "searching runs",
        mlflow_client.search_runs,
        [exp],
        filter_string=f"tags.{PIPELINE_RUN_TAG} = '{pipeline_run_id}'",
        max_results=2,
    )
    if found:
        log.info("MLflow run %s already belongs to pipeline run %s: reusing it", found[0].info.run_id, pipeline_run_id)
        return str(found[0].info.run_id)
    run = mlflow_call(
        "creating a run", mlflow_client.create_run, exp, tags={PIPELINE_RUN_TAG: pipeline_run_id}, run_name=run_name
    )
    return str(run.info.run_id)


def _param_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def log_run(
    run_id: str,
    *,
    params: Mapping[str, Any] | None = None,
    epoch_metrics: Iterable[Mapping[str, float]] = (),
    metrics: Mapping[str, float] | None = None,
    tags: Mapping[str, str] | None = None,
    artifacts: Mapping[str, str | os.PathLike[str]] | None = None,
) -> None:
    """Log to ``run_id`` what it does not hold yet; safe to call again after a failed attempt.

    ``epoch_metrics`` are per-epoch records (``epoch`` is the step); ``artifacts`` maps an artifact
    path in the run to a local file or folder.
    """
    from mlflow.entities import Metric, Param, RunTag

    mlflow_client = client()
    run = mlflow_call(f"reading run {run_id}", mlflow_client.get_run, run_id)
    have_params, have_metrics = run.data.params, run.data.metrics
    new_params = []
    for key, value in (params or {}).items():
        text = _param_value(value)
        if key in have_params and have_params[key] != text:
            raise RegistryError(f"run {run_id} already has {key}={have_params[key]!r}, not {text!r}")
        if key not in have_params:
            new_params.append(Param(key, text))
    now = int(time.time() * 1000)
    new_metrics = []
    for record in epoch_metrics:
        step = int(record["epoch"])
        new_metrics += [
            Metric(key, float(value), now, step)
            for key, value in record.items()
            if key != "epoch" and key not in have_metrics and _finite(value)
        ]
    new_metrics += [
        Metric(key, float(value), now, 0)
        for key, value in (metrics or {}).items()
        if key not in have_metrics and _finite(value)
    ]
    # The REST API takes at most 100 params and 1000 metrics per batch.
    for start in range(0, max(len(new_params), len(new_metrics), 1), 100):
        mlflow_call(
            "logging params and metrics",
            mlflow_client.log_batch,
            run_id,
            metrics=new_metrics[start : start + 100],
            params=new_params[start : start + 100],
            tags=[RunTag(k, v) for k, v in (tags or {}).items()] if start == 0 else [],
        )
    for artifact_path, local in (artifacts or {}).items():
        local = Path(local)
        if local.is_dir():
            mlflow_call(f"uploading {local}", mlflow_client.log_artifacts, run_id, str(local), artifact_path)
        elif local.is_file():
            mlflow_call(f"uploading {local}", mlflow_client.log_artifact, run_id, str(local), artifact_path)
        else:
            raise StorageError(f"{local}: no such file or folder to log as {artifact_path!r}")


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def finish_run(run_id: str, status: str = "FINISHED") -> None:
    mlflow_call(f"ending run {run_id}", client().set_terminated, run_id, status)


def artifact_uri(run_id: str) -> str:
    return str(mlflow_call(f"reading run {run_id}", client().get_run, run_id).info.artifact_uri)


# --------------------------------------------------------------------------------------------
# Versions and the promotion gate


@dataclass(frozen=True)
class Decision:
    """The promotion gate's verdict on one version."""

    promoted: bool
    decision: str  # PROMOTED, KEPT or REFUSED
    reason: str


def register_version(
    name: str, run_id: str, source: str, test_auc: float, tags: Mapping[str, str] | None = None
) -> str:
    """The version of ``name`` made from ``run_id`` (created once), with alias ``challenger``.

    ``source`` is where its files are; ``models:/m-<id>`` (an MLflow Model the run logged) links
    the version to that model, whose artifact location MLflow then records. A retry of a finished
    or half-finished registration finds the version by its run id instead of creating a second one.
    """
    if not _finite(test_auc) or not 0 <= test_auc <= 1:
        raise ConfigError(f"test AUC must be a number in [0, 1], got {test_auc!r}")
    mlflow_client = client()
    from mlflow.exceptions import MlflowException

    try:
        mlflow_client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise RegistryError(
                f"MLflow ({tracking_uri()}): reading registered model {name!r}: {exc.message}"
            ) from None
        mlflow_call(f"creating registered model {name!r}", mlflow_client.create_registered_model, name)
    existing = mlflow_call(
        "searching versions", mlflow_client.search_model_versions, f"name = '{name}' and run_id = '{run_id}'"
    )
    if existing:
        version = str(min(int(v.version) for v in existing))
        log.info("run %s is already registered as %s version %s: not registering again", run_id, name, version)
    else:
        created = mlflow_call(f"registering {name!r}", mlflow_client.create_model_version, name, source, run_id=run_id)
        version = str(created.version)
    for key, value in {AUC_KEY: repr(float(test_auc)), **(tags or {})}.items():
        _tag(name, version, key, value)
    _set_alias(name, CHALLENGER, version)
    return version


def champion_auc(name: str, version: str) -> float:
    """The test AUC of version ``version``: its tag, else its run's metric; RegistryError if unreadable."""
    mlflow_client = client()
    mv = mlflow_call(f"reading {name} version {version}", mlflow_client.get_model_version, name, version)
    text = (mv.tags or {}).get(AUC_KEY)
    if text is not None:
        try:
            value = float(text)
        except ValueError:
            raise RegistryError(f"its {AUC_KEY} tag is {text!r}, not a number") from None
        if not 0 <= value <= 1:
            raise RegistryError(f"its {AUC_KEY} tag is {value}, outside [0, 1]")
        return value
    if not mv.run_id:
        raise RegistryError(f"it has no {AUC_KEY} tag and no run to read the metric from")
    from mlflow.exceptions import MlflowException

    try:
        metrics = mlflow_client.get_run(mv.run_id).data.metrics
    except MlflowException as exc:
        raise RegistryError(f"it has no {AUC_KEY} tag and its run {mv.run_id} cannot be read ({exc.message})") from None
    if AUC_KEY not in metrics:
        raise RegistryError(f"it has no {AUC_KEY} tag and its run {mv.run_id} logged no {AUC_KEY} metric")
    return float(metrics[AUC_KEY])


def _already(version: str) -> str:
    return f"version {version} is already the {CHAMPION}"


def decide(name: str, version: str, test_auc: float) -> Decision:
    """Promote if there is no champion or ``test_auc`` >= the champion's; refuse if that cannot be read."""
    from mlflow.exceptions import MlflowException

    mlflow_client = client()
    try:
        current = mlflow_client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise RegistryError(f"MLflow ({tracking_uri()}): reading {name}@{CHAMPION}: {exc.message}") from None
        return Decision(True, PROMOTED, f"no {CHAMPION} yet; version {version} has test AUC {test_auc:.4f}")
    if str(current.version) == str(version):
        return Decision(True, PROMOTED, _already(version))
    try:
        best = champion_auc(name, str(current.version))
    except RegistryError as exc:
        return Decision(
            False,
            REFUSED,
            f"cannot read the test AUC of the {CHAMPION}, version {current.version}: {exc}; not promoting",
        )
    if test_auc >= best:
        return Decision(True, PROMOTED, f"test AUC {test_auc:.4f} >= {CHAMPION} version {current.version}'s {best:.4f}")
    return Decision(False, KEPT, f"test AUC {test_auc:.4f} < {CHAMPION} version {current.version}'s {best:.4f}")


def promote(name: str, version: str, test_auc: float) -> Decision:
    """Run the gate once per version: set ``champion`` if it passes; record decision and reason as tags.

    A version that already carries a decision (a retried task) keeps it, so a retry can never
    turn a refusal into a promotion or move the alias a second time.
    """
    mlflow_client = client()
    mv = mlflow_call(f"reading {name} version {version}", mlflow_client.get_model_version, name, version)
    tags = mv.tags or {}
    if DECISION_TAG in tags:
        decided = Decision(tags[DECISION_TAG] == PROMOTED, tags[DECISION_TAG], tags.get(REASON_TAG, ""))
        if decided.promoted:  # finish a retry that stopped between the tag and the alias
            _set_alias(name, CHAMPION, version)
        return decided
    decision = decide(name, version, test_auc)
    if REASON_TAG in tags and decision.reason == _already(version):
        # A retry that stopped after the alias: the first attempt's reason is the real one.
        decision = Decision(True, PROMOTED, tags[REASON_TAG])
    _tag(name, version, REASON_TAG, decision.reason)
    if decision.promoted:
        _set_alias(name, CHAMPION, version)
    # The decision tag goes last: its presence means the whole decision was recorded.
    _tag(name, version, DECISION_TAG, decision.decision)
    log.info("%s version %s: %s (%s)", name, version, decision.decision, decision.reason)
    return decision


def describe(name: str, model_text: str, version: str, version_text: str) -> None:
    """Set the descriptions of registered model ``name`` and of its ``version`` (the registry UI shows both).

    Setting a description again replaces it, so a retried task leaves the same text.
    """
    mlflow_client = client()
    mlflow_call(f"describing {name}", mlflow_client.update_registered_model, name, description=model_text)
    mlflow_call(
        f"describing {name} version {version}",
        mlflow_client.update_model_version,
        name,
        version,
        description=version_text,
    )


def _tag(name: str, version: str, key: str, value: str) -> None:
    mlflow_call(f"tagging {name} version {version}", client().set_model_version_tag, name, version, key, value)


def _set_alias(name: str, alias: str, version: str) -> None:
    mlflow_call(f"setting {name}@{alias}", client().set_registered_model_alias, name, alias, version)


def aliases(name: str, version: str) -> list[str]:
    mv = mlflow_call(f"reading {name} version {version}", client().get_model_version, name, version)
    return sorted(mv.aliases or [])
