"""A real predictor process on loopback, serving a small (random-weight) tagger."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from components.images import ImageConfig
from components.model import TaggerConfig, build_model, save_model
from tests.conftest import REPO, free_port

IMAGE_SIZE = 32


@dataclass
class Server:
    process: subprocess.Popen
    http: str
    grpc: str
    log: Path

    @property
    def rest_url(self) -> str:
        return f"http://{self.http}"

    @property
    def grpc_url(self) -> str:
        return f"grpc://{self.grpc}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tagger with the full preprocessing switched on (centring, rotation, flip, norm)."""
    import torch

    torch.manual_seed(0)
    config = TaggerConfig(
        image=ImageConfig(image_size=IMAGE_SIZE, center="centroid", rotate=True, flip=True, normalize=True)
    )
    return save_model(build_model(config).eval(), tmp_path_factory.mktemp("model") / "tagger")


def start_server(
    model_uri: str | Path, log: Path, *extra: str, wait_ready: bool = True, timeout: float = 120
) -> Server:
    http, grpc = free_port(), free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "serving", "--model-uri", str(model_uri), "--http-port", str(http)]
    command += ["--grpc-port", str(grpc), "--threads", "1", *extra]
    handle = log.open("w")
    process = subprocess.Popen(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, env=env)
    server = Server(process, f"127.0.0.1:{http}", f"127.0.0.1:{grpc}", log)
    deadline = time.monotonic() + timeout
    path = "/v2/health/ready" if wait_ready else "/v2/health/live"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.log_text()[-3000:]}")
        try:
            if httpx.get(f"{server.rest_url}{path}", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stop_server(server)
    raise RuntimeError(f"server not up after {timeout} s:\n{server.log_text()[-3000:]}")


def stop_server(server: Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


@pytest.fixture(scope="session")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = start_server(model_dir, tmp_path_factory.mktemp("logs") / "server.log", "--max-batch-size", "8")
    yield running
    stop_server(running)
