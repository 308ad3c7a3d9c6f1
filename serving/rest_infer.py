"""REST ``/infer`` without decoding big tensors on the event loop that serves both protocols.

KServe 0.21's REST ``infer`` lets FastAPI parse a JSON body into pydantic models on the event
loop, and decodes a binary-extension body (``Inference-Header-Content-Length``) with
``InferRequest.from_bytes``, which turns every tensor into Python lists
(``set_data_from_numpy(as_numpy(), binary_data=False)``), also on the loop. One 60 MB request
stalled every gRPC call for seconds. This route answers the same paths first (it is added before
KServe's) and:

- binary bodies: parses only the JSON header (small) on the loop, asks
  :class:`~serving.limits.Admission` with the declared rows *before* touching the tensor bytes,
  then views the bytes with ``numpy.frombuffer`` (no copy, no lists);
- JSON bodies: parses them with orjson into plain lists, without pydantic;
- any payload of :data:`~serving.limits.OFFLOOP_BYTES` or more is decoded and checked by the
  :class:`~serving.contract.Contract` in the decode pool (:func:`~serving.limits.off_loop`).

The answer is encoded by KServe's data plane as before (JSON, or binary outputs when asked for).
The body-size cap is :class:`serving.server.RestGuard`'s, checked before the body is read.
"""

from __future__ import annotations

import uuid
from functools import partial
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from kserve.errors import InvalidInput, ModelNotReady
from kserve.protocol.infer_type import InferInput, InferOutput, InferRequest, InferResponse, RequestedOutput

from serving.limits import declared_size, off_loop
from toptagger.constants import MODEL_VERSION
from toptagger.signature import DATATYPE, PROBABILITIES

if TYPE_CHECKING:
    import numpy as np

    from serving.contract import Contract
    from serving.predictor import TopTagger

INFERENCE_HEADER = "inference-header-content-length"
INFER_PATHS = ("/v2/models/{model_name}/infer", "/v2/models/{model_name}/versions/{model_version}/infer")


def install_infer_routes(app: FastAPI, model: TopTagger, dataplane: Any) -> None:
    """Our ``/infer`` routes, to be added before KServe's (Starlette takes the first match)."""

    async def infer(request: Request, model_name: str, model_version: str = "") -> Response:
        if model_name != model.name:
            return JSONResponse({"error": f"unknown model '{model_name}'; this server serves '{model.name}'"}, 404)
        if model_version not in ("", MODEL_VERSION):
            message = f"unknown version '{model_version}' of '{model.name}'; serving '{MODEL_VERSION}'"
            return JSONResponse({"error": message}, 404)
        if not await dataplane.model_ready(model.name, True):  # KServe's: retries a failed load
            raise ModelNotReady(model.name, model.not_ready_reason)
        contract = model.contract
        if contract is None:
            raise ModelNotReady(model.name, model.not_ready_reason)
        headers = {k.lower(): v for k, v in request.headers.items()}
        json_length = headers.get(INFERENCE_HEADER)
        if json_length is not None:
            # The JSON header first: a request refused by its header is answered before the
            # tensor bytes are read, and the server (uvicorn) discards the rest of the upload
            # without handing it to us, so a client looping big wrong bodies costs little.
            reader = _BodyReader(request, _content_length(headers))
            header_length = _header_length(json_length, reader.expected)
            if await reader.read_to(header_length) < header_length:
                raise InvalidInput(f"'{INFERENCE_HEADER}' is {header_length}, but the body is shorter")
            header = await off_loop(header_length, _loads, reader.head(header_length))
            rows, nbytes = declared_size(_shapes(header))
            _check_header_only(header, contract)
            if 1 <= rows <= contract.max_batch_size:
                model.admission.check(rows)
            body = await reader.read_all()
            decode = partial(_decode_binary, header, body, header_length, contract, model.name)
        else:
            body = await request.body()  # RestGuard refused a declared size over the cap already
            rows, nbytes = 0, len(body)  # a JSON body tells its shape only once parsed
            decode = partial(_decode_json, body, contract, model.name)
        if 1 <= rows <= contract.max_batch_size:  # refused (or counted in) before the tensor is read
            with model.admission.admit(rows):
                infer_request, name, array = await off_loop(nbytes, decode)
                probabilities = await model.classify(name, array, admitted=True)
        else:
            infer_request, name, array = await off_loop(max(nbytes, len(body)), decode)
            probabilities = await model.classify(name, array)
        return _respond(model, dataplane, infer_request, probabilities, headers)

    for path in INFER_PATHS:
        app.add_api_route(path, infer, methods=["POST"], include_in_schema=path == INFER_PATHS[0])


class _BodyReader:
    """A request body read into one buffer of the declared size, as far as asked.

    One preallocated buffer rather than Starlette's list of chunks and a join: one copy of each
    byte, and no second body-sized allocation.
    """

    def __init__(self, request: Request, expected: int | None) -> None:
        self.expected = expected  # None: chunked transfer encoding, size known at the end
        self._chunks = request.stream()
        self._buffer = bytearray(expected or 0)
        self._filled = 0
        self._done = False

    async def read_to(self, nbytes: int) -> int:
        """Read until ``nbytes`` are in or the body ends; return how many are in."""
        while self._filled < nbytes and not self._done:
            chunk = await anext(self._chunks, None)
            if chunk is None:
                self._done = True
                break
            end = self._filled + len(chunk)
            if end > len(self._buffer):  # a body longer than declared, or chunked: grow
                self._buffer.extend(bytes(end - len(self._buffer)))
            self._buffer[self._filled : end] = chunk
            self._filled = end
        return self._filled

    def head(self, nbytes: int) -> bytes:
        return bytes(self._buffer[:nbytes])  # a copy: a view would pin the buffer's size

    async def read_all(self) -> bytearray:
        await self.read_to(1 << 62)
        if self._filled != len(self._buffer):
            del self._buffer[self._filled :]  # a body shorter than declared
        return self._buffer


def _content_length(headers: dict[str, str]) -> int | None:
    value = headers.get("content-length")
    return int(value) if value is not None and value.isdigit() else None


def _check_header_only(header: dict, contract: Contract) -> None:
    """Refuse from the JSON header what the contract would refuse after reading the tensor.

    Only a well-formed single input is checked here; anything else is refused, with the field
    named, by the full decode (:func:`_decode`), once the body is in.
    """
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        return
    name, datatype, shape = (inputs[0].get(key) for key in ("name", "datatype", "shape"))
    well_formed = isinstance(name, str) and isinstance(datatype, str) and isinstance(shape, list)
    if well_formed and all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        contract.check_header(name, datatype, shape)


def _header_length(value: str, body_length: int | None) -> int:
    try:
        length = int(value)
    except ValueError:
        raise InvalidInput(f"'{INFERENCE_HEADER}' must be an integer, got {value!r}") from None
    if length <= 0 or (body_length is not None and length > body_length):
        raise InvalidInput(f"'{INFERENCE_HEADER}' is {length}, but the body has {body_length} bytes")
    return length


def _loads(data: bytes | memoryview) -> dict:
    try:
        parsed = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"Unrecognized request format: {exc}") from None
    if not isinstance(parsed, dict):
        raise InvalidInput("the request must be a JSON object with 'inputs'")
    return parsed


def _shapes(header: dict) -> list[Any]:
    inputs = header.get("inputs")
    if not isinstance(inputs, list):
        return []
    return [i.get("shape") if isinstance(i, dict) and isinstance(i.get("shape"), list) else [] for i in inputs]


def _decode_binary(
    header: dict, body: bytes | bytearray, header_length: int, contract: Contract, model_name: str
) -> tuple[InferRequest, str, np.ndarray]:
    """The binary tensor extension: each input's bytes follow the JSON header, viewed, not copied."""
    view = memoryview(body)
    offset = header_length

    def raw(spec: dict, infer_input: InferInput) -> None:
        nonlocal offset
        size = (spec.get("parameters") or {}).get("binary_data_size")
        if not isinstance(size, int) or size < 0 or offset + size > len(body):
            raise InvalidInput(f"input '{infer_input.name}': binary_data_size {size!r} does not fit the body")
        infer_input._raw_data = view[offset : offset + size]
        offset += size

    return _decode(header, contract, model_name, raw)


def _decode_json(body: bytes, contract: Contract, model_name: str) -> tuple[InferRequest, str, np.ndarray]:
    return _decode(_loads(body), contract, model_name, None)


def _decode(request: dict, contract: Contract, model_name: str, raw: Any) -> tuple[InferRequest, str, np.ndarray]:
    """A parsed v2 request -> KServe's ``InferRequest`` and the contract's checked array.

    The structure is checked here (what KServe's pydantic models checked), so that a body of the
    wrong form is a 400 saying where, never a 500.
    """
    inputs = []
    for i, spec in enumerate(_field(request, "inputs", list, "the request")):
        where = f"inputs[{i}]"
        if not isinstance(spec, dict):
            raise InvalidInput(f"malformed request: {where} must be an object")
        shape = _field(spec, "shape", list, where)
        if not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise InvalidInput(f"malformed request: {where}.shape must be a list of integers")
        infer_input = InferInput(
            name=_field(spec, "name", str, where),
            shape=shape,
            datatype=_field(spec, "datatype", str, where),
            parameters=_field(spec, "parameters", dict, where, optional=True),
        )
        data = _field(spec, "data", list, where, optional=True)
        if data is not None:
            infer_input._data = data
        elif raw is not None:
            raw(spec, infer_input)
        else:
            raise InvalidInput(f"'data' field is missing for input '{infer_input.name}'")
        inputs.append(infer_input)
    requested = []
    for i, output in enumerate(_field(request, "outputs", list, "the request", optional=True) or ()):
        if not isinstance(output, dict):
            raise InvalidInput(f"malformed request: outputs[{i}] must be an object")
        name = _field(output, "name", str, f"outputs[{i}]")
        if name != PROBABILITIES:
            raise InvalidInput(f"unknown output '{name}'; the model returns '{PROBABILITIES}'")
        requested.append(RequestedOutput(name, _field(output, "parameters", dict, f"outputs[{i}]", optional=True)))
    infer_request = InferRequest(
        model_name=model_name,
        infer_inputs=inputs,
        request_id=_field(request, "id", str, "the request", optional=True),
        parameters=_field(request, "parameters", dict, "the request", optional=True),
        request_outputs=requested or None,
    )
    try:
        name, array = contract.parse(infer_request)
    except InvalidInput:
        raise
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
        raise InvalidInput(f"malformed request: {exc}") from None
    return infer_request, name, array


def _field(container: dict, key: str, kind: type, where: str, optional: bool = False) -> Any:
    value = container.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, kind):
        what = {list: "a list", dict: "an object", str: "a string"}[kind]
        missing = "is missing" if value is None else f"must be {what}"
        raise InvalidInput(f"malformed request: '{key}' of {where} {missing}" + (f" ({what})" if value is None else ""))
    return value


def _respond(
    model: TopTagger, dataplane: Any, request: InferRequest, probabilities: np.ndarray, headers: dict[str, str]
) -> Response:
    output = InferOutput(PROBABILITIES, list(probabilities.shape), DATATYPE)
    output.set_data_from_numpy(probabilities, binary_data=False)
    response = InferResponse(
        response_id=request.id or headers.get("x-request-id") or str(uuid.uuid4()),
        model_name=model.name,
        infer_outputs=[output],
        use_binary_outputs=request.use_binary_outputs,
        requested_outputs=request.request_outputs,
    )
    body, response_headers = dataplane.encode(
        model_name=model.name, response=response, headers=headers, req_attributes={}
    )
    response_headers.pop("content-length", None)
    response_headers.pop("content-type", None)
    if isinstance(body, bytes):  # binary outputs, as KServe answers them
        return Response(body, headers=response_headers)
    return Response(orjson.dumps(body), headers=response_headers, media_type="application/json")
