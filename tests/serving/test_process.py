"""The predictor as a local process: error paths with a stand-in serving package, then the real one.

The error paths run a stand-in ``serving`` package (a real process that misbehaves on purpose) so
that they hold whatever the real predictor does; the last test serves a registered champion.
"""

from __future__ import annotations

import json
import socket
import urllib.request
from pathlib import Path

import pytest

from serving.process import start_local
from toptagger.errors import ConfigError, TaggerError
from toptagger.model_uri import resolve

REPO = Path(__file__).resolve().parents[2]
needs_serving = pytest.mark.skipif(not (REPO / "serving" / "__main__.py").exists(), reason="no serving package")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def stand_in_repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A repository root whose ``python -m serving`` is a script the test writes."""
    (tmp_path / "serving").mkdir()
    monkeypatch.setattr("serving.process.REPO", tmp_path)
    return tmp_path / "serving" / "__main__.py"


def test_local_mode_without_serving_package_says_so(stand_in_repo: Path) -> None:
    with pytest.raises(ConfigError, match=r"has no __main__\.py"):
        start_local("/mnt/models")


def test_local_mode_refuses_a_busy_port(stand_in_repo: Path) -> None:
    stand_in_repo.write_text("raise SystemExit(0)\n")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ConfigError, match=f"HTTP port {port} is already in use"):
            start_local("/mnt/models", http_port=port, grpc_port=free_port())


def test_local_mode_reports_a_predictor_that_dies(stand_in_repo: Path) -> None:
    stand_in_repo.write_text(
        "import sys\nprint('cannot read', sys.argv[sys.argv.index('--model-uri') + 1])\nsys.exit(3)\n"
    )
    with pytest.raises(TaggerError, match=r"exited with status 3[\s\S]*cannot read /nowhere"):
        start_local("/nowhere", http_port=free_port(), grpc_port=free_port(), timeout_s=60)


def test_local_mode_stops_a_predictor_that_never_gets_ready(stand_in_repo: Path) -> None:
    stand_in_repo.write_text("import time\nprint('loading forever', flush=True)\ntime.sleep(600)\n")
    with pytest.raises(TaggerError, match=r"not ready after 2 s[\s\S]*loading forever"):
        start_local("/mnt/models", http_port=free_port(), grpc_port=free_port(), timeout_s=2)


@pytest.fixture
def champion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A tagger (random weights) registered in a local MLflow registry as top-tagger@champion."""
    import mlflow
    import torch
    from mlflow import MlflowClient

    from toptagger.model import TaggerConfig, build_model, save_model

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    torch.manual_seed(0)  # build_model initialises the weights from the global RNG
    model_dir = save_model(build_model(TaggerConfig()), tmp_path / "model")
    experiment = mlflow.create_experiment("deploy-test", artifact_location=(tmp_path / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment) as run:
        mlflow.log_artifacts(str(model_dir), artifact_path="model")
    client = MlflowClient()
    client.create_registered_model("top-tagger")
    version = client.create_model_version("top-tagger", f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    client.set_registered_model_alias("top-tagger", "champion", version.version)
    return "models:/top-tagger@champion"


@needs_serving
@pytest.mark.slow
def test_local_deploy_serves_the_champion_over_v2(champion: str) -> None:
    model_uri = resolve(champion)  # as the CLI does
    assert model_uri.startswith("file://") and model_uri.endswith("/model")
    extra = ["--metrics-port", str(free_port())]  # not Triton's 8002: other servers may be running here
    with start_local(
        model_uri, http_port=free_port(), grpc_port=free_port(), extra_args=extra, timeout_s=300
    ) as predictor:
        with urllib.request.urlopen(f"{predictor.url}/v2/models/top-tagger", timeout=10) as response:
            metadata = json.load(response)
        spec = metadata["inputs"][0]  # the predictor accepts any one of its listed inputs
        shape = [1 if dim < 0 else dim for dim in spec["shape"]]
        size = 1
        for dim in shape:
            size *= dim
        body = {"inputs": [{"name": spec["name"], "shape": shape, "datatype": spec["datatype"], "data": [0] * size}]}
        infer = urllib.request.Request(
            predictor.infer_url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(infer, timeout=120) as response:
            answer = json.load(response)
        assert answer["model_name"] == "top-tagger"
        assert answer["outputs"] and all(out["data"] for out in answer["outputs"])
        process = predictor.process
    assert process.poll() is not None  # leaving the block stopped the server
