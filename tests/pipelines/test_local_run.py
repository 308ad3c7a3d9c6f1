"""The whole pipeline through kfp.local on tiny data, as ``python -m pipelines.run`` runs it.

Real parts only: Kubeflow's SubprocessRunner, Pythia8 jets, ResNet-50 training (a few steps),
the fpga_runtime export, and an MLflow SQLite store in a tmp folder.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = ["--signal", "60", "--background", "60", "--workers", "1", "--image-size", "32", "--epochs", "1",
        "--max-steps-per-epoch", "2", "--batch-size", "16", "--bootstrap", "20", "--deploy", "none",
        # A gate loose enough that NNCF ranks no layer of a 2-step network (minutes on 2 cores).
        "--max-auc-loss", "0.5", "--calibration-jets", "32", "--quantize-validation-jets", "40"]  # fmt: skip


def run_pipeline(tmp: Path, *extra: str, tracking: str | None = None) -> tuple[subprocess.CompletedProcess, Any]:
    summary = tmp / f"summary-{len(list(tmp.glob('summary-*')))}.json"
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking or f"sqlite:///{tmp / 'mlflow.db'}", "PYTHONPATH": str(REPO)}
    env.pop("DATASET", None)
    command = [sys.executable, "-m", "pipelines.run", *TINY, "--state", str(tmp / "state"),
               "--summary-json", str(summary), *extra]  # fmt: skip
    result = subprocess.run(command, cwd=tmp, env=env, capture_output=True, text=True, timeout=900)
    return result, (json.loads(summary.read_text()) if summary.is_file() else None)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]], str]:
    tmp = tmp_path_factory.mktemp("local-run")
    first, summary1 = run_pipeline(tmp)
    assert first.returncode == 0, first.stdout[-5000:] + first.stderr[-5000:]
    second, summary2 = run_pipeline(tmp)  # the cache is on by default
    assert second.returncode == 0, second.stdout[-5000:] + second.stderr[-5000:]
    return tmp, [summary1, summary2], first.stdout + first.stderr


@pytest.fixture
def client(two_runs: tuple[Path, list[dict[str, Any]], str], monkeypatch: pytest.MonkeyPatch) -> Any:
    from mlflow import MlflowClient

    uri = f"sqlite:///{two_runs[0] / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return MlflowClient(tracking_uri=uri)


@pytest.mark.slow
def test_first_run_registers_and_promotes_version_1(two_runs: tuple, client: Any) -> None:
    _, (summary, second), output = two_runs
    assert summary["version"] == "1" and summary["decision"] == "promoted"
    assert summary["aliases"] == "challenger,champion"  # read back from the registry right after run 1
    version = client.get_model_version("top-tagger", "1")
    # Run 2's version has since taken the challenger alias, and champion too if its AUC is as good.
    assert version.aliases == ([] if second["decision"] == "promoted" else ["champion"])
    tags = version.tags
    assert tags["promotion.decision"] == "promoted" and tags["promotion.reason"].startswith("no champion yet")
    assert float(tags["test_auc"]) == pytest.approx(summary["evaluation"]["test_auc"])
    assert tags["dataset_hash"] == summary["data"]["dataset_sha256"] and len(tags["dataset_hash"]) == 64
    assert tags["pipeline_run_id"].startswith("local-") and tags["code_version"]
    assert version.run_id == summary["run_id"]
    # kfp.local ignores the cluster settings; the run says which ones.
    assert "skipped locally (kfp.local ignores it): train: accelerator nvidia.com/gpu x1" in output
    assert "node selector {'nvidia.com/gpu.present': 'true'}" in output and "Secret top-tagger-mlflow" in output


@pytest.mark.slow
def test_the_run_holds_params_metrics_tags_and_artifacts(two_runs: tuple, client: Any) -> None:
    _, (summary, _), _ = two_runs
    run = client.get_run(summary["run_id"])
    params = run.data.params
    assert params["epochs"] == "1" and params["image.image_size"] == "32" and params["batch_size"] == "16"
    assert params["dataset.source"] == "generated (Pythia8 + FastJet)"
    assert int(params["dataset.fit_jets"]) + int(params["dataset.test_jets"]) == 120
    metrics = run.data.metrics
    for key in ("test_auc", "mass_window_auc", "best_val_auc", "train_loss", "val_auc"):
        assert key in metrics, key
    # 1/eps_B is infinite when no QCD jet of the ~18 test jets passes the cut: the evaluation then
    # records null, and MLflow (finite numbers only) gets no value; otherwise the run has it.
    rejection = summary["evaluation"].get("test_rejection_0.3")
    assert ("test_rejection_0.3" in metrics) == (rejection is not None and math.isfinite(rejection)), rejection
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [0]  # per epoch
    signature = json.loads(run.data.tags["input_signature"])
    assert signature["inputs"][0] == {"name": "images", "datatype": "FP32", "shape": [-1, 3, 32, 32]}
    assert run.data.tags["dataset_hash"] == summary["data"]["dataset_sha256"]
    assert run.data.tags["code_version"] and run.info.status == "FINISHED"

    import mlflow

    files = {a.path for a in mlflow.artifacts.list_artifacts(run_id=run.info.run_id)}
    assert files == {"model", "state_dict", "training", "evaluation"}
    listed = {
        f"{folder}/{a.path.split('/')[-1]}"
        for folder in ("model", "model/opencl", "evaluation", "state_dict", "training")
        for a in mlflow.artifacts.list_artifacts(run_id=run.info.run_id, artifact_path=folder)
    }
    for path in ("model/model.safetensors", "model/tagger.json", "model/opencl/plan.json", "evaluation/metrics.json",
                 "evaluation/roc.png", "evaluation/scores.png", "state_dict/state_dict.pt",
                 "training/training.json"):  # fmt: skip
        assert path in listed, path


@pytest.mark.slow
def test_the_champion_loads_without_pickle(two_runs: tuple, client: Any, tmp_path: Path) -> None:
    import torch

    from toptagger.model import load_model
    from toptagger.model_uri import fetch_model_dir

    folder = fetch_model_dir("models:/top-tagger@champion", cache=tmp_path / "cache")
    assert (folder / "tagger.json").is_file() and (folder / "opencl" / "plan.json").is_file()
    torch.manual_seed(0)  # load_model builds the network (random initialisation) before loading the weights
    model = load_model(folder)
    assert model.config.image.image_size == 32
    import mlflow

    state_file = mlflow.artifacts.download_artifacts(
        run_id=two_runs[1][0]["run_id"], artifact_path="state_dict/state_dict.pt", dst_path=str(tmp_path)
    )
    state = torch.load(state_file, weights_only=True)
    assert torch.equal(state["fc.weight"], model.state_dict()["fc.weight"])


@pytest.mark.slow
def test_second_run_uses_the_cache_and_makes_one_new_version(two_runs: tuple, client: Any) -> None:
    _, (first, second), _ = two_runs
    assert first["cached"] == [] and second["cached"] == ["data", "preprocess"]
    assert set(second["steps"]) == {"train", "quantize", "evaluate", "register", "deploy"}
    assert second["data"]["dataset_sha256"] == first["data"]["dataset_sha256"]
    assert second["version"] == "2" and second["run_id"] != first["run_id"]
    versions = client.search_model_versions("name = 'top-tagger'")
    assert sorted(str(v.version) for v in versions) == ["1", "2"]
    assert len(client.search_runs([client.get_experiment_by_name("top-tagging").experiment_id])) == 2
    # Same seed, same data: the gate compares the two AUCs and says so either way.
    expected = "promoted" if second["evaluation"]["test_auc"] >= first["evaluation"]["test_auc"] else "not promoted"
    assert second["decision"] == expected and "champion version 1" in second["reason"]
    assert "challenger" in second["aliases"].split(",")


@pytest.mark.slow
def test_a_bad_dataset_uri_fails_its_task_with_one_message_and_leaves_the_registry_alone(
    s3_env: str, tmp_path: Path
) -> None:
    uri = f"{s3_env}/no/such/jets.h5"
    result, summary = run_pipeline(tmp_path, "--dataset", uri)
    assert result.returncode == 2 and summary is None
    assert result.stderr.strip().splitlines()[-1] == f"error: data: {uri}: no such object"
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.search_registered_models() == []
    assert client.get_experiment_by_name("top-tagging") is None  # not a single run was created


def test_an_unreachable_mlflow_fails_before_any_task(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result, _ = run_pipeline(tmp_path, tracking=f"http://127.0.0.1:{port}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: MLflow tracking server http://127.0.0.1:{port} is unreachable ([Errno 111] Connection refused); "
        "check MLFLOW_TRACKING_URI"
    )
    assert not (tmp_path / "state" / "kfp").exists()  # no task started


def test_bad_parameters_are_refused_before_any_task(tmp_path: Path) -> None:
    result, _ = run_pipeline(tmp_path, "--lr", "-1")
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == "error: lr must be > 0, got -1.0"
    result, _ = run_pipeline(tmp_path, "--dataset", str(tmp_path / "missing.h5"))
    assert result.stderr.strip().splitlines()[-1] == f"error: --dataset {tmp_path / 'missing.h5'}: no such file"
    result, _ = run_pipeline(tmp_path, "--max-auc-loss", "2")
    expected = "error: max_auc_loss must be in [0, 1) (an AUC difference, e.g. 0.001), got 2.0"
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == expected


@pytest.mark.slow
def test_the_champion_is_an_mlflow_model_that_predicts_as_score_jets(
    two_runs: tuple, client: Any, tiny_jets: Any
) -> None:
    import mlflow
    import numpy as np
    import torch

    from tests.tolerances import tagger_probability_bound
    from toptagger.evaluation.report import format_metric
    from toptagger.mlflow_model import served_constituents
    from toptagger.model import load_model, score_jets
    from toptagger.signature import Signature

    _, summaries, _ = two_runs
    champion = client.get_model_version_by_alias("top-tagger", "champion")
    summary = summaries[int(champion.version) - 1]
    assert champion.source.startswith("models:/m-")  # the MLflow Model, not the run's folder
    pyfunc = mlflow.pyfunc.load_model("models:/top-tagger@champion")
    with torch.random.fork_rng(devices=[]):
        tagger = load_model("models:/top-tagger@champion")  # the predictor's loader, on the same artifact
    served = Signature.of(tagger.config)
    signature = pyfunc.metadata.signature
    assert signature.inputs.optional_input_names() == [i.name for i in served.inputs]  # either or both
    assert pyfunc.metadata.metadata["tensors"] == served.to_dict()  # their shapes
    assert [(s.name, s.shape) for s in signature.outputs.inputs] == [("probabilities", (-1, 2))]

    jets = served_constituents(tiny_jets.constituents[:16])
    probabilities = pyfunc.predict(jets)  # constituents alone
    assert probabilities.dtype == np.float32 and probabilities.shape == (16, 2)
    images = tagger.config.image.render(jets)
    images = np.broadcast_to(images, (16, tagger.config.in_channels, *images.shape[2:]))
    bound = tagger_probability_bound(tagger, images, jets)[:, 1]
    assert np.all(np.abs(probabilities[:, 1].astype(np.float64) - score_jets(tagger, jets)) <= bound)

    model_text = client.get_registered_model("top-tagger").description
    assert model_text.startswith("ResNet-50 top-quark jet tagger on jet images")
    assert "mlflow.pyfunc.load_model" in model_text
    text, ev = champion.description, summary["evaluation"]
    for prefix in ("test", "mass_window"):  # the evaluate step's numbers, beside each other
        assert format_metric(ev[f"{prefix}_auc"], ev[f"{prefix}_auc_error"]) in text
    assert "1/εB at εS = 0.3" in text and "generated (Pythia8 + FastJet)" in text
    assert summary["data"]["dataset_sha256"] in text and f"MLflow run {summary['run_id']}" in text
