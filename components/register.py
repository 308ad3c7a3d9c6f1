"""The register step: one MLflow run per pipeline run, a registered version, the promotion gate.

``register`` is the Kubeflow component; :func:`register_step` the plain function it runs. Each
version is an MLflow Model (:mod:`toptagger.mlflow_model`: signature, input example, a pyfunc from
code, the tagger's files) with a description of the model and of the version
(:mod:`toptagger.model_card`).
Nothing touches MLflow before this step, so a pipeline that fails earlier (a bad dataset URI, a
training error) leaves the tracking store and the registry as they were. The step checks that
the tracking store answers before it logs anything, and every call it makes is idempotent (see
:mod:`toptagger.registry`), so a retried task neither duplicates the run's metrics nor creates
a second version.
"""

# No `from __future__ import annotations`: KFP reads the component's annotations as objects.
import json
from pathlib import Path
from typing import Any, NamedTuple

from kfp.dsl import Artifact, Dataset, Input, Model


def register(
    model: Input[Model],
    quantized: Input[Model],
    evaluation: Input[Artifact],
    fit_jets: Input[Dataset],
    test_jets: Input[Dataset],
    experiment: str,
    model_name: str,
    run_key: str,
    pipeline_run_id: str,
) -> NamedTuple(
    "Registration",
    [("run_id", str), ("version", str), ("aliases", str), ("decision", str), ("reason", str), ("model_uri", str)],
):
    """Log the run to MLflow, register a version (alias challenger), promote it to champion if it is as good."""
    from components.step import step

    with step("register"):
        from components.register import register_step

        r = register_step(
            model, evaluation, fit_jets, test_jets, experiment, model_name, run_key or pipeline_run_id, quantized
        )
    return (r["run_id"], r["version"], ",".join(r["aliases"]), r["decision"], r["reason"], r["model_uri"])


def _params(history: dict[str, Any], fit_jets: Any, test_jets: Any) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for key, value in history["config"].items():
        if isinstance(value, dict):
            params.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            params[key] = "" if value is None else value
    params["dataset.source"] = fit_jets.metadata.get("source", "")
    params["dataset.fit_jets"] = int(fit_jets.metadata.get("n_jets", 0))
    params["dataset.test_jets"] = int(test_jets.metadata.get("n_jets", 0))
    params["dataset.split_seed"] = int(fit_jets.metadata.get("split_seed", 0))
    return params


def register_step(
    model: Any,
    evaluation: Any,
    fit_jets: Any,
    test_jets: Any,
    experiment: str,
    model_name: str,
    pipeline_run_id: str,
    quantized: Any = None,
) -> dict[str, Any]:
    """Log everything to the run of ``pipeline_run_id``, register a version of ``model_name``, run the gate.

    The version's folder is the train step's model folder with the quantize step's int8 graphs
    (``quantized``) and the evaluate step's admission of each precision (``precision.json``).
    """
    import tempfile

    from toptagger.precision.bundle import version_folder
    from toptagger.training.files import MODEL_DIR

    with tempfile.TemporaryDirectory(prefix="toptagger-version-") as tmp:
        folder = version_folder(
            Path(model.path) / MODEL_DIR,
            Path(quantized.path) if quantized is not None else None,
            Path(evaluation.path),
            Path(tmp) / MODEL_DIR,  # MLflow keeps the folder's name: artifacts/model
        )
        return _register(model, folder, evaluation, fit_jets, test_jets, experiment, model_name, pipeline_run_id)


def _register(
    model: Any,
    version_dir: Path,
    evaluation: Any,
    fit_jets: Any,
    test_jets: Any,
    experiment: str,
    model_name: str,
    pipeline_run_id: str,
) -> dict[str, Any]:
    from components.evaluate import ONNX_CHECK_FILE, precision_metrics
    from components.step import code_version, log
    from toptagger import mlflow_model, model_card, model_uri, registry
    from toptagger.errors import DataError
    from toptagger.evaluation.evaluate import METRICS_FILE, flatten
    from toptagger.jets.compact import load_jets
    from toptagger.model import read_config
    from toptagger.precision.bundle import version_tags
    from toptagger.precision.files import read_admission
    from toptagger.signature import Signature
    from toptagger.training.files import HISTORY_FILE, MODEL_DIR, STATE_DICT_FILE

    uri = registry.check_tracking()
    model_root = Path(model.path)
    history = json.loads((model_root / HISTORY_FILE).read_text())
    evaluated = json.loads((Path(evaluation.path) / METRICS_FILE).read_text())
    metrics = flatten(evaluated)
    onnx_check = Path(evaluation.path) / ONNX_CHECK_FILE
    if onnx_check.is_file():
        metrics |= json.loads(onnx_check.read_text())
    admission = read_admission(Path(evaluation.path))
    if admission is not None:  # precision/<runtime>/<precision>/<metric>, as the evaluate step logged them
        metrics |= precision_metrics(admission)
    if "test_auc" not in metrics:
        raise DataError(f"{evaluation.path}/{METRICS_FILE} holds no network AUC")
    dataset_hash = str(fit_jets.metadata.get("dataset_sha256", ""))
    tagger = read_config(model_root / MODEL_DIR)
    tags = {
        "input_signature": json.dumps(Signature.of(tagger).to_dict() | {"image": tagger.image.to_dict()}),
        "dataset_hash": dataset_hash,
        "code_version": code_version(),
        "dataset_source": str(fit_jets.metadata.get("source", "")),
    }
    run_id = registry.find_or_create_run(experiment, pipeline_run_id, run_name=f"top-tagging-{pipeline_run_id}")
    best = int(history["best_epoch"])
    metrics |= {"best_epoch": float(best), "best_val_auc": float(history["best_val_auc"])}
    registry.log_run(
        run_id,
        params=_params(history, fit_jets, test_jets),
        epoch_metrics=history["history"],
        metrics=metrics,
        tags=tags,
        artifacts={
            "model": version_dir,  # safetensors + tagger.json + opencl/ + quantized/: what the predictor loads
            "state_dict": model_root / STATE_DICT_FILE,
            "training": model_root / HISTORY_FILE,
            "evaluation": Path(evaluation.path),
        },
    )
    # The version is the MLflow Model (its input example: a test jet), not the run's folder.
    model_id = mlflow_model.log_tagger(run_id, version_dir, load_jets(test_jets.path).constituents)
    version_tags = {
        registry.PIPELINE_RUN_TAG: pipeline_run_id,
        "dataset_hash": dataset_hash,
        "code_version": tags["code_version"],
        **version_tags(Path(evaluation.path)),  # which precisions the gate admitted, and their numbers
    }
    version = registry.register_version(
        model_name, run_id, mlflow_model.uri(model_id), metrics["test_auc"], version_tags
    )
    registry.describe(
        model_name,
        model_card.model_description(tagger),
        version,
        model_card.version_description(tagger, evaluated, fit_jets.metadata, run_id, pipeline_run_id),
    )
    decision = registry.promote(model_name, version, metrics["test_auc"])
    registry.finish_run(run_id)
    result = {
        "tracking_uri": uri,
        "run_id": run_id,
        "version": version,
        "aliases": registry.aliases(model_name, version),
        "decision": decision.decision,
        "reason": decision.reason,
        "model_uri": model_uri.resolve(model_uri.version_uri(model_name, version)),
        "artifact_uri": registry.artifact_uri(run_id),
        "mlflow_model": mlflow_model.uri(model_id),
    }
    log.info(
        "registered %s version %s %s: %s (%s)",
        model_name,
        version,
        result["aliases"],
        decision.decision,
        decision.reason,
    )
    return result
