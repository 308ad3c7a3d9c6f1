"""The register step: one MLflow run per pipeline run, a registered version, the promotion gate.

Nothing touches MLflow before this step, so a pipeline that fails earlier (a bad dataset URI, a
training error) leaves the tracking store and the registry as they were. The step checks that
the tracking store answers before it logs anything, and every call it makes is idempotent (see
:mod:`components.registry`), so a retried task neither duplicates the run's metrics nor creates
a second version.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from components import registry
from components.errors import DataError
from components.evaluate import METRICS_FILE
from components.model import read_config
from components.train import HISTORY_FILE, MODEL_DIR
from pipelines.steps.common import code_version, log
from pipelines.steps.evaluate import flatten
from pipelines.steps.train import STATE_DICT_FILE


def input_signature(model_dir: Path) -> dict[str, Any]:
    """The served tensors (serving/contract.py), for the run's ``input_signature`` tag."""
    config = read_config(model_dir)
    size = config.image.image_size
    return {
        "inputs": [
            {"name": "images", "datatype": "FP32", "shape": [-1, config.in_channels, size, size]},
            {"name": "constituents", "datatype": "FP32", "shape": [-1, 200, 4], "columns": ["E", "px", "py", "pz"]},
        ],
        "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 2], "columns": ["qcd", "top"]}],
        "image": config.image.to_dict(),
    }


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


def run(
    model: Any, evaluation: Any, fit_jets: Any, test_jets: Any, experiment: str, model_name: str, pipeline_run_id: str
) -> dict[str, Any]:
    uri = registry.check_tracking()
    model_root = Path(model.path)
    history = json.loads((model_root / HISTORY_FILE).read_text())
    evaluated = json.loads((Path(evaluation.path) / METRICS_FILE).read_text())
    metrics = flatten(evaluated)
    if "test_auc" not in metrics:
        raise DataError(f"{evaluation.path}/{METRICS_FILE} holds no network AUC")
    dataset_hash = str(fit_jets.metadata.get("dataset_sha256", ""))
    tags = {
        "input_signature": json.dumps(input_signature(model_root / MODEL_DIR)),
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
            "model": model_root / MODEL_DIR,  # safetensors + tagger.json + opencl/: what the predictor loads
            "state_dict": model_root / STATE_DICT_FILE,
            "training": model_root / HISTORY_FILE,
            "evaluation": Path(evaluation.path),
        },
    )
    source = f"{registry.artifact_uri(run_id)}/model"
    version_tags = {
        registry.PIPELINE_RUN_TAG: pipeline_run_id,
        "dataset_hash": dataset_hash,
        "code_version": tags["code_version"],
    }
    version = registry.register_version(model_name, run_id, source, metrics["test_auc"], version_tags)
    decision = registry.promote(model_name, version, metrics["test_auc"])
    registry.finish_run(run_id)
    result = {
        "tracking_uri": uri,
        "run_id": run_id,
        "version": version,
        "aliases": registry.aliases(model_name, version),
        "decision": decision.decision,
        "reason": decision.reason,
        "model_uri": registry.download_uri(model_name, version),
        "artifact_uri": registry.artifact_uri(run_id),
    }
    log.info("registered %s version %s %s: %s (%s)", model_name, version, result["aliases"], decision.decision,
             decision.reason)  # fmt: skip
    return result
