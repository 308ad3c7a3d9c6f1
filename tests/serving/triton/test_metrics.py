"""Triton's ``nv_inference_*`` metrics: the collector on a real model, and the small server on a real port.

Against real Triton (names, types, labels, counts after SONIC's calls): test_conformance.py.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from kserve.errors import InvalidInput

from serving.predictor import BatchingOptions, TopTagger
from serving.process import free_port
from serving.triton.extensions import model_statistics
from serving.triton.metrics import FAILURE, FAMILIES, PENDING, MetricsServer, TritonMetrics
from tests.predictor import on_device, parse_metrics
from toptagger.jets.dataset import JetBatch

LABELS = 'model="top-tagger",version="1"'
REASONS = ("REJECTED", "CANCELED", "BACKEND", "OTHER")


@pytest.fixture
def tagger(model_dir: Path, one_torch_thread: None) -> Iterator[TopTagger]:
    model = TopTagger(str(model_dir), backend="torch", batching=BatchingOptions(max_batch_size=4, max_latency_ms=20))
    assert model.load(), model.not_ready_reason
    yield model
    model.stop()


def test_every_family_is_there_at_zero_before_the_model_loads(model_dir: Path) -> None:
    """As Triton's: the families exist from start-up (SuperSONIC's Envoy filter fails on a missing value)."""
    text = TritonMetrics(TopTagger(str(model_dir), backend="torch")).text()
    for name, kind in FAMILIES.items():
        assert f"# TYPE {name} {kind}\n" in text
    samples = parse_metrics(text)
    expected = {f"{name}{{{LABELS}}}" for name in FAMILIES if name != FAILURE}
    expected |= {f'{FAILURE}{{{LABELS},reason="{reason}"}}' for reason in REASONS}
    assert set(samples) == expected
    assert set(samples.values()) == {0.0}


def test_the_counts_are_the_model_statistics(tagger: TopTagger, small_jets: JetBatch) -> None:
    """One owner per count: the metrics and ModelStatistics read the same batcher statistics."""
    jets = small_jets.constituents[:6]
    images = on_device(tagger, tagger.backend.render, jets)  # type: ignore[union-attr]
    nan = images[:1].copy()
    nan[0, 0, 0, 0] = np.nan

    async def traffic() -> None:
        await asyncio.gather(*(tagger.classify("images", images[i : i + 1]) for i in range(5)))
        await tagger.classify("constituents", jets[:2])
        with pytest.raises(InvalidInput, match="NaN"):  # refused inside the batch: a BACKEND failure
            await tagger.classify("constituents", np.full_like(jets[:1], np.nan))

    asyncio.run(traffic())
    samples = parse_metrics(TritonMetrics(tagger).text())
    entry = model_statistics(tagger)
    stats = entry.inference_stats

    def value(name: str) -> float:
        return samples[f"{name}{{{LABELS}}}"]

    assert value("nv_inference_request_success") == stats.success.count == 6
    assert value("nv_inference_count") == entry.inference_count == 7
    assert value("nv_inference_exec_count") == entry.execution_count
    for name, duration in (
        ("nv_inference_request_duration_us", stats.success),
        ("nv_inference_queue_duration_us", stats.queue),
        ("nv_inference_compute_input_duration_us", stats.compute_input),
        ("nv_inference_compute_infer_duration_us", stats.compute_infer),
        ("nv_inference_compute_output_duration_us", stats.compute_output),
    ):
        assert value(name) == pytest.approx(duration.ns / 1000, rel=1e-12)
        assert value(name) > 0
    failures = {reason: samples[f'{FAILURE}{{{LABELS},reason="{reason}"}}'] for reason in REASONS}
    assert failures == {"REJECTED": 0, "CANCELED": 0, "BACKEND": 1, "OTHER": 0}
    assert sum(failures.values()) == stats.fail.count
    assert value(PENDING) == 0  # nothing waits once every call has returned


@pytest.fixture
def served(model_dir: Path) -> Iterator[MetricsServer]:
    server = MetricsServer(TopTagger(str(model_dir), backend="torch"), free_port(), host="127.0.0.1")
    yield server
    server.close()


def test_the_server_answers_get_metrics_in_prometheus_text(served: MetricsServer) -> None:
    answer = httpx.get(f"http://127.0.0.1:{served.port}/metrics", timeout=10)
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert f"nv_inference_exec_count{{{LABELS}}} 0\n" in answer.text
    # A scraper asking for OpenMetrics still gets Triton's text format, names without "_total".
    negotiated = httpx.get(
        f"http://127.0.0.1:{served.port}/metrics", headers={"accept": "application/openmetrics-text"}, timeout=10
    )
    assert negotiated.text == answer.text
    assert "_total" not in negotiated.text


def test_the_server_refuses_other_paths_and_methods_by_name(served: MetricsServer) -> None:
    wrong_path = httpx.get(f"http://127.0.0.1:{served.port}/v2/metrics", timeout=10)
    assert wrong_path.status_code == 404
    assert "metrics are at /metrics" in wrong_path.text
    wrong_method = httpx.post(f"http://127.0.0.1:{served.port}/metrics", timeout=10)
    assert wrong_method.status_code == 405
    assert "use GET" in wrong_method.text


def test_a_taken_port_is_an_error_at_once(model_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(OSError):
            MetricsServer(TopTagger(str(model_dir), backend="torch"), taken.getsockname()[1], host="127.0.0.1")
