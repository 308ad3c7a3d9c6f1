"""serving.triton: Triton's ``ModelConfig`` and ``ModelStatistics`` of a ``TopTagger``, in-process.

Covers ``model_config`` before load (name, platform and backend only), after load (maximum batch
size, tensor names and dims without the batch dimension, the dynamic-batching delay in
microseconds) and after a fallback (the backend that serves is named, not the one asked for);
``model_statistics`` before load (empty) and after requests through the batcher, which
CMSSW's SONIC reports read: rows, batches, requests, failures and one entry per batch size; and
the two RPC handlers' answer to a model name (NOT_FOUND for another model), called with a
stand-in for grpc.aio's ServicerContext (which only a running server can build) that records the
abort and raises as grpc's does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from kserve.errors import InvalidInput

from serving.predictor import BatchingOptions, TopTagger
from serving.triton.extensions import (
    PLATFORM,
    SERVICE,
    as_json,
    handler,
    model_config,
    model_statistics,
    repository_index,
)
from serving.triton.protos import extensions_pb2, model_config_pb2
from toptagger.jets.dataset import JetBatch

# 2.5 ms: a delay that is not a whole number of milliseconds, to see the conversion to microseconds
BATCHING = BatchingOptions(max_batch_size=8, max_latency_ms=2.5, max_queue=16)


@contextmanager
def loaded(model: TopTagger) -> Iterator[TopTagger]:
    assert model.load(), model.not_ready_reason
    try:
        yield model
    finally:
        model.stop()


@pytest.fixture(scope="module")
def tagger(model_dir: Path, one_torch_thread: None) -> Iterator[TopTagger]:
    with loaded(TopTagger(str(model_dir), backend="torch", batching=BATCHING)) as model:
        yield model


@pytest.fixture
def fresh_tagger(model_dir: Path) -> Iterator[TopTagger]:
    """A newly loaded model whose statistics start at zero."""
    with loaded(TopTagger(str(model_dir), backend="torch", batching=BATCHING)) as model:
        yield model


@pytest.fixture(scope="module")
def eight_jets(small_jets: JetBatch) -> np.ndarray:
    """Eight jets of either label, picked with a seeded generator: float32 [8, 200, 4] (the shared ``jets`` has 6)."""
    rows = np.random.default_rng(11).choice(len(small_jets.labels), 8, replace=False)
    return np.ascontiguousarray(small_jets.constituents[rows])


# --- ModelConfig ---------------------------------------------------------------------------------


def test_config_before_load_has_only_name_platform_and_backend(model_dir: Path) -> None:
    config = model_config(TopTagger(str(model_dir), backend="torch"))
    assert (config.name, config.platform, config.backend) == ("top-tagger", PLATFORM, "torch")
    assert config.max_batch_size == 0
    assert len(config.input) == 0 and len(config.output) == 0
    assert not config.HasField("dynamic_batching")


def test_config_after_load_describes_the_tensors_without_the_batch_dimension(tagger: TopTagger) -> None:
    config = model_config(tagger)
    assert (config.name, config.platform, config.backend) == ("top-tagger", PLATFORM, "torch")
    assert config.max_batch_size == BATCHING.max_batch_size
    fp32 = model_config_pb2.TYPE_FP32
    assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [
        ("images", fp32, [3, 32, 32]),
        ("constituents", fp32, [200, 4]),
    ]
    assert [(t.name, t.data_type, list(t.dims)) for t in config.output] == [("probabilities", fp32, [2])]
    assert config.dynamic_batching.max_queue_delay_microseconds == 2500


def test_config_names_the_backend_that_serves_after_a_fallback(model_dir: Path) -> None:
    """Asked for OpenCL on a model folder without an OpenCL package, with torch as the fallback."""
    pytest.importorskip("pyopencl")  # the OpenCL backend imports it before it can fail over
    model = TopTagger(str(model_dir), backend="opencl", fallback="torch", batching=BATCHING)
    assert model_config(model).backend == "opencl"  # before load, the one asked for is all there is
    with loaded(model) as served:
        assert served.backend is not None and served.backend.kind == "torch"
        assert served.backend_name == "opencl"
        config = model_config(served)
        assert config.backend == "torch"
        assert config.max_batch_size == BATCHING.max_batch_size


# --- ModelStatistics -----------------------------------------------------------------------------


def test_statistics_before_load_are_empty(model_dir: Path) -> None:
    entry = model_statistics(TopTagger(str(model_dir), backend="torch"))
    assert (entry.name, entry.version) == ("top-tagger", "1")
    assert (entry.inference_count, entry.execution_count, entry.last_inference) == (0, 0, 0)
    assert not entry.HasField("inference_stats")
    assert len(entry.batch_stats) == 0


def test_statistics_count_rows_batches_requests_and_batch_sizes(
    fresh_tagger: TopTagger, eight_jets: np.ndarray
) -> None:
    model = fresh_tagger
    assert model.backend is not None and model.device_thread is not None
    images = model.device_thread.submit(model.backend.render, eight_jets).result()
    bad = eight_jets[:1].copy()
    bad[0, 0, 0] = np.nan  # classify() trusts its caller; the renderer refuses this in the batch

    async def traffic() -> None:
        # One at a time, each request is a batch of its own ...
        await model.classify("images", images[:3])
        await model.classify("images", images[3:6])
        await model.classify("constituents", eight_jets[:2])
        # ... and requests queued together (nothing awaits between them) are one batch of 1+2+1.
        await asyncio.gather(
            model.classify("images", images[:1]),
            model.classify("images", images[1:3]),
            model.classify("images", images[3:4]),
        )
        with pytest.raises(InvalidInput, match="NaN"):
            await model.classify("constituents", bad)

    asyncio.run(traffic())
    entry = model_statistics(model)
    assert entry.inference_count == 3 + 3 + 2 + 4  # rows
    assert entry.execution_count == 4  # batches
    stats = entry.inference_stats
    assert stats.success.count == 6  # requests answered
    assert stats.fail.count == 1
    assert stats.queue.count == 6
    # As Triton counts them: compute per request (a batch's time once for each of its requests) ...
    assert stats.compute_input.count == stats.compute_infer.count == stats.compute_output.count == 6
    # ... and per execution in batch_stats. Durations come from the same clock readings, so a request
    # lasts at least its queue wait and its batch's compute (no assertion on how long anything took).
    parts = stats.queue.ns + stats.compute_input.ns + stats.compute_infer.ns + stats.compute_output.ns
    assert stats.success.ns >= parts > 0
    per_execution = sum(b.compute_infer.ns for b in entry.batch_stats)
    assert 0 < per_execution < stats.compute_infer.ns  # the batch of three requests counts three times
    assert [(b.batch_size, b.compute_infer.count) for b in entry.batch_stats] == [(2, 1), (3, 2), (4, 1)]
    assert entry.last_inference > 0  # milliseconds since the epoch of the last batch


def test_statistics_add_up_both_input_queues(fresh_tagger: TopTagger, eight_jets: np.ndarray) -> None:
    model = fresh_tagger
    asyncio.run(model.classify("constituents", eight_jets[:5]))
    entry = model_statistics(model)
    assert (entry.inference_count, entry.execution_count) == (5, 1)
    assert model.batchers["images"].stats.execution_count == 0
    assert [(b.batch_size, b.compute_infer.count) for b in entry.batch_stats] == [(5, 1)]
    # One request in one batch: per request and per execution are the same measurement.
    (only,) = entry.batch_stats
    assert only.compute_input.ns == entry.inference_stats.compute_input.ns > 0  # the constituents' rendering
    assert only.compute_infer.ns == entry.inference_stats.compute_infer.ns > 0


# --- the RPC handlers ----------------------------------------------------------------------------


class RecordingContext:
    """A stand-in for grpc.aio's ServicerContext: records the abort and raises as grpc does."""

    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None
        self.details: str | None = None

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        self.code, self.details = code, details
        raise grpc.aio.AbortError()


@dataclass(frozen=True)
class CallDetails:
    """What grpc hands a generic handler to pick the method (grpc.HandlerCallDetails)."""

    method: str
    invocation_metadata: tuple[tuple[str, str], ...] = ()


def call(model: TopTagger, method: str, request: object, context: RecordingContext) -> object:
    rpc = handler(model).service(CallDetails(f"/{SERVICE}/{method}"))  # type: ignore[arg-type]
    assert rpc is not None, f"no handler for {method}"
    return asyncio.run(rpc.unary_unary(request, context))


def test_model_config_rpc_answers_for_the_served_model_only(tagger: TopTagger) -> None:
    context = RecordingContext()
    answer = call(tagger, "ModelConfig", extensions_pb2.ModelConfigRequest(name="top-tagger"), context)
    assert context.code is None
    assert isinstance(answer, extensions_pb2.ModelConfigResponse)
    assert answer.config == model_config(tagger)
    for name in ("bottom-tagger", ""):  # SONIC always names the model it configures
        context = RecordingContext()
        with pytest.raises(grpc.aio.AbortError):
            call(tagger, "ModelConfig", extensions_pb2.ModelConfigRequest(name=name), context)
        assert context.code == grpc.StatusCode.NOT_FOUND
        assert context.details == f"unknown model '{name}'; serving 'top-tagger'"


def test_model_statistics_rpc_answers_for_the_served_model_or_all_models(tagger: TopTagger) -> None:
    for name in ("top-tagger", ""):  # "" asks for every model: there is one
        context = RecordingContext()
        answer = call(tagger, "ModelStatistics", extensions_pb2.ModelStatisticsRequest(name=name), context)
        assert context.code is None
        assert isinstance(answer, extensions_pb2.ModelStatisticsResponse)
        assert list(answer.model_stats) == [model_statistics(tagger)]
    context = RecordingContext()
    with pytest.raises(grpc.aio.AbortError):
        call(tagger, "ModelStatistics", extensions_pb2.ModelStatisticsRequest(name="bottom-tagger"), context)
    assert (context.code, context.details) == (
        grpc.StatusCode.INVALID_ARGUMENT,  # Triton's code for statistics (NOT_FOUND for ModelConfig)
        "unknown model 'bottom-tagger'; serving 'top-tagger'",
    )


# --- RepositoryIndex and the JSON form of Triton's HTTP API ---------------------------------------


def test_repository_index_lists_the_model_ready_or_unavailable_with_the_reason(
    tagger: TopTagger, tmp_path: Path
) -> None:
    assert [(m.name, m.version, m.state) for m in repository_index(tagger).models] == [("top-tagger", "1", "READY")]
    assert len(repository_index(tagger, ready_only=True).models) == 1
    broken = TopTagger(str(tmp_path / "missing"), backend="torch")
    assert not broken.load()
    (entry,) = repository_index(broken).models
    assert entry.state == "UNAVAILABLE" and "missing" in entry.reason
    assert not repository_index(broken, ready_only=True).models


def test_json_form_writes_every_field_with_numbers_as_numbers(tagger: TopTagger) -> None:
    config = as_json(model_config(tagger))
    assert config["max_batch_size"] == 8 and isinstance(config["max_batch_size"], int)
    assert config["input"][0]["dims"] == [3, 32, 32] and config["input"][0]["data_type"] == "TYPE_FP32"
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 2500
    stats = as_json(model_statistics(tagger))
    assert stats["version"] == "1" and isinstance(stats["inference_count"], int)
    assert set(stats["inference_stats"]) >= {"success", "fail", "queue", "compute_infer"}
    assert stats["inference_stats"]["queue"].keys() == {"count", "ns"}
