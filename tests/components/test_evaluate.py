"""The evaluate component: its CLI and its ROC artifact for the KFP UI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from kfp import dsl

from components.evaluate import ROC_POINTS, log_roc, main
from toptagger.cli import run_cli
from toptagger.evaluation.evaluate import METRICS_FILE, ROC_FILE
from toptagger.images import ImageConfig
from toptagger.jets.dataset import JetBatch
from toptagger.model import TaggerConfig, build_model, save_model

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_cli_evaluates_a_saved_model(
    jets_file: Path, small_jets: JetBatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.manual_seed(0)
    save_model(build_model(TaggerConfig(image=ImageConfig(image_size=32))), tmp_path / "model")
    args = ["--model", str(tmp_path / "model"), "--data", str(jets_file), "--out", str(tmp_path / "eval")]
    assert run_cli(main, [*args, "--bootstrap", "10"]) == 0
    assert "mass window" in capsys.readouterr().out
    stored = json.loads((tmp_path / "eval" / METRICS_FILE).read_text())
    assert stored["n_jets"] == len(small_jets)
    # on generated jets the mass window alone is strong (reference.md: AUC about 0.96)
    assert stored["mass_window"]["auc"]["value"] > 0.85
    assert (tmp_path / "eval" / ROC_FILE).read_bytes()[:8] == PNG_MAGIC
    assert run_cli(main, [*args, "--split", "test", "--bootstrap", "0"]) == 0
    assert json.loads((tmp_path / "eval" / METRICS_FILE).read_text())["n_jets"] == round(0.15 * len(small_jets))
    assert run_cli(main, ["--model", str(tmp_path / "nothing"), "--data", str(jets_file), "--out", str(tmp_path)]) == 2
    assert "nothing: no such file or folder" in capsys.readouterr().err


def test_roc_artifact_is_json_and_thinned() -> None:
    rng = np.random.default_rng(0)
    labels = np.r_[np.ones(500), np.zeros(500)].astype(np.int64)
    scores = rng.normal(labels * 2.0, 1.0)
    roc = dsl.ClassificationMetrics()
    log_roc(roc, labels, scores)
    points = roc.metadata["confidenceMetrics"]
    assert 100 <= len(points) <= ROC_POINTS
    json.dumps(roc.metadata, allow_nan=False)  # no inf threshold
    assert points[0]["recall"] == 0.0 and points[-1]["recall"] == 1.0
    matrix = [row["row"] for row in roc.metadata["confusionMatrix"]["rows"]]
    assert sum(map(sum, matrix)) == 1000
