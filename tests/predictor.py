"""A real predictor process on loopback, serving a small (random-weight) tagger.

Fixtures for tests/serving and tests/benchmarks (registered in tests/conftest.py), and the helper
that starts a predictor for a test of its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from serving.process import LocalPredictor as Server
from serving.process import free_port, start_local
from toptagger.images import ImageConfig
from toptagger.model import TaggerConfig, build_model, save_model

IMAGE_SIZE = 32


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tagger with the full preprocessing switched on (centring, rotation, flip, norm)."""
    import torch

    torch.manual_seed(0)
    config = TaggerConfig(
        image=ImageConfig(image_size=IMAGE_SIZE, center="centroid", rotate=True, flip=True, normalize=True)
    )
    return save_model(build_model(config).eval(), tmp_path_factory.mktemp("model") / "tagger")


def start_server(model_uri: str | Path, *extra: str, wait_ready: bool = True, grpc_port: int | None = None) -> Server:
    """The predictor on free loopback ports, one torch thread (the tests share two cores)."""
    return start_local(
        str(model_uri),
        http_port=free_port(),
        grpc_port=grpc_port or free_port(),
        extra_args=["--threads", "1", *extra],
        timeout_s=180,
        wait_ready=wait_ready,
    )


def stop_server(server: Server) -> None:
    server.stop()


@pytest.fixture(scope="session")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = start_server(model_dir, "--max-batch-size", "8")
    yield running
    stop_server(running)
