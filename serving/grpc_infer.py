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
not ready UNAVAILABLE (with the reason). Each failure is logged as one JSON line with the request
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
from kserve.errors import InvalidInput
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor
from kserve.protocol.grpc.servicer import InferenceServicer

from serving import metrics
from serving.errors import ServerOverloaded
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

    def __init__(self, data_plane: Any, model_repository_extension: Any, model: TopTagger) -> None:
        super().__init__(data_plane, model_repository_extension)
        self.model = model

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

    async def ModelInfer(self, request: pb.ModelInferRequest, context: aio.ServicerContext) -> pb.ModelInferResponse:
        start = time.perf_counter()
        try:
            response = await self._infer(request)
        except asyncio.CancelledError:  # the client went away or its deadline passed
            metrics.REQUESTS.labels("grpc", grpc.StatusCode.CANCELLED.name).inc()
            raise
        except Exception as exc:
            refused = _refusal(exc)
            metrics.REQUESTS.labels("grpc", refused.code.name).inc()
            _LATENCY.observe(time.perf_counter() - start)
            _log_refusal(request, context, refused, exc)
            await context.abort(refused.code, refused.message)
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
        probabilities = await model.classify(*model.contract.parse_grpc(request))
        response = pb.ModelInferResponse(model_name=model.name, model_version=MODEL_VERSION, id=request.id)
        response.outputs.add(name=PROBABILITIES, datatype=DATATYPE, shape=list(probabilities.shape))
        response.raw_output_contents.append(probabilities.tobytes())
        return response


def _refusal(exc: Exception) -> RequestRefused:
    if isinstance(exc, RequestRefused):
        return exc
    if isinstance(exc, InvalidInput):
        return RequestRefused(grpc.StatusCode.INVALID_ARGUMENT, str(exc.reason))
    if isinstance(exc, ServerOverloaded):
        return RequestRefused(grpc.StatusCode.RESOURCE_EXHAUSTED, exc.reason)
    # The backend itself failed on a valid request: the batch's callers fail, the server serves on.
    return RequestRefused(grpc.StatusCode.INTERNAL, f"inference failed ({type(exc).__name__}: {exc})")


def _log_refusal(
    request: pb.ModelInferRequest, context: aio.ServicerContext, refused: RequestRefused, exc: Exception
) -> None:
    request_id = request.id or dict(context.invocation_metadata() or ()).get("x-request-id", "")
    entry = {"protocol": "grpc", "status": refused.code.name, "error": refused.message, "request_id": request_id}
    access.log(
        logging.ERROR if refused.code == grpc.StatusCode.INTERNAL else logging.WARNING,
        json.dumps(entry),
        exc_info=exc if refused.code == grpc.StatusCode.INTERNAL else None,
    )


class KServeErrorsInterceptor(ExceptionToStatusInterceptor):
    """KServe's exception-to-status mapping for KServe's handlers; ``ModelInfer`` maps its own.

    The interceptor wraps each call in a new handler object; the hot method skips that.
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if details.method == MODEL_INFER:
            return await continuation(details)
        return await super().intercept_service(continuation, details)
