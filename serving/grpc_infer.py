"""gRPC ``ModelInfer`` straight from protobuf to the batcher and back.

KServe's servicer turns each ``ModelInferRequest`` into its generic ``InferRequest``, routes it
through the data plane and the model's ``__call__``, turns the ``InferResponse`` back into
protobuf, and its exception interceptor wraps every call in one more handler. On 2 cores shared
with the model, that per-request Python is taken from the model (docs/benchmarks/serving).
This servicer overrides ``ModelInfer`` only: it reads ``raw_input_contents`` (or typed
``contents``) into numpy, checks it with the same :class:`~serving.contract.Contract` as REST,
goes through the same :meth:`TopTagger.classify` and batcher, and answers with
``raw_output_contents`` (what Triton's clients read first). Every other method stays KServe's.

Errors map to status codes here, in one place: a bad request is INVALID_ARGUMENT with the
contract's message, a full queue RESOURCE_EXHAUSTED, an unknown model NOT_FOUND, a model that is
not ready UNAVAILABLE (with the reason), and so is every request once the server drains
(:mod:`serving.drain`: a proxy retries UNAVAILABLE on another replica); a request accepted before
the drain is counted in it until answered. Each failure is logged as one JSON line with the request
id (the request's ``id``, else the ``x-request-id`` metadata).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
from grpc import aio
from grpc_interceptor.exceptions import GrpcException
from kserve.errors import InvalidInput, ModelNotFound
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor
from kserve.protocol.grpc.servicer import InferenceServicer

from serving import metrics
from serving.client_errors import grpc_client_error, safe_decoding
from serving.control import ModelController, grpc_call
from serving.drain import Draining
from serving.errors import ServerOverloaded
from serving.limits import Limits, declared_size, off_loop
from serving.redact import redact
from toptagger.constants import MODEL_VERSION
from toptagger.signature import DATATYPE, PROBABILITIES

if TYPE_CHECKING:
    from serving.predictor import TopTagger

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
access = logging.getLogger("serving.access")
_LATENCY = metrics.REQUEST_LATENCY.labels("grpc")  # label lookup once, not per request
_OK = metrics.REQUESTS.labels("grpc", grpc.StatusCode.OK.name)


class RequestRefused(Exception):
    """A request answered with a non-OK status and a message for the client."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class TaggerServicer(InferenceServicer):
    """KServe's v2 gRPC servicer with ``ModelInfer`` served by the tagger directly."""

    def __init__(
        self,
        data_plane: Any,
        model_repository_extension: Any,
        model: TopTagger,
        max_request_bytes: int = Limits.max_request_bytes,
    ) -> None:
        super().__init__(data_plane, model_repository_extension)
        self.model = model
        self.max_request_bytes = max_request_bytes
        # Load/unload (serving.control); TaggerGRPCServer sets the server's. Mode NONE until then.
        self.control = ModelController(model)

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: aio.ServicerContext
    ) -> pb.RepositoryModelLoadResponse:
        await grpc_call(self.control, "load", request.model_name, context)
        return pb.RepositoryModelLoadResponse(model_name=request.model_name, isLoaded=True)

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: aio.ServicerContext
    ) -> pb.RepositoryModelUnloadResponse:
        await grpc_call(self.control, "unload", request.model_name, context)
        return pb.RepositoryModelUnloadResponse(model_name=request.model_name, isUnloaded=True)

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        """KServe's answer plus Triton's ``versions`` (KServe leaves it empty) and version check."""
        if request.name == self.model.name and request.version not in ("", MODEL_VERSION):
            message = f"unknown version '{request.version}' of '{self.model.name}'; serving '{MODEL_VERSION}'"
            await context.abort(grpc.StatusCode.NOT_FOUND, message)
        response = await super().ModelMetadata(request, context)
        response.versions.append(MODEL_VERSION)
        return response

    async def ModelReady(self, request: pb.ModelReadyRequest, context: aio.ServicerContext) -> pb.ModelReadyResponse:
        """KServe's answer, with the version checked as ModelMetadata's (KServe ignores it)."""
        if request.name == self.model.name and request.version not in ("", MODEL_VERSION):
            message = f"unknown version '{request.version}' of '{self.model.name}'; serving '{MODEL_VERSION}'"
            await context.abort(grpc.StatusCode.NOT_FOUND, message)
        return await super().ModelReady(request, context)

    async def ModelInfer(self, request: pb.ModelInferRequest, context: aio.ServicerContext) -> pb.ModelInferResponse:
        start = time.perf_counter()
        refused = None
        drain = self.model.drain
        try:
            drain.enter()  # raises Draining once the server stops taking requests
            try:
                response = await self._infer(request)
            finally:
                drain.leave()
        except asyncio.CancelledError:  # the client went away or its deadline passed
            metrics.REQUESTS.labels("grpc", grpc.StatusCode.CANCELLED.name).inc()
            raise
        except Exception as exc:
            refused = _refusal(exc)
            metrics.REQUESTS.labels("grpc", refused.code.name).inc()
            _LATENCY.observe(time.perf_counter() - start)
            _log_refusal(request, context, refused, exc)
        if refused is not None and refused.code == grpc.StatusCode.UNAVAILABLE:
            # Draining or not ready: context.abort(), whose answer is "trailers-only" (the status in
            # the response headers), the only form in which Envoy's `retry_on: unavailable` sees it
            # and retries on another replica; set_code() sends headers first and the status in the
            # trailers. Its cost is the cycle described below, freed at the next cyclic collection
            # rather than at once: acceptable for a drain (once per shutdown) and for a replica that
            # is not ready, which the proxy's health checks take out of rotation within seconds.
            await context.abort(refused.code, redact(refused.message))
        if refused is not None:
            # A status, not context.abort(): grpc keeps the abort's exception in the call's state,
            # and its traceback holds the handlers' frames (with the request and its payload) and
            # the context, which holds the state: a cycle per refusal that only the cyclic
            # collector frees, +1 MB/s of RSS while refusing (docs/benchmarks/serving/limits.md).
            # With a non-OK code grpc sends the status and drops the (empty) response.
            context.set_code(refused.code)
            context.set_details(redact(refused.message))
            return pb.ModelInferResponse()
        _OK.inc()
        _LATENCY.observe(time.perf_counter() - start)
        return response

    async def _infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        model = self.model
        if request.model_name != model.name:
            message = f"unknown model '{request.model_name}'; serving '{model.name}'"
            raise RequestRefused(grpc.StatusCode.NOT_FOUND, message)
        if request.model_version not in ("", MODEL_VERSION):
            message = f"unknown version '{request.model_version}' of '{model.name}'; serving '{MODEL_VERSION}'"
            raise RequestRefused(grpc.StatusCode.NOT_FOUND, message)
        if not model.ready or model.contract is None:
            message = f"model '{model.name}' is not ready: {model.not_ready_reason}"
            raise RequestRefused(grpc.StatusCode.UNAVAILABLE, message)
        for output in request.outputs:
            if output.name != PROBABILITIES:
                raise InvalidInput(f"unknown output '{output.name}'; the model returns '{PROBABILITIES}'")
        contract = model.contract
        rows, nbytes = declared_size([tensor.shape for tensor in request.inputs])
        if nbytes > self.max_request_bytes:
            message = f"the input's shape declares {nbytes} bytes, over the request cap of {self.max_request_bytes}"
            raise RequestRefused(grpc.StatusCode.RESOURCE_EXHAUSTED, message)
        if not 1 <= rows <= contract.max_batch_size:  # the contract says what is wrong
            probabilities = await model.classify(*await off_loop(nbytes, contract.parse_grpc, request))
        else:  # refused (or counted in) before its contents are converted
            with model.admission.admit(rows):
                parsed = await off_loop(nbytes, contract.parse_grpc, request)
                probabilities = await model.classify(*parsed, admitted=True)
        response = pb.ModelInferResponse(model_name=model.name, model_version=MODEL_VERSION, id=request.id)
        response.outputs.add(name=PROBABILITIES, datatype=DATATYPE, shape=list(probabilities.shape))
        response.raw_output_contents.append(probabilities.tobytes())
        return response


def _refusal(exc: Exception) -> RequestRefused:
    if isinstance(exc, RequestRefused):
        return exc.with_traceback(None)  # its traceback would hold the request's frames (and payload)
    if isinstance(exc, InvalidInput):
        return RequestRefused(grpc.StatusCode.INVALID_ARGUMENT, str(exc.reason))
    if isinstance(exc, ServerOverloaded):
        return RequestRefused(grpc.StatusCode.RESOURCE_EXHAUSTED, exc.reason)
    if isinstance(exc, Draining):
        return RequestRefused(grpc.StatusCode.UNAVAILABLE, exc.reason)
    # The backend itself failed on a valid request: the batch's callers fail, the server serves on.
    return RequestRefused(grpc.StatusCode.INTERNAL, f"inference failed ({type(exc).__name__}: {exc})")


def _log_refusal(
    request: pb.ModelInferRequest, context: aio.ServicerContext, refused: RequestRefused, exc: Exception
) -> None:
    request_id = request.id or dict(context.invocation_metadata() or ()).get("x-request-id", "")
    if refused.code != grpc.StatusCode.INTERNAL:  # not a fault: once per kind a minute, no traceback
        grpc_client_error(MODEL_INFER, refused.code, refused.message, protocol="grpc", request_id=request_id)
        return
    entry = {"protocol": "grpc", "status": refused.code.name, "error": refused.message, "request_id": request_id}
    access.log(logging.ERROR, json.dumps(entry), exc_info=exc)


_SAFE_HANDLERS: dict[Any, Any] = {}  # a method's handler -> the same, refusing undecodable bytes


class KServeErrorsInterceptor(ExceptionToStatusInterceptor):
    """KServe's exception-to-status mapping for KServe's handlers; ``ModelInfer`` maps its own.

    The interceptor wraps each call in a new handler object; the hot method skips that.
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        # Request bytes that do not parse: INVALID_ARGUMENT, not grpc's UNKNOWN (serving.client_errors).
        # Wrapped once per method's handler (the same object each call), not per call.
        original = await continuation(details)
        handler = _SAFE_HANDLERS.get(original)
        if handler is None:
            handler = safe_decoding(original, details.method, log_it=details.method == MODEL_INFER)
            if len(_SAFE_HANDLERS) < 256:  # bounded, should a handler ever be a new object per call
                _SAFE_HANDLERS[original] = handler
        if details.method == MODEL_INFER:
            return handler

        async def decoded(_: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
            return handler

        return await super().intercept_service(decoded, details)

    async def handle_exception(self, ex: Exception, request_or_iterator: Any, context: Any, method_name: str) -> None:
        """KServe's mapping, with the message redacted (serving.redact) before it goes out."""
        if isinstance(getattr(ex, "reason", None), str):
            ex.reason = redact(ex.reason)
        if isinstance(ex, GrpcException):
            ex.details = redact(ex.details)
        # Client errors (serving.client_errors): one INFO line per kind a minute, no traceback.
        if isinstance(ex, aio.AbortError):  # the handler answered with its own status already
            grpc_client_error(method_name, context.code(), str(context.details() or ""))
            raise ex
        for kind, code in (
            (InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
            (ModelNotFound, grpc.StatusCode.NOT_FOUND),
        ):
            if isinstance(ex, kind):
                message = redact(str(ex.reason))
                grpc_client_error(method_name, code, message)
                await context.abort(code, message)
        await super().handle_exception(ex, request_or_iterator, context, method_name)
