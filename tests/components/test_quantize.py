"""quantize -> evaluate -> register on real step outputs: the version carries its int8 graphs and admission."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from kfp import dsl

from components.evaluate import evaluate_step
from components.quantize import quantize_step
from components.register import register_step
from tests.components.artifacts import artifact
from tests.toptagger.conftest import local_store
from toptagger import model_uri, registry
from toptagger.constants import MODEL_NAME
from toptagger.errors import ConfigError
from toptagger.jets.compact import save_jets
from toptagger.jets.dataset import JetBatch
from toptagger.model import load_model
from toptagger.precision.files import ADMISSION_FILE, QUANTIZED_DIR, carried
from toptagger.training.config import TrainConfig
from toptagger.training.files import HISTORY_FILE, MODEL_DIR, STATE_DICT_FILE

LOOSE_GATE = 0.5  # a random-weight network: the gate admits its int8 graphs, and NNCF ranks no layers


@pytest.fixture
def model_artifact(quantized_model_dir: Path, tmp_path: Path) -> dsl.Model:
    """The train step's output for the 16-pixel tagger (its own int8 graphs left out)."""
    model = artifact(dsl.Model, tmp_path / "model")
    shutil.copytree(quantized_model_dir, tmp_path / "model" / MODEL_DIR, ignore=shutil.ignore_patterns(QUANTIZED_DIR))
    with torch.random.fork_rng(devices=[]):
        torch.save(load_model(quantized_model_dir).state_dict(), tmp_path / "model" / STATE_DICT_FILE)
    record = {"config": TrainConfig().to_dict(), "best_epoch": 0, "best_val_auc": 0.5, "history": [{"epoch": 0}]}
    (tmp_path / "model" / HISTORY_FILE).write_text(json.dumps(record))
    return model


def _jets(jets: JetBatch, path: Path) -> dsl.Dataset:
    dataset = artifact(dsl.Dataset, path)
    save_jets(dataset.path, jets)
    dataset.metadata.update({"source": "generated", "dataset_sha256": "x", "split_seed": 1, "n_jets": len(jets)})
    return dataset


def test_quantize_evaluate_register(
    model_artifact: dsl.Model, tiny_jets: JetBatch, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    order = np.random.default_rng(3).permutation(len(tiny_jets.labels))
    fit = _jets(tiny_jets[order[:80]], tmp_path / "fit.npz")
    test = _jets(tiny_jets[order[80:]], tmp_path / "test.npz")
    quantized = artifact(dsl.Model, tmp_path / "quantized")
    with pytest.raises(ConfigError, match="max_auc_loss must be in"):
        quantize_step(model_artifact, fit, quantized, 1, 0.15, 0.15, max_auc_loss=1.5)
    np.random.seed(0)  # NNCF draws from numpy's global generator
    quantize_step(model_artifact, fit, quantized, 1, 0.15, 0.15, LOOSE_GATE, calibration_jets=16, validation_jets=40)
    assert quantized.metadata["calibration_jets"] == 16 and quantized.metadata["max_auc_loss"] == LOOSE_GATE

    outputs = {name: artifact(kind, tmp_path / name) for name, kind in
               (("metrics", dsl.Metrics), ("roc", dsl.ClassificationMetrics), ("evaluation", dsl.Artifact),
                ("report", dsl.HTML))}  # fmt: skip
    evaluate_step(model_artifact, test, **outputs, n_bootstrap=5, seed=0, quantized=quantized, max_auc_loss=LOOSE_GATE)
    admission = json.loads((tmp_path / "evaluation" / ADMISSION_FILE).read_text())
    assert {"openvino/int8", "onnxruntime/int8", "openvino/fp32"} <= set(admission["admitted"])
    logged = outputs["metrics"].metadata
    assert 0 <= logged["precision/openvino/int8/auc"] <= 1 and logged["precision/openvino/int8/admitted"] == 1.0
    assert "precision/onnxruntime/int8/max_probability_difference" in logged
    assert "Precisions (gate: AUC loss ≤ 0.5" in (tmp_path / "report").read_text()

    local_store(tmp_path / "state", monkeypatch)
    result = register_step(model_artifact, outputs["evaluation"], fit, test, "exp", MODEL_NAME, "run-q", quantized)
    run_metrics = registry.client().get_run(result["run_id"]).data.metrics
    assert run_metrics["precision/openvino/int8/auc"] == logged["precision/openvino/int8/auc"]
    tags = registry.client().get_model_version(MODEL_NAME, result["version"]).tags
    assert tags["precision.admitted"] == ",".join(admission["admitted"])
    assert tags["precision.openvino.int8.admitted"] == "true" and "precision.openvino.int8.auc" in tags
    served = model_uri.fetch_model_dir(model_uri.version_uri(MODEL_NAME, result["version"]))
    assert {"openvino/int8", "onnxruntime/int8"} <= set(carried(served))
    assert json.loads((served / ADMISSION_FILE).read_text()) == admission
