"""A real predictor process on loopback, serving a small (random-weight) tagger.

Fixtures for tests/serving and tests/benchmarks (registered in tests/conftest.py), and the helper
that starts a predictor for a test of its own.
"""

from __future__ import annotations

import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch

from serving.process import LocalPredictor as Server
from serving.process import free_port, start_local
from toptagger.images import ImageConfig
from toptagger.model import TaggerConfig, build_model, save_model

IMAGE_SIZE = 32
# The full preprocessing switched on (centring, rotation, flip, normalisation).
IMAGE_CONFIG = ImageConfig(image_size=IMAGE_SIZE, center="centroid", rotate=True, flip=True, normalize=True)
T = TypeVar("T")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tagger (seeded random weights) with :data:`IMAGE_CONFIG`."""
    torch.manual_seed(0)
    return save_model(build_model(TaggerConfig(image=IMAGE_CONFIG)).eval(), tmp_path_factory.mktemp("model") / "tagger")


@pytest.fixture(scope="session")
def onnx_model_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """:func:`model_dir`'s tagger with its ONNX graph, as the train step writes it."""
    from toptagger.model import load_model
    from toptagger.onnx_export import export_onnx

    folder = tmp_path_factory.mktemp("onnx-model") / "tagger"
    shutil.copytree(model_dir, folder)
    with torch.random.fork_rng(devices=[]):
        export_onnx(load_model(folder), folder)
    return folder


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """The machine is shared: one intra-op thread, inherited by a predictor's device thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def on_device(model: Any, function: Callable[..., T], *args: object) -> T:
    """Run ``function`` on an in-process predictor's device thread, where its batcher runs the backend."""
    assert model.device_thread is not None
    return model.device_thread.submit(function, *args).result()


def start_server(model_uri: str | Path, *extra: str, wait_ready: bool = True, grpc_port: int | None = None) -> Server:
    """The predictor on free loopback ports (its metrics port too), one torch thread (the tests share two cores)."""
    metrics = [] if "--metrics-port" in extra else ["--metrics-port", str(free_port())]
    return start_local(
        str(model_uri),
        http_port=free_port(),
        grpc_port=grpc_port or free_port(),
        extra_args=["--threads", "1", *metrics, *extra],
        timeout_s=180,
        wait_ready=wait_ready,
    )


def metrics_url(server: Server) -> str:
    """Where the server's Triton metrics are: ``--metrics-port`` as its command line has it."""
    args = list(server.process.args)  # type: ignore[arg-type]
    return f"http://{server.host}:{args[args.index('--metrics-port') + 1]}/metrics"


def stop_server(server: Server) -> None:
    server.stop()


@pytest.fixture(scope="session")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = start_server(model_dir, "--max-batch-size", "8")
    yield running
    stop_server(running)


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {"name{labels as written}": value} (comment lines left out)."""
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            samples[series] = float(value)
    return samples


def scrape(server: Server) -> dict[str, float]:
    """The server's Triton metrics, parsed (:func:`parse_metrics`)."""
    import httpx

    answer = httpx.get(metrics_url(server), timeout=30)
    answer.raise_for_status()
    return parse_metrics(answer.text)


def read_http_answer(sock: socket.socket) -> str:
    """One HTTP/1.1 answer with a Content-Length body, read off a raw socket."""
    answer = b""
    while b"\r\n\r\n" not in answer:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before an answer: {answer!r}"
        answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = (line.partition(b":") for line in head.split(b"\r\n"))
    length = int(next(value for name, _, value in lines if name.strip().lower() == b"content-length"))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed inside the answer's body"
        body += chunk
    return (head + b"\r\n\r\n" + body).decode("latin-1")
