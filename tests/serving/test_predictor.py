"""serving.predictor: ``TopTagger`` in-process, with a real saved (random-weight) ResNet-50 tagger.

Covers ``load()`` (success: ready, contract and batchers from the backend; failure: not ready, with
a reason naming the URI and the backend, and no exception), ``classify()`` through the dynamic
batcher for images and for constituents (rendered with the model's own image configuration),
the merging of concurrent requests, a full queue (:class:`serving.errors.ServerOverloaded`),
``predict()`` of a KServe ``InferRequest``, and the lifecycle's threads: one device thread per
object however often ``load()`` runs, none left after ``stop()``, which answers every request.

Reference answers come from the same backend object, run on the predictor's device thread: where
a request is one batch, the code path is the batcher's own, so answers are compared bit for bit.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from kserve.errors import InvalidInput, ModelNotReady
from kserve.protocol.infer_type import InferInput, InferRequest

from serving.contract import Contract
from serving.errors import ServerOverloaded
from serving.predictor import BatchingOptions, TopTagger
from tests.predictor import IMAGE_CONFIG, on_device
from tests.tolerances import resnet_logit_bound, softmax_bound
from toptagger.constants import MODEL_NAME
from toptagger.images import jet_images, three_channels
from toptagger.jets.dataset import JetBatch

# max_queue 4: four requests can wait together (one merged batch of 8 rows), a fifth is refused.
BATCHING = BatchingOptions(max_batch_size=8, max_latency_ms=5.0, max_queue=4)


@pytest.fixture(scope="module")
def tagger(model_dir: Path, one_torch_thread: None) -> Iterator[TopTagger]:
    model = TopTagger(str(model_dir), backend="torch", batching=BATCHING)
    # rounding_bound is a float32 bound for CPU kernels; on CUDA, cuDNN convolutions run in TF32
    # by default (torch.backends.cudnn.allow_tf32) and may use Winograd, which it does not cover.
    # The serving logic under test is the same on every device, so the backend is pinned to the
    # CPU, as TorchBackend picks it on a machine without CUDA.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.cuda, "is_available", lambda: False)
        assert model.load(), model.not_ready_reason
    assert model.backend is not None and model.backend.device.type == "cpu"
    assert on_device(model, torch.get_num_threads) == 1
    yield model
    model.stop()


def reference(model: TopTagger, images: np.ndarray) -> np.ndarray:
    """The backend's own answer for exactly this batch of images."""
    assert model.backend is not None
    return on_device(model, model.backend.predict, images)


def rendered(model: TopTagger, constituents: np.ndarray) -> np.ndarray:
    assert model.backend is not None
    return on_device(model, model.backend.render, constituents)


def rounding_bound(model: TopTagger, images: np.ndarray) -> np.ndarray:
    """How far two float32 forward passes of 1-channel ``images`` may differ, in each probability.

    Two passes that batch the rows differently (or take the tagger's 1-channel view rather than
    three materialised copies) compute the same function with float32 sums in other orders.
    Each pass is within B of the exact logits, B from Higham's bound on every conv, batch-norm,
    pooling and head with the network's own weights and activations, carried to the logits by
    its derivatives (tests.tolerances.resnet_logit_bound); so two passes are within 2B of each
    other, and softmax_bound carries that to the probabilities. The factor 2 is the margin that
    resnet_logit_bound asks of its callers (second-order terms, ReLU inputs within the bound of 0).
    """
    backend = model.backend
    assert backend is not None
    logit_bound = resnet_logit_bound(backend.model, images)
    with torch.inference_mode():
        logits = backend.model(torch.from_numpy(np.ascontiguousarray(images))).numpy()
    return 2 * softmax_bound(logits, 2 * logit_bound)


def assert_within(actual: np.ndarray, expected: np.ndarray, bound: np.ndarray) -> None:
    excess = np.abs(actual.astype(np.float64) - expected) / bound
    assert (excess <= 1).all(), f"differences up to {excess.max():.3g} times the float32 rounding bound"


def assert_probabilities(probabilities: np.ndarray, rows: int) -> None:
    assert probabilities.dtype == np.float32
    assert probabilities.shape == (rows, 2)
    assert ((probabilities >= 0) & (probabilities <= 1)).all()
    # Two float32 softmax outputs, each within a few ulp: their sum is 1 to a few ulp of 1.0.
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=0, atol=1e-6)


# --- load() ----------------------------------------------------------------------------------------


def test_load_makes_the_model_ready_with_the_contract_of_its_backend(tagger: TopTagger) -> None:
    assert tagger.ready
    assert tagger.not_ready_reason is None
    assert tagger.backend is not None and tagger.backend.kind == "torch"
    assert tagger.backend.image_config == IMAGE_CONFIG
    # torch sets no device cap, so the batching option is the maximum batch size
    assert tagger.contract == Contract(channels=3, image_size=32, max_batch_size=BATCHING.max_batch_size)
    assert set(tagger.batchers) == {"images", "constituents"}
    assert all(b.max_batch_size == BATCHING.max_batch_size for b in tagger.batchers.values())
    assert tagger.get_input_types() == [
        {"name": "images", "datatype": "FP32", "shape": [-1, 3, 32, 32]},
        {"name": "constituents", "datatype": "FP32", "shape": [-1, 200, 4]},
    ]
    assert tagger.get_output_types() == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]}]


def test_a_model_not_loaded_yet_says_so() -> None:
    model = TopTagger("/nowhere", backend="torch")
    assert not model.ready
    assert model.not_ready_reason == "not loaded yet"
    assert model.get_input_types() == []


def test_load_of_a_missing_model_leaves_it_not_ready_with_the_reason(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-model")
    model = TopTagger(missing, backend="torch")
    assert model.load() is False  # no exception: the server stays up and answers "not ready"
    assert not model.ready
    assert model.not_ready_reason is not None
    assert missing in model.not_ready_reason
    assert "backend torch" in model.not_ready_reason
    assert model.contract is None and model.batchers == {}
    assert model.get_input_types() == [] and model.get_output_types() == []


def test_load_with_an_unknown_backend_leaves_it_not_ready_naming_the_backend(model_dir: Path) -> None:
    model = TopTagger(str(model_dir), backend="tpu")
    assert model.load() is False
    assert not model.ready
    assert model.not_ready_reason is not None
    assert "unknown backend 'tpu'" in model.not_ready_reason
    assert str(model_dir) in model.not_ready_reason


# --- classify() ----------------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3])
def test_classify_images_returns_what_the_backend_computes(tagger: TopTagger, jets: np.ndarray, channels: int) -> None:
    images = rendered(tagger, jets)
    if channels == 3:  # what the CMSSW producer sends: three copies
        images = np.ascontiguousarray(three_channels(images))
    probabilities = asyncio.run(tagger.classify("images", images))
    assert_probabilities(probabilities, len(jets))
    # One request is one batch: the batcher calls backend.predict on this very array, on the
    # same thread with the same thread count, so the answer is the same to the bit.
    np.testing.assert_array_equal(probabilities, reference(tagger, images))


def test_one_channel_images_are_classified_as_their_three_copies(tagger: TopTagger, jets: np.ndarray) -> None:
    images = rendered(tagger, jets)
    single = asyncio.run(tagger.classify("images", images))
    copies = asyncio.run(tagger.classify("images", np.ascontiguousarray(three_channels(images))))
    # the same numbers through two code paths (the tagger's expand view, ResNet on 3 copies)
    assert_within(single, copies, rounding_bound(tagger, images))


def test_constituents_are_rendered_with_the_models_own_image_configuration(tagger: TopTagger, jets: np.ndarray) -> None:
    probabilities = asyncio.run(tagger.classify("constituents", jets))
    assert_probabilities(probabilities, len(jets))
    backend = tagger.backend
    assert backend is not None
    expected = on_device(tagger, lambda: backend.predict(backend.render(jets)))
    np.testing.assert_array_equal(probabilities, expected)  # the batcher's own code path, same batch
    # ... and that configuration is the saved one, which matters: the default rendering (no
    # centring, rotation, flip or normalisation) gives other images.
    np.testing.assert_array_equal(rendered(tagger, jets), jet_images(jets, **IMAGE_CONFIG.to_dict()))
    assert not np.allclose(rendered(tagger, jets), jet_images(jets, image_size=32))


def test_concurrent_requests_are_merged_and_each_caller_gets_its_own_rows(
    tagger: TopTagger, small_jets: JetBatch
) -> None:
    images = rendered(tagger, np.ascontiguousarray(small_jets.constituents[:8]))
    requests = [images[i : i + 2] for i in range(0, 8, 2)]  # 4 requests x 2 rows = one full batch
    stats = tagger.batchers["images"].stats
    batches_before, rows_before = stats.execution_count, stats.inference_count

    async def together() -> list[np.ndarray]:
        return await asyncio.gather(*(tagger.classify("images", r) for r in requests))

    answers = asyncio.run(together())
    # All four were queued before the worker ran (no await in between), so they form one batch.
    assert stats.execution_count - batches_before == 1
    assert stats.inference_count - rows_before == 8
    merged = reference(tagger, np.concatenate(requests))  # the very batch the batcher ran
    bound = rounding_bound(tagger, images)
    for i, (request, answer) in enumerate(zip(requests, answers, strict=True)):
        rows = slice(2 * i, 2 * i + 2)
        assert_probabilities(answer, 2)
        np.testing.assert_array_equal(answer, merged[rows])
        # against each request run alone: another batch size, so float32 rounding only
        assert_within(answer, reference(tagger, request), bound[rows])


def test_a_full_queue_raises_server_overloaded(tagger: TopTagger, jets: np.ndarray) -> None:
    images = rendered(tagger, jets[:1])
    stats = tagger.batchers["images"].stats
    fails_before = stats.fail_count

    async def one_too_many() -> list[np.ndarray | BaseException]:
        calls = [tagger.classify("images", images) for _ in range(BATCHING.max_queue + 1)]
        return await asyncio.gather(*calls, return_exceptions=True)

    *accepted, refused = asyncio.run(one_too_many())
    assert isinstance(refused, ServerOverloaded), refused
    assert f"the inference queue is full ({BATCHING.max_queue} requests waiting)" in refused.reason
    assert stats.fail_count - fails_before == 1
    # the queued ones are answered as usual, from one batch of their rows
    expected = reference(tagger, np.concatenate([images] * BATCHING.max_queue))
    for i, answer in enumerate(accepted):
        assert isinstance(answer, np.ndarray), answer
        np.testing.assert_array_equal(answer, expected[i : i + 1])


# --- predict() -----------------------------------------------------------------------------------


def json_request(images: np.ndarray, request_id: str | None) -> InferRequest:
    tensor = InferInput("images", list(images.shape), "FP32", data=images.ravel().tolist())
    return InferRequest(MODEL_NAME, [tensor], request_id=request_id)


def test_predict_answers_an_infer_request_with_its_id_and_the_probabilities(
    tagger: TopTagger, jets: np.ndarray
) -> None:
    images = rendered(tagger, jets[:3])
    response = asyncio.run(tagger.predict(json_request(images, "req-42")))
    assert response.id == "req-42"
    assert response.model_name == MODEL_NAME
    [output] = response.outputs
    assert (output.name, output.datatype, output.shape) == ("probabilities", "FP32", [3, 2])
    probabilities = output.as_numpy()
    assert_probabilities(probabilities, 3)
    # JSON carries float32 as exact doubles, so the request's images are these images exactly
    np.testing.assert_array_equal(probabilities, reference(tagger, images))


def test_predict_takes_the_id_from_x_request_id_else_makes_one(tagger: TopTagger, jets: np.ndarray) -> None:
    images = rendered(tagger, jets[:1])
    from_header = asyncio.run(tagger.predict(json_request(images, None), headers={"x-request-id": "hdr-7"}))
    assert from_header.id == "hdr-7"
    made = asyncio.run(tagger.predict(json_request(images, None)))
    assert uuid.UUID(made.id)  # a fresh id, so that the answer and the logs can be matched


def test_predict_refuses_what_the_contract_refuses(tagger: TopTagger) -> None:
    wrong = np.zeros((1, 3, 16, 16), np.float32)
    with pytest.raises(InvalidInput, match=r"input 'images' must have shape \[-1, 3, 32, 32\]"):
        asyncio.run(tagger.predict(json_request(wrong, "bad-1")))
    with pytest.raises(InvalidInput, match="v2"):
        asyncio.run(tagger.predict({"instances": [[0.0]]}))  # type: ignore[arg-type]


# --- lifecycle: threads ------------------------------------------------------------------------


def new_threads(before: set[threading.Thread]) -> list[str]:
    return sorted(t.name for t in set(threading.enumerate()) - before)


def test_one_device_thread_per_object_and_none_left_after_stop(
    model_dir: Path, one_torch_thread: None, jets: np.ndarray
) -> None:
    before = set(threading.enumerate())
    model = TopTagger(str(model_dir), backend="torch", batching=BATCHING)
    assert model.load(), model.not_ready_reason
    [device] = new_threads(before)
    assert device.startswith("device")
    backend, device_thread = model.backend, model.device_thread
    assert model.load()  # loaded already: the same backend on the same thread, nothing new
    assert model.backend is backend and model.device_thread is device_thread
    assert_probabilities(asyncio.run(model.classify("constituents", jets)), len(jets))
    assert new_threads(before) == [device]  # the batchers run on the device thread, no thread of their own
    model.stop()
    assert new_threads(before) == []
    assert not model.ready and model.not_ready_reason is not None and "stopped" in model.not_ready_reason
    model.stop()  # a second stop does nothing


def test_failed_loads_are_retried_on_the_one_device_thread(tmp_path: Path) -> None:
    """KServe's data plane calls load() again on every request to a model that is not ready."""
    before = set(threading.enumerate())
    model = TopTagger(str(tmp_path / "not-yet"), backend="torch")
    for _ in range(3):
        assert model.load() is False
    [device] = new_threads(before)
    assert device.startswith("device")
    model.stop()
    assert new_threads(before) == []


def test_a_stopped_predictor_refuses_inference_and_loading_with_the_reason(
    model_dir: Path, one_torch_thread: None, jets: np.ndarray
) -> None:
    model = TopTagger(str(model_dir), backend="torch", batching=BATCHING)
    with pytest.raises(ModelNotReady, match="not loaded yet"):
        asyncio.run(model.classify("constituents", jets))
    assert model.load(), model.not_ready_reason
    images = rendered(model, jets)
    model.stop()

    async def refused() -> None:
        with pytest.raises(ModelNotReady, match="stopped"):
            await model.classify("constituents", jets)
        with pytest.raises(ModelNotReady, match="stopped"):
            await model.predict(json_request(images, "after-stop"))

    asyncio.run(asyncio.wait_for(refused(), timeout=30))  # an answer, not a hang
    assert model.load() is False and not model.ready  # one life: KServe makes a new object to load again
    assert model.device_thread is not None and model.batchers  # what it had, closed


def test_requests_waiting_when_the_model_stops_get_an_error_not_a_hang(
    model_dir: Path, one_torch_thread: None, jets: np.ndarray
) -> None:
    model = TopTagger(str(model_dir), backend="torch", batching=BATCHING)
    assert model.load(), model.not_ready_reason
    before_stop = 0

    async def stop_while_waiting() -> list[BaseException | np.ndarray]:
        nonlocal before_stop
        waiting = [asyncio.ensure_future(model.classify("constituents", jets[i : i + 1])) for i in range(4)]
        await asyncio.sleep(0)  # queued, none answered yet
        before_stop = sum(b.queue_depth for b in model.batchers.values())
        model.stop()  # on the event loop's thread, as KServe's signal handler runs it
        return await asyncio.gather(*waiting, return_exceptions=True)

    answers = asyncio.run(asyncio.wait_for(stop_while_waiting(), timeout=60))
    assert before_stop >= 1
    assert all(isinstance(a, ModelNotReady) and "stopped" in str(a) for a in answers), answers
