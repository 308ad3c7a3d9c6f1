"""The register step on real step outputs and a real MLflow store: an MLflow Model per version, its descriptions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from kfp import dsl

from components.register import register_step
from tests.components.artifacts import artifact
from tests.toptagger.conftest import local_store
from toptagger import registry
from toptagger.constants import MODEL_NAME
from toptagger.evaluation.evaluate import METRICS_FILE, evaluate_scores, mass_window_score, network_scores
from toptagger.evaluation.report import format_entry
from toptagger.jets.compact import jets_hash, save_jets
from toptagger.jets.dataset import JetBatch
from toptagger.model import load_model
from toptagger.training.config import TrainConfig
from toptagger.training.files import HISTORY_FILE, MODEL_DIR, STATE_DICT_FILE


@pytest.fixture
def step_outputs(onnx_model_dir: Path, tiny_jets: JetBatch, tmp_path: Path) -> dict[str, Any]:
    """What the train, evaluate and preprocess steps hand the register step (one training epoch's record)."""
    model = artifact(dsl.Model, tmp_path / "model")
    shutil.copytree(onnx_model_dir, tmp_path / "model" / MODEL_DIR)
    with torch.random.fork_rng(devices=[]):
        tagger = load_model(onnx_model_dir)
    torch.save(tagger.state_dict(), tmp_path / "model" / STATE_DICT_FILE)
    history = {"epoch": 0, "train_loss": 0.69, "val_auc": 0.5}
    record = {"config": TrainConfig().to_dict(), "best_epoch": 0, "best_val_auc": 0.5, "history": [history]}
    (tmp_path / "model" / HISTORY_FILE).write_text(json.dumps(record))
    fit, test = tiny_jets[np.arange(80)], tiny_jets[np.arange(80, len(tiny_jets))]
    evaluation = artifact(dsl.Artifact, tmp_path / "evaluation")
    logit, probability = network_scores(tagger, test.constituents)
    baseline = mass_window_score(test.constituents)
    evaluate_scores(test.labels, logit, probability, baseline, tmp_path / "evaluation", n_bootstrap=10)
    datasets = []
    for name, jets in (("fit", fit), ("test", test)):
        dataset = artifact(dsl.Dataset, tmp_path / f"{name}.npz")
        save_jets(dataset.path, jets)
        common = {"source": "generated (Pythia8 + FastJet)", "dataset_sha256": jets_hash(tiny_jets), "split_seed": 3}
        dataset.metadata.update(common | {"n_jets": len(jets)})
        datasets.append(dataset)
    return {"model": model, "evaluation": evaluation, "fit_jets": datasets[0], "test_jets": datasets[1]}


def test_a_registered_version_is_a_described_mlflow_model_and_a_retry_changes_nothing(
    step_outputs: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    local_store(tmp_path / "state", monkeypatch)
    results = [register_step(**step_outputs, experiment="exp", model_name=MODEL_NAME, pipeline_run_id="run-1")
               for _ in range(2)]  # fmt: skip
    first, again = results
    assert (again["version"], again["mlflow_model"], again["run_id"]) == (
        first["version"],
        first["mlflow_model"],
        first["run_id"],
    )
    client = registry.client()
    version = client.get_model_version(MODEL_NAME, first["version"])
    assert version.source == first["mlflow_model"] and first["mlflow_model"].startswith("models:/m-")
    experiment = client.get_run(first["run_id"]).info.experiment_id
    assert len(client.search_logged_models([experiment])) == 1
    logged = client.get_logged_model(first["mlflow_model"].removeprefix("models:/"))
    assert first["model_uri"] == logged.artifact_location  # what the deploy step hands KServe

    metrics = json.loads((Path(step_outputs["evaluation"].path) / METRICS_FILE).read_text())
    text = version.description
    for key in ("auc", "rejection_0.3"):
        assert f"| {format_entry(metrics['network'][key])} | {format_entry(metrics['mass_window'][key])} |" in text
    assert f"{metrics['n_jets']} test jets" in text and "80 training and validation jets" in text
    assert step_outputs["fit_jets"].metadata["dataset_sha256"] in text and "split seed 3" in text
    model_text = client.get_registered_model(MODEL_NAME).description
    assert "`constituents`: float32 [N, 200, 4], (E, px, py, pz)" in model_text
    assert "`images`: float32 [N, 3, 32, 32]" in model_text and "Both inputs are optional" in model_text
    assert 'model.predict({"images": images})' in model_text and "model.predict(jets)" in model_text
