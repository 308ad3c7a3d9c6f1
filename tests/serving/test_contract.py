"""serving.contract: what ``Contract.parse`` (KServe's decoded REST request) and ``Contract.parse_grpc``
(the protobuf ``ModelInferRequest`` as it came off the wire) accept, and every refusal.

Each refusal must be a :class:`kserve.errors.InvalidInput` (HTTP 400 / INVALID_ARGUMENT) whose
message names the problem. Requests are built in-process with KServe's own types, in the four
encodings a client can use: REST with JSON data, REST with binary data, gRPC with
``raw_input_contents`` and gRPC with typed ``fp32_contents``.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from kserve.errors import InvalidInput
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.infer_type import InferInput, InferRequest

from serving.contract import Contract
from toptagger.constants import MODEL_NAME

SIZE = 32
MAX_BATCH = 4
CONTRACT = Contract(channels=3, image_size=SIZE, max_batch_size=MAX_BATCH)
TRANSPORTS = ("rest-json", "rest-binary", "grpc-raw", "grpc-typed")


def images(n: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    """Non-negative float32 pixel values, as jet images hold."""
    return np.random.default_rng(seed).random((n, channels, SIZE, SIZE), dtype=np.float32)


def constituents(n: int, seed: int = 1) -> np.ndarray:
    """Physical jets: random momenta, E >= |p| (massive), the last 50 rows zero padding."""
    rng = np.random.default_rng(seed)
    momenta = rng.normal(size=(n, 200, 3))
    energy = np.linalg.norm(momenta, axis=-1) * rng.uniform(1.0, 1.5, size=(n, 200))
    jets = np.concatenate([energy[..., None], momenta], axis=-1).astype(np.float32)
    jets[:, 150:] = 0
    return jets


def rest_request(
    name: str, array: np.ndarray, binary: bool, datatype: str = "FP32", shape: list[int] | None = None
) -> InferRequest:
    """A v2 request as KServe decodes it: JSON ``data``, or the binary tensor extension's raw bytes."""
    shape = list(array.shape) if shape is None else shape
    if binary:
        tensor = InferInput(name, shape, datatype)
        return InferRequest(MODEL_NAME, [tensor], request_id="r-1", raw_inputs=[array.tobytes()])
    tensor = InferInput(name, shape, datatype, data=array.ravel().tolist())
    return InferRequest(MODEL_NAME, [tensor], request_id="r-1")


def grpc_request(
    name: str, array: np.ndarray, typed: bool, datatype: str = "FP32", shape: list[int] | None = None
) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=MODEL_NAME, id="r-1")
    tensor = request.inputs.add(name=name, datatype=datatype, shape=list(array.shape) if shape is None else shape)
    if typed:
        tensor.contents.fp32_contents.extend(array.ravel().tolist())
    else:
        request.raw_input_contents.append(array.tobytes())
    return request


def parse(
    transport: str,
    name: str,
    array: np.ndarray,
    datatype: str = "FP32",
    shape: list[int] | None = None,
    contract: Contract = CONTRACT,
) -> tuple[str, np.ndarray]:
    """Encode ``array`` as ``transport`` would carry it and run the contract's check for that path."""
    if transport.startswith("rest"):
        return contract.parse(rest_request(name, array, transport == "rest-binary", datatype, shape))
    return contract.parse_grpc(grpc_request(name, array, transport == "grpc-typed", datatype, shape))


def refused(message: str) -> pytest.RaisesExc:
    return pytest.raises(InvalidInput, match=re.escape(message))


# --- accepted requests ---------------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize(
    ("name", "array"),
    [
        ("images", images(2)),
        ("images", images(MAX_BATCH)),  # the largest batch allowed
        ("images", images(1, channels=1)),  # one channel: the network expands it itself
        ("constituents", constituents(3)),
    ],
    ids=["images", "images-max-batch", "images-1-channel", "constituents"],
)
def test_valid_requests_come_back_as_the_same_float32_array(transport: str, name: str, array: np.ndarray) -> None:
    parsed_name, parsed = parse(transport, name, array)
    assert parsed_name == name
    assert parsed.dtype == np.float32
    # JSON carries float32 values as exact doubles and the binary paths carry the bytes: no rounding.
    np.testing.assert_array_equal(parsed, array)


def test_the_contract_publishes_the_signature_of_the_model() -> None:
    assert [(s.name, s.dims) for s in CONTRACT.inputs] == [("images", (3, SIZE, SIZE)), ("constituents", (200, 4))]
    assert [(s.name, s.dims) for s in CONTRACT.outputs] == [("probabilities", (2,))]


# --- refusals of the header (name, datatype, shape, batch size) ----------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_an_unknown_input_name_is_refused_naming_it(transport: str) -> None:
    with refused("unknown input 'pixels'; expected 'images' or 'constituents'"):
        parse(transport, "pixels", images(1))


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("datatype", ["FP64", "FP16", "INT32", "BYTES"])
def test_a_datatype_other_than_fp32_is_refused(transport: str, datatype: str) -> None:
    with refused(f"input 'images' must be FP32, got {datatype}"):
        parse(transport, "images", images(1), datatype=datatype)


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize(
    ("name", "shape", "expected"),
    [
        ("images", [2, 3, 16, 16], [-1, 3, SIZE, SIZE]),  # another image size
        ("images", [2, 3, SIZE, 16], [-1, 3, SIZE, SIZE]),  # not square
        ("images", [2, 2, SIZE, SIZE], [-1, 3, SIZE, SIZE]),  # 2 channels: neither 1 nor the model's 3
        ("images", [2, 4, SIZE, SIZE], [-1, 3, SIZE, SIZE]),
        ("images", [6, SIZE, SIZE], [-1, 3, SIZE, SIZE]),  # no channel axis
        ("images", [2, 3, SIZE, SIZE, 1], [-1, 3, SIZE, SIZE]),
        ("constituents", [2, 100, 4], [-1, 200, 4]),
        ("constituents", [2, 200, 3], [-1, 200, 4]),
        ("constituents", [2, 200, 1], [-1, 200, 4]),  # the 1-channel allowance is for images only
        ("constituents", [400, 4], [-1, 200, 4]),
    ],
)
def test_a_wrong_shape_is_refused_with_the_expected_one(
    transport: str, name: str, shape: list[int], expected: list[int]
) -> None:
    array = np.zeros(shape, np.float32)  # data consistent with the (wrong) shape
    with refused(f"input '{name}' must have shape {expected} (-1 = batch), got {shape}"):
        parse(transport, name, array)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_one_channel_model_takes_one_channel_and_refuses_three(transport: str) -> None:
    """A model of 1-channel images takes [N, 1, S, S] only: three channels are not its input."""
    single = Contract(channels=1, image_size=SIZE, max_batch_size=MAX_BATCH)
    assert parse(transport, "images", images(2, channels=1), contract=single)[1].shape == (2, 1, SIZE, SIZE)
    with refused(f"input 'images' must have shape [-1, 1, {SIZE}, {SIZE}] (-1 = batch), got [2, 3, {SIZE}, {SIZE}]"):
        parse(transport, "images", images(2), contract=single)


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("name", ["images", "constituents"])
def test_an_empty_batch_is_refused(transport: str, name: str) -> None:
    array = images(0) if name == "images" else constituents(0)
    with refused(f"input '{name}' has an empty batch"):
        parse(transport, name, array)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_batch_above_max_batch_size_is_refused(transport: str) -> None:
    with refused(f"batch of {MAX_BATCH + 1} exceeds the maximum batch size {MAX_BATCH}"):
        parse(transport, "images", images(MAX_BATCH + 1))


# --- refusals of the data ------------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("sent_rows", [1, 3], ids=["too-little", "too-much"])
def test_data_that_does_not_fill_the_declared_shape_is_refused(transport: str, sent_rows: int) -> None:
    shape = [2, 3, SIZE, SIZE]
    data = images(sent_rows)
    messages = {
        "rest-json": f"input 'images': data does not match shape {shape}",
        "rest-binary": f"input 'images': data does not match shape {shape}",
        "grpc-raw": f"input 'images': {data.nbytes} bytes of data, but FP32 {shape} needs {4 * 2 * 3 * SIZE * SIZE}",
        "grpc-typed": f"input 'images': {data.size} fp32_contents values, but {shape} needs {2 * 3 * SIZE * SIZE}",
    }
    with refused(messages[transport]):
        parse(transport, "images", data, shape=shape)


@pytest.mark.parametrize("transport", ["rest-binary", "grpc-raw"])
def test_a_byte_count_that_is_not_whole_float32_values_is_refused(transport: str) -> None:
    """Two bytes short of the declared shape: not even a whole number of float32 values."""
    raw = images(1).tobytes()[:-2]
    if transport == "rest-binary":
        request = InferRequest(
            MODEL_NAME, [InferInput("images", [1, 3, SIZE, SIZE], "FP32")], request_id="r-1", raw_inputs=[raw]
        )
        with refused("input 'images': data does not match shape [1, 3, 32, 32]"):
            CONTRACT.parse(request)
    else:
        message = pb.ModelInferRequest(model_name=MODEL_NAME, raw_input_contents=[raw])
        message.inputs.add(name="images", datatype="FP32", shape=[1, 3, SIZE, SIZE])
        with refused(f"input 'images': {len(raw)} bytes of data, but FP32 [1, 3, 32, 32] needs {len(raw) + 2}"):
            CONTRACT.parse_grpc(message)


def test_grpc_data_sent_both_raw_and_typed_is_refused() -> None:
    array = images(1)
    request = grpc_request("images", array, typed=True)
    request.raw_input_contents.append(array.tobytes())
    with refused("send the data of input 'images' once: one raw_input_contents entry, and no contents"):
        CONTRACT.parse_grpc(request)


def test_grpc_data_in_two_raw_entries_for_one_input_is_refused() -> None:
    array = images(1)
    request = grpc_request("images", array, typed=False)
    request.raw_input_contents.append(array.tobytes())
    with refused("send the data of input 'images' once"):
        CONTRACT.parse_grpc(request)


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", ["images", "constituents"])
def test_nan_or_inf_anywhere_is_refused(transport: str, bad: float, name: str) -> None:
    array = images(2) if name == "images" else constituents(2)
    flat = array.reshape(-1)
    flat[np.random.default_rng(7).integers(flat.size)] = bad  # one value, at a seeded position
    with refused(f"input '{name}' contains NaN or Inf"):
        parse(transport, name, array)


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("value", [2e15, -3e18], ids=["2e15", "-3e18"])
def test_constituents_whose_squares_overflow_float32_are_refused_per_request(transport: str, value: float) -> None:
    """Finite, but squared in pT and the moments they overflow: refused here, before the batch is rendered."""
    array = constituents(2)
    array[1, 0, 1] = value
    with refused("input 'constituents' holds momenta beyond 1e+15 GeV"):
        parse(transport, "constituents", array)
    array[1, 0, :2] = 1e15  # the limit itself is accepted (E = |p|: a physical constituent)
    assert parse(transport, "constituents", array)[0] == "constituents"


# --- the number of inputs ------------------------------------------------------------------------


def test_rest_requests_with_other_than_one_input_are_refused() -> None:
    both = [
        InferInput("images", [1, 3, SIZE, SIZE], "FP32", data=images(1).ravel().tolist()),
        InferInput("constituents", [1, 200, 4], "FP32", data=constituents(1).ravel().tolist()),
    ]
    with refused("send exactly one input, 'images' or 'constituents'; got 2: ['images', 'constituents']"):
        CONTRACT.parse(InferRequest(MODEL_NAME, both))
    with refused("send exactly one input, 'images' or 'constituents'; got 0: []"):
        CONTRACT.parse(InferRequest(MODEL_NAME, []))


def test_grpc_requests_with_other_than_one_input_are_refused() -> None:
    request = grpc_request("images", images(1), typed=False)
    request.inputs.add(name="constituents", datatype="FP32", shape=[1, 200, 4])
    request.raw_input_contents.append(constituents(1).tobytes())
    with refused("send exactly one input, 'images' or 'constituents'; got 2: ['images', 'constituents']"):
        CONTRACT.parse_grpc(request)
    with refused("send exactly one input, 'images' or 'constituents'; got 0: []"):
        CONTRACT.parse_grpc(pb.ModelInferRequest(model_name=MODEL_NAME))
