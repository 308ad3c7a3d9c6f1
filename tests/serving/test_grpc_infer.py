"""serving.grpc_infer: the gRPC ``ModelInfer`` fast path, driven in-process with asyncio.

Covers the one place errors become status codes (``_refusal``), and ``TaggerServicer`` in front
of a real ``TopTagger`` loaded from a real saved (random-weight) model: unknown model or
version (NOT_FOUND), a model that is not ready (UNAVAILABLE, with the reason), an unknown
requested output or a request the contract refuses (INVALID_ARGUMENT), a full queue
(RESOURCE_EXHAUSTED), the refusal's log line, and good requests, whose ``raw_output_contents``
must be the backend's own probabilities.

grpc.aio's ``ServicerContext`` cannot be built outside a running server, so ``ModelInfer`` gets
:class:`RecordingContext`, which does what the servicer uses of grpc's: ``invocation_metadata()``,
and ``set_code()`` / ``set_details()``, which record the status. ``ModelInfer`` answers a refusal
with that status (grpc then drops the response), not with ``abort()``: grpc keeps the abort's
exception in the call's state, a reference cycle per refusal holding the request's payload.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from kserve.errors import InvalidInput
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from prometheus_client import REGISTRY

from serving import client_errors
from serving.errors import ServerOverloaded
from serving.grpc_infer import RequestRefused, TaggerServicer, _refusal
from serving.predictor import BatchingOptions, TopTagger
from tests.predictor import on_device
from toptagger.constants import MODEL_NAME
from toptagger.images import three_channels
from toptagger.jets.dataset import JetBatch

# A one-request queue: a second request sent while the first waits is refused (RESOURCE_EXHAUSTED).
BATCHING = BatchingOptions(max_batch_size=8, max_latency_ms=5.0, max_queue=1)


class RecordingContext:
    """A stand-in for grpc.aio's ServicerContext: records the status (set, or aborted with)."""

    def __init__(self, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self.metadata = metadata
        self.code: grpc.StatusCode | None = None
        self.details: str | None = None

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.metadata

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        self.code, self.details = code, details
        raise grpc.aio.AbortError()


@pytest.fixture(scope="module")
def tagger(model_dir: Path, one_torch_thread: None) -> Iterator[TopTagger]:
    model = TopTagger(str(model_dir), backend="torch", batching=BATCHING)
    assert model.load(), model.not_ready_reason
    assert on_device(model, torch.get_num_threads) == 1
    yield model
    model.stop()


@pytest.fixture(scope="module")
def servicer(tagger: TopTagger) -> TaggerServicer:
    # ModelInfer never touches KServe's data plane or model repository (the other RPCs do).
    return TaggerServicer(None, None, tagger)


@pytest.fixture(scope="module")
def four_jets(small_jets: JetBatch) -> np.ndarray:
    """Two top and two QCD jets, picked with a seeded generator: float32 [4, 200, 4] (the shared ``jets`` has 6)."""
    rng = np.random.default_rng(99)
    top = rng.choice(np.flatnonzero(small_jets.labels == 1), 2, replace=False)
    qcd = rng.choice(np.flatnonzero(small_jets.labels == 0), 2, replace=False)
    return np.ascontiguousarray(small_jets.constituents[np.concatenate([top, qcd])])


@pytest.fixture(scope="module")
def images(tagger: TopTagger, four_jets: np.ndarray) -> np.ndarray:
    """The four jets as the CMSSW producer sends them: rendered, three copies, float32 [4, 3, 32, 32]."""
    assert tagger.backend is not None
    return np.ascontiguousarray(three_channels(on_device(tagger, tagger.backend.render, four_jets)))


def infer_request(
    name: str, array: np.ndarray, typed: bool = False, model_name: str = MODEL_NAME, **fields: str
) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model_name, **fields)
    tensor = request.inputs.add(name=name, datatype="FP32", shape=list(array.shape))
    if typed:
        tensor.contents.fp32_contents.extend(array.ravel().tolist())
    else:
        request.raw_input_contents.append(array.tobytes())
    return request


def refusal_of(servicer: TaggerServicer, request: pb.ModelInferRequest) -> RequestRefused:
    """What ``_infer`` refuses ``request`` with, as ``ModelInfer`` would map it."""
    with pytest.raises(Exception) as caught:
        asyncio.run(servicer._infer(request))
    return _refusal(caught.value)


def model_infer(
    servicer: TaggerServicer, request: pb.ModelInferRequest, context: RecordingContext
) -> pb.ModelInferResponse:
    return asyncio.run(servicer.ModelInfer(request, context))  # type: ignore[arg-type]


def refused_by(
    servicer: TaggerServicer, request: pb.ModelInferRequest, metadata: tuple[tuple[str, str], ...] = ()
) -> RecordingContext:
    """Run ``ModelInfer``, which must refuse (a status set, no exception: see the module docstring;
    UNAVAILABLE alone is an abort, the trailers-only answer Envoy retries on another replica);
    return the context holding the status it sent."""
    recording = RecordingContext(metadata)
    try:
        response = model_infer(servicer, request, recording)
    except grpc.aio.AbortError:
        assert recording.code == grpc.StatusCode.UNAVAILABLE, f"only UNAVAILABLE aborts, got {recording.code}"
        return recording
    assert recording.code not in (None, grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE)
    assert not response.outputs, "a refusal carries no outputs"
    return recording


def refusals_counted(code: grpc.StatusCode) -> float:
    return REGISTRY.get_sample_value("toptagger_requests_total", {"protocol": "grpc", "status": code.name}) or 0.0


def probabilities_of(response: pb.ModelInferResponse) -> np.ndarray:
    [output] = response.outputs
    assert (output.name, output.datatype) == ("probabilities", "FP32")
    [raw] = response.raw_output_contents
    return np.frombuffer(raw, dtype=np.float32).reshape(list(output.shape))


# --- _refusal: exceptions -> status codes ----------------------------------------------------------


def test_invalid_input_is_invalid_argument_with_its_message() -> None:
    refused = _refusal(InvalidInput("input 'images' contains NaN or Inf"))
    assert (refused.code, refused.message) == (grpc.StatusCode.INVALID_ARGUMENT, "input 'images' contains NaN or Inf")


def test_server_overloaded_is_resource_exhausted_with_its_reason() -> None:
    refused = _refusal(ServerOverloaded("the inference queue is full (1 requests waiting); retry later"))
    assert refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused.message == "the inference queue is full (1 requests waiting); retry later"


def test_a_request_refused_keeps_its_code_and_message() -> None:
    original = RequestRefused(grpc.StatusCode.NOT_FOUND, "unknown model 'x'")
    assert _refusal(original) is original


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (RuntimeError("CUDA out of memory"), "inference failed (RuntimeError: CUDA out of memory)"),
        (IndexError("index out of range in self"), "inference failed (IndexError: index out of range in self)"),
        (ValueError("bad"), "inference failed (ValueError: bad)"),  # a ValueError that is not InvalidInput
    ],
)
def test_anything_else_is_internal_naming_the_exception(error: Exception, message: str) -> None:
    refused = _refusal(error)
    assert (refused.code, refused.message) == (grpc.StatusCode.INTERNAL, message)


# --- _infer and ModelInfer: refusals ---------------------------------------------------------------


def test_an_unknown_model_name_is_not_found(servicer: TaggerServicer, images: np.ndarray) -> None:
    refused = refusal_of(servicer, infer_request("images", images[:1], model_name="bottom-tagger"))
    assert refused.code == grpc.StatusCode.NOT_FOUND
    assert refused.message == "unknown model 'bottom-tagger'; serving 'top-tagger'"

    counted = refusals_counted(grpc.StatusCode.NOT_FOUND)
    context = refused_by(servicer, infer_request("images", images[:1], model_name="bottom-tagger"))
    assert (context.code, context.details) == (refused.code, refused.message)
    assert refusals_counted(grpc.StatusCode.NOT_FOUND) == counted + 1


@pytest.mark.parametrize("version", ["2", "0", "latest", "1.0", " 1"])
def test_a_version_other_than_empty_or_1_is_not_found(
    servicer: TaggerServicer, images: np.ndarray, version: str
) -> None:
    context = refused_by(servicer, infer_request("images", images[:1], model_version=version))
    assert context.code == grpc.StatusCode.NOT_FOUND
    assert context.details == f"unknown version '{version}' of 'top-tagger'; serving '1'"


def test_a_model_that_failed_to_load_is_unavailable_with_the_reason(tmp_path: Path, images: np.ndarray) -> None:
    missing = str(tmp_path / "no-such-model")
    model = TopTagger(missing, backend="torch")
    assert not model.load()
    context = refused_by(TaggerServicer(None, None, model), infer_request("images", images[:1]))
    assert context.code == grpc.StatusCode.UNAVAILABLE
    assert context.details is not None
    assert context.details.startswith("model 'top-tagger' is not ready: cannot load model")
    assert missing in context.details


def test_a_model_not_loaded_yet_is_unavailable(images: np.ndarray) -> None:
    context = refused_by(TaggerServicer(None, None, TopTagger("/nowhere")), infer_request("images", images[:1]))
    assert (context.code, context.details) == (
        grpc.StatusCode.UNAVAILABLE,
        "model 'top-tagger' is not ready: not loaded yet",
    )


def test_an_unknown_requested_output_is_invalid_argument(servicer: TaggerServicer, images: np.ndarray) -> None:
    request = infer_request("images", images[:1])
    request.outputs.add(name="logits")
    context = refused_by(servicer, request)
    assert context.code == grpc.StatusCode.INVALID_ARGUMENT
    assert context.details == "unknown output 'logits'; the model returns 'probabilities'"


def test_what_the_contract_refuses_is_invalid_argument_with_its_message(
    servicer: TaggerServicer, images: np.ndarray
) -> None:
    bad = images[:2].copy()
    bad[1, 0, 5, 7] = np.nan
    context = refused_by(servicer, infer_request("images", bad))
    assert (context.code, context.details) == (grpc.StatusCode.INVALID_ARGUMENT, "input 'images' contains NaN or Inf")

    request = infer_request("images", images[:2])
    request.raw_input_contents[0] = request.raw_input_contents[0][:-4]  # one float short
    context = refused_by(servicer, request)
    assert context.code == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        context.details
        == f"input 'images': {images[:2].nbytes - 4} bytes of data, but FP32 [2, 3, 32, 32] needs {images[:2].nbytes}"
    )


def test_a_request_sent_while_the_queue_is_full_is_resource_exhausted(
    servicer: TaggerServicer, images: np.ndarray
) -> None:
    first, second = RecordingContext(), RecordingContext()

    async def two_at_once() -> list[pb.ModelInferResponse | BaseException]:
        # The first request waits in the one-request queue when the second arrives: nothing
        # awaits between the two submissions, so the order is fixed, not a race.
        return await asyncio.gather(
            servicer.ModelInfer(infer_request("images", images[:1], id="first"), first),  # type: ignore[arg-type]
            servicer.ModelInfer(infer_request("images", images[:1], id="second"), second),  # type: ignore[arg-type]
            return_exceptions=True,
        )

    answered, refused = asyncio.run(two_at_once())
    assert isinstance(answered, pb.ModelInferResponse) and answered.id == "first"
    assert first.code is None
    assert isinstance(refused, pb.ModelInferResponse) and not refused.outputs
    assert second.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert second.details == "the inference queue is full (1 requests waiting); retry later"


def test_a_refusal_is_logged_with_the_request_id_once_a_minute(
    servicer: TaggerServicer, images: np.ndarray, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client's mistake is logged at INFO, without a traceback, once per kind a minute (serving.client_errors)."""
    monkeypatch.setattr(client_errors, "CLIENT_ERRORS", client_errors.ClientErrorLog())
    caplog.set_level(logging.INFO, logger="serving")
    refused_by(servicer, infer_request("images", images[:1], model_version="7", id="from-request"))
    refused_by(servicer, infer_request("images", images[:1], model_version="8"), metadata=(("x-request-id", "hdr-3"),))
    refused_by(servicer, infer_request("images", images[:1], model_name="nope"), metadata=(("x-request-id", "hdr-4"),))
    records = [r for r in caplog.records if r.name.startswith("serving")]
    entries = [json.loads(r.getMessage()) for r in records]
    assert [(e["request_id"], e["status"], e["protocol"]) for e in entries] == [
        ("from-request", "NOT_FOUND", "grpc"),  # the same kind of mistake with version 8 is held back
        ("hdr-4", "NOT_FOUND", "grpc"),
    ]
    assert entries[0]["client_error"] == "unknown version '7' of 'top-tagger'; serving '1'"
    assert all(r.levelno == logging.INFO and not r.exc_info for r in records)


# --- ModelInfer: good requests -------------------------------------------------------------------


@pytest.mark.parametrize("version", ["", "1"])
@pytest.mark.parametrize("typed", [False, True], ids=["raw", "fp32_contents"])
def test_good_images_are_answered_with_the_backends_probabilities(
    servicer: TaggerServicer, tagger: TopTagger, images: np.ndarray, version: str, typed: bool
) -> None:
    request = infer_request("images", images, typed=typed, model_version=version, id="req-9")
    request.outputs.add(name="probabilities")  # asking for the one output by name is fine
    context = RecordingContext()
    response = model_infer(servicer, request, context)
    assert context.code is None
    assert (response.model_name, response.model_version, response.id) == ("top-tagger", "1", "req-9")
    probabilities = probabilities_of(response)
    assert probabilities.shape == (len(images), 2)
    assert tagger.backend is not None
    # One request is one batch: the batcher runs backend.predict on these very values (raw bytes
    # and fp32_contents both carry float32 exactly), on the same thread with the same thread
    # count, so the answer is the same to the bit.
    np.testing.assert_array_equal(probabilities, on_device(tagger, tagger.backend.predict, images))


def test_good_constituents_are_answered_with_the_backends_probabilities(
    servicer: TaggerServicer, tagger: TopTagger, four_jets: np.ndarray
) -> None:
    response = model_infer(servicer, infer_request("constituents", four_jets), RecordingContext())
    backend = tagger.backend
    assert backend is not None
    expected = on_device(tagger, lambda: backend.predict(backend.render(four_jets)))
    np.testing.assert_array_equal(probabilities_of(response), expected)
    # float32 softmax of 2 classes: each row sums to 1 within a few ulp
    np.testing.assert_allclose(probabilities_of(response).sum(axis=1), 1.0, rtol=0, atol=1e-6)
