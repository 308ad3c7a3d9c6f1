"""Shared fixtures: real generated jets, a real S3-compatible server on loopback, a fake Trainer API."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from serving.process import free_port
from toptagger.images import ImageConfig
from toptagger.jets.dataset import JetBatch, write_jets
from toptagger.jets.generator import generate_jets
from toptagger.training.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
pytest_plugins = ["tests.predictor", "tests.quantized", "tests.rng_guard"]


@pytest.fixture(scope="session")
def small_jets() -> JetBatch:
    """About 200 top + 200 QCD jets from Pythia8 + FastJet (a few seconds on 2 cores)."""
    return generate_jets(200, 200, seed=12345, workers=2)


@pytest.fixture(scope="module")
def jets(small_jets: JetBatch) -> np.ndarray:
    """Three top and three QCD jets of ``small_jets``, picked with a seeded generator: float32 [6, 200, 4]."""
    rng = np.random.default_rng(2024)
    top = rng.choice(np.flatnonzero(small_jets.labels == 1), 3, replace=False)
    qcd = rng.choice(np.flatnonzero(small_jets.labels == 0), 3, replace=False)
    return np.ascontiguousarray(small_jets.constituents[np.concatenate([top, qcd])])


@pytest.fixture(scope="session")
def tiny_jets() -> JetBatch:
    """60 top + 60 QCD jets (a few seconds on one core), for the pipeline's steps."""
    return generate_jets(60, 60, seed=5, workers=1)


@pytest.fixture(scope="session")
def train_config() -> TrainConfig:
    """A training run small enough for 2 gloo ranks on 2 cores: 16-pixel one-channel images, 3 epochs
    of 2 steps of 16 jets. Tests ``dataclasses.replace`` what they vary."""
    image = ImageConfig(image_size=16, center="centroid", rotate=True, flip=True, normalize=True)
    return TrainConfig(image=image, in_channels=1, epochs=3, batch_size=16, max_steps_per_epoch=2, patience=5, seed=11)


def _written(jets: JetBatch, folder: Path, name: str) -> Path:
    path = folder / name
    write_jets(path, jets)
    return path


@pytest.fixture(scope="session")
def tiny_file(tiny_jets: JetBatch, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny_jets`` written in the reference layout."""
    return _written(tiny_jets, tmp_path_factory.mktemp("tiny"), "tiny.h5")


@pytest.fixture(scope="session")
def jets_file(small_jets: JetBatch, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``small_jets`` written in the reference layout."""
    return _written(small_jets, tmp_path_factory.mktemp("jets"), "small.h5")


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited early with status {process.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listening on port {port} after {timeout} s")


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """moto's standalone S3 server on loopback (MinIO binaries are not available here)."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, process)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
def s3_env(s3_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """Point the storage layer at the loopback S3 server with a fresh bucket; returns the bucket URI."""
    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setattr("toptagger.storage.DEFAULT_CACHE", tmp_path / "s3-cache")
    bucket = f"test-{os.getpid()}-{time.monotonic_ns()}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    return f"s3://{bucket}"


@pytest.fixture
def trainer_api() -> Iterator[Callable[..., Any]]:
    """Starts fake Kubeflow Trainer API servers (``tests/toptagger/deploy/fake_trainer.py``) for one test.

    ``trainer_api(controller)`` returns a started ``FakeTrainerAPI``; each is shut down afterwards.
    """
    from tests.toptagger.deploy.fake_trainer import FakeTrainerAPI

    servers: list[FakeTrainerAPI] = []

    def start(controller: Callable[..., None]) -> FakeTrainerAPI:
        server = FakeTrainerAPI(controller)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()
