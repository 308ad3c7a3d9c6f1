"""KServe's ModelServer, extended where the tagger needs more than the stock server gives.

- gRPC: the same port also answers Triton's ``ModelConfig`` and ``ModelStatistics`` (see
  :mod:`serving.triton.extensions`), so CMSSW's SONIC ``TritonClient`` works unchanged; ``ModelInfer`` goes
  from protobuf to the batcher without KServe's generic objects (:mod:`serving.grpc_infer`),
  and counts requests and latencies itself.
- REST: a body-size cap, a request id on every answer, per-protocol metrics, and readiness
  answers that say *why* the model is not ready.
- A model that fails to load is still registered, so the server comes up not ready and says
  why, instead of exiting (which a crash-looping pod would hide).
- Model load/unload (KServe's repository extension) only through :mod:`serving.control`: refused
  unless ``--model-control explicit``, then only with the bearer token; after an unload the
  server is not live (REST and gRPC) until a load brings the model back.
- Every answer but a successful inference, and every log record, goes through
  :mod:`serving.redact`: no credential leaves the process.
- SIGTERM (or SIGINT) drains (:mod:`serving.drain`): not ready at once on both protocols, new
  inference refused (503 + Retry-After / UNAVAILABLE), accepted requests answered, then exit, within
  ``--drain-seconds``. Triton's ``nv_inference_*`` metrics have their own port
  (:mod:`serving.triton.metrics`) and are served until the process ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent import futures
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from grpc import aio
from kserve import ModelServer
from kserve.errors import InvalidInput
from kserve.protocol.dataplane import DataPlane
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
from starlette.exceptions import HTTPException

from serving import client_errors, discard, metrics
from serving.control import ModelControl, ModelController
from serving.control import install_rest as install_control_routes
from serving.drain import Drain
from serving.errors import ServerOverloaded
from serving.grpc_infer import KServeErrorsInterceptor, TaggerServicer
from serving.limits import Limits, retry_after_header
from serving.predictor import TopTagger
from serving.redact import RedactAnswers
from serving.rest_infer import install_infer_routes
from serving.triton import extensions as triton
from serving.triton.metrics import MetricsServer
from toptagger.constants import MODEL_VERSION

log = logging.getLogger("serving.server")
access = logging.getLogger("serving.access")
DEFAULT_MAX_BODY = Limits.max_request_bytes  # --max-request-mb (serving.limits)
INFER_SUFFIX = "/infer"


# --- REST ---------------------------------------------------------------------------------------
class RestGuard:
    """Pure-ASGI middleware: body cap, request id, per-request metrics and access log.

    Pure ASGI rather than Starlette's BaseHTTPMiddleware: it adds no task or copy per request on
    the hot path.
    """

    def __init__(self, app: Callable, max_body: int, drain: Drain | None = None) -> None:
        self.app, self.max_body, self.drain = app, max_body, drain or Drain()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        request_id = headers.get(b"x-request-id", b"").decode("latin-1") or uuid.uuid4().hex
        declared = headers.get(b"content-length")
        length = int(declared) if declared is not None and declared.isdigit() else None
        if length is not None and length > self.max_body:
            await _send_json(send, 413, {"error": f"request body of {length} bytes exceeds {self.max_body}"})
            discard.throttle(receive, length)  # the upload it refused, at a bounded rate
            return
        received, body_done = 0, False

        async def capped_receive() -> dict:
            nonlocal received, body_done
            message = await receive()
            received += len(message.get("body", b""))
            body_done = body_done or not message.get("more_body", False)
            if received > self.max_body:
                raise _BodyTooLarge
            return message

        status = 500
        is_infer = scope["path"].endswith(INFER_SUFFIX)
        start = time.perf_counter()
        if is_infer and self.drain.draining:  # before the body is read: a proxy retries it elsewhere
            await _send_draining(send, self.drain, request_id)
            metrics.REQUESTS.labels("rest", "503").inc()
            return

        async def tagged_send(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        if is_infer:
            self.drain.enter()  # counted until answered: the drain waits for it
        try:
            await self.app(scope, capped_receive, tagged_send)
        except _BodyTooLarge:
            status = 413
            await _send_json(send, 413, {"error": f"request body exceeds {self.max_body} bytes"})
        finally:
            if is_infer:
                self.drain.leave()
        if length is not None and not body_done and received < length:  # answered before its body was read
            discard.throttle(receive, length - received)
        if is_infer:
            elapsed = time.perf_counter() - start
            metrics.REQUESTS.labels("rest", str(status)).inc()
            metrics.REQUEST_LATENCY.labels("rest").observe(elapsed)
            # Server faults at WARNING; client errors are logged, rate-limited, by serving.client_errors.
            if status >= 500 or access.isEnabledFor(logging.DEBUG):
                access.log(
                    logging.WARNING if status >= 500 else logging.DEBUG,
                    json.dumps(
                        {
                            "protocol": "rest",
                            "path": scope["path"],
                            "status": status,
                            "latency_ms": round(elapsed * 1e3, 3),
                            "request_id": request_id,
                        }
                    ),
                )


class _BodyTooLarge(Exception):
    pass


async def _send_json(send: Callable, status: int, body: dict, headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


async def _send_draining(send: Callable, drain: Drain, request_id: str) -> None:
    # Connection: close, so that a client holding a keep-alive connection reconnects (to another pod).
    headers = [(b"retry-after", b"1"), (b"connection", b"close"), (b"x-request-id", request_id.encode())]
    await _send_json(send, 503, {"error": drain.reason}, headers)


def install_rest_extensions(app: FastAPI, model: TopTagger, max_body: int, dataplane: Any = None) -> None:
    """Routes and handlers added to KServe's FastAPI app before KServe adds its own.

    Starlette matches routes in order, so these readiness routes answer first.
    """

    async def server_ready() -> JSONResponse:
        if model.ready:
            return JSONResponse({"ready": True})
        return JSONResponse({"ready": False, "reason": model.not_ready_reason}, status_code=503)

    async def model_ready(model_name: str, version: str = "") -> JSONResponse:
        if model_name != model.name:
            return JSONResponse({"error": f"unknown model '{model_name}'; this server serves '{model.name}'"}, 404)
        if version not in ("", MODEL_VERSION):
            return JSONResponse({"error": f"unknown version '{version}' of '{model.name}'; serving '1'"}, 404)
        return await server_ready()

    app.add_api_route("/v2/health/ready", server_ready, methods=["GET"])
    app.add_api_route("/v2/models/{model_name}/ready", model_ready, methods=["GET"])
    app.add_api_route("/v2/models/{model_name}/versions/{version}/ready", model_ready, methods=["GET"])

    # Triton's HTTP extensions (repository index, model configuration, statistics), as SONIC's
    # gRPC calls have them on the other port: the same messages, as Triton writes them in JSON.
    def unknown(model_name: str, version: str = "", status: int = 404) -> JSONResponse | None:
        if model_name != model.name:
            return JSONResponse({"error": f"unknown model '{model_name}'; this server serves '{model.name}'"}, status)
        if version not in ("", MODEL_VERSION):
            return JSONResponse({"error": f"unknown version '{version}' of '{model.name}'; serving '1'"}, status)
        return None

    async def repository_index(request: Request) -> JSONResponse:
        body = await request.body()
        try:
            ready_only = bool(json.loads(body).get("ready", False)) if body.strip() else False
        except (ValueError, AttributeError, RecursionError):  # RecursionError: nested past the parser's depth
            return JSONResponse(
                {"error": 'malformed request: the body must be a JSON object such as {"ready": true}'}, 400
            )
        entries = [triton.as_json(entry) for entry in triton.repository_index(model, ready_only).models]
        # Triton writes the reason only for a model that has one.
        return JSONResponse([{k: v for k, v in entry.items() if k != "reason" or v} for entry in entries])

    async def model_config(model_name: str, version: str = "") -> JSONResponse:
        return unknown(model_name, version) or JSONResponse(triton.as_json(triton.model_config(model)))

    async def model_stats(model_name: str = "", version: str = "") -> JSONResponse:
        refused = unknown(model_name, version, status=400) if model_name else None  # Triton's 400, not 404
        return refused or JSONResponse({"model_stats": [triton.as_json(triton.model_statistics(model))]})

    async def model_metadata(model_name: str, version: str = "") -> JSONResponse:
        # KServe's metadata plus Triton's "versions" (KServe leaves it out).
        metadata = {"name": model.name, "versions": [MODEL_VERSION], "platform": ""}
        metadata |= {"inputs": model.get_input_types(), "outputs": model.get_output_types()}
        return unknown(model_name, version) or JSONResponse(metadata)

    app.add_api_route("/v2/repository/index", repository_index, methods=["POST"])
    for prefix in ("/v2/models/{model_name}", "/v2/models/{model_name}/versions/{version}"):
        app.add_api_route(f"{prefix}/config", model_config, methods=["GET"])
        app.add_api_route(f"{prefix}/stats", model_stats, methods=["GET"])
        app.add_api_route(prefix, model_metadata, methods=["GET"])
    app.add_api_route("/v2/models/stats", model_stats, methods=["GET"])
    if dataplane is not None:  # /infer decoded off the event loop (serving.rest_infer)
        install_infer_routes(app, model, dataplane)

        async def server_metadata() -> JSONResponse:
            # KServe's GET /v2 validates through a response model that drops the "serving" object.
            return JSONResponse(dataplane.metadata())

        app.add_api_route("/v2", server_metadata, methods=["GET"])

    async def overloaded(_: Request, exc: ServerOverloaded) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=503, headers={"retry-after": retry_after_header(exc)})

    async def bad_request(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"error": f"malformed request: {_short(exc)}"}, status_code=400)

    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        # Same {"error": ...} shape as KServe's own answers (FastAPI's default says "detail").
        prefix = "malformed request: " if exc.status_code == 400 else ""
        return JSONResponse({"error": f"{prefix}{exc.detail}"}, status_code=exc.status_code, headers=exc.headers)

    app.add_exception_handler(ServerOverloaded, overloaded)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, bad_request)
    app.add_exception_handler(json.JSONDecodeError, bad_request)
    # Logged once per (endpoint, reason) a minute, no traceback; pinned ahead of KServe's handlers.
    client_errors.install_rest(app, (HTTPException, RequestValidationError, json.JSONDecodeError))
    app.add_middleware(RestGuard, max_body=max_body, drain=model.drain)


def _short(exc: Exception) -> str:
    if isinstance(exc, RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return f"{first.get('msg', 'invalid body')} at {where}" if where else str(first.get("msg", exc))
    return str(exc)


class TaggerDataPlane(DataPlane):
    """KServe's data plane, with payload decoding failures answered as 400, not 500.

    A binary payload shorter than its declared shape fails inside KServe's decoder with a bare
    ValueError, which its REST layer turns into a 500.
    """

    def decode(self, body: Any, headers: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().decode(body, headers, *args, **kwargs)
        except (ValueError, TypeError, KeyError, IndexError) as exc:
            if isinstance(exc, InvalidInput):
                raise
            raise InvalidInput(f"the request body does not decode as a v2 inference request: {exc}") from None

    # Liveness follows the model control plane (serving.control); gRPC's servicer takes it from here.
    controller: ModelController | None = None

    async def live(self) -> dict[str, str]:  # type: ignore[override]
        """Not live while an explicit unload has not been followed by a load (REST and gRPC)."""
        reason = self.controller.not_live_reason() if self.controller else None
        return {"status": "alive"} if reason is None else {"status": "not live", "reason": reason}

    async def ready(self) -> bool:
        """gRPC ``ServerReady`` as REST ``/v2/health/ready`` answers: ready only while every model is
        (KServe says True whatever the models do, so a draining or unloaded server looked ready)."""
        models = self._model_registry.get_models().values()
        return bool(models) and all(model.ready for model in models)

    def metadata(self) -> dict[str, Any]:
        """KServe's server metadata plus what serves: REST ``GET /v2`` and gRPC ``ServerMetadata``.

        gRPC's ``ServerMetadataResponse`` has only name, version and extensions, so the choice goes
        into ``extensions`` as ``backend:<kind>`` and ``precision:<precision>`` (tritonclient's
        ``get_server_metadata`` prints them; clients that look for an extension they know are
        unaffected). The full choice, with auto's measurements, is the ``serving`` object, which a
        JSON answer can carry. A model that is not ready adds nothing: nothing serves.
        """
        metadata = super().metadata()
        models = self._model_registry.get_models().values()
        served = next(filter(None, (getattr(model, "serving", None) for model in models)), None)
        if served is not None:
            choice = [f"backend:{served['backend']}", f"precision:{served['precision']}"]
            metadata["extensions"] = [*metadata["extensions"], *choice]
            metadata["serving"] = served
        return metadata


# --- gRPC ---------------------------------------------------------------------------------------
class TaggerGRPCServer:
    """The gRPC side: KServe's v2 servicer with our ``ModelInfer``, plus Triton's extensions.

    Not a subclass of KServe's ``GRPCServer``: its ``start()`` (kserve 0.21) creates its own
    ``InferenceServicer`` and interceptors inside the method, with no hook to pass others, and
    we need a different servicer (:class:`~serving.grpc_infer.TaggerServicer`), no per-call
    ``LoggingInterceptor``, and a second handler for the Triton methods. So this is a plain
    ``grpc.aio`` server built from KServe's parts (servicer, interceptor, generated stubs), with
    the same ``start(max_workers)`` / ``stop(sig)`` that ``ModelServer`` calls.
    ``tests/serving/test_kserve_upstream.py`` fails when upstream's ``GRPCServer.start`` changes.
    """

    def __init__(
        self,
        port: int,
        data_plane: Any,
        model_repository_extension: Any,
        model: TopTagger,
        options: dict[str, Any],
        grace_period: int = 30,
        limits: Limits | None = None,
    ) -> None:
        self._port, self._data_plane, self._extension = port, data_plane, model_repository_extension
        self.model, self._options, self._grace_period = model, options, grace_period
        self.limits = limits or Limits()
        self._server: aio.Server | None = None

    async def start(self, max_workers: int) -> None:
        self._server = aio.server(
            futures.ThreadPoolExecutor(max_workers=max_workers),
            interceptors=(KServeErrorsInterceptor(),),
            options=self.limits.grpc_options(),  # --max-message-mb (KServe's own flags are cleared)
        )
        servicer = TaggerServicer(self._data_plane, self._extension, self.model, self.limits.max_request_bytes)
        servicer.control = getattr(self._data_plane, "controller", None) or servicer.control
        grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, self._server)
        # A second generic handler for the same service: gRPC asks KServe's first, and falls back
        # to this one for the methods KServe does not define.
        self._server.add_generic_rpc_handlers((triton.handler(self.model),))
        self._server.add_insecure_port(f"[::]:{self._port}")
        log.info("gRPC (KServe v2 + Triton ModelConfig/ModelStatistics) on port %d", self._port)
        await self._server.start()
        await self._server.wait_for_termination()

    async def stop(self, sig: int | None = None) -> None:
        if self._server:
            await self._server.stop(grace=self._grace_period)


class TaggerModelServer(ModelServer):
    """KServe's ModelServer serving one :class:`TopTagger`, ready or not, with our gRPC server.

    ``start()`` is upstream's, with two things arranged before it runs (no copy of it here):

    - the model is registered with the public ``register_model`` and upstream gets an empty model
      list: upstream registers only models that are ready and raises ``NoModelReady`` otherwise,
      but a model that cannot load must leave the server up, not ready, saying why;
    - upstream's gRPC server is switched off (``enable_grpc=False``) and ours is appended to
      ``self.servers``, the coroutines upstream's ``start()`` gathers; upstream's ``stop()``
      stops it through ``self._grpc_server``.

    Both rely on upstream behaviour that ``tests/serving/test_kserve_upstream.py`` pins.
    """

    def __init__(
        self,
        model: TopTagger,
        max_body: int = DEFAULT_MAX_BODY,
        control: ModelControl | None = None,
        metrics_server: MetricsServer | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("enable_latency_logging", False)  # one INFO line per request costs throughput
        # Request and message sizes (serving.limits); max_body is the request cap's old name.
        self.limits: Limits = kwargs.pop("limits", None) or Limits(max_request_bytes=max_body)
        max_body = self.limits.max_request_bytes
        self.serve_grpc = kwargs.pop("enable_grpc", True)
        super().__init__(enable_grpc=False, **kwargs)
        self.dataplane = TaggerDataPlane(model_registry=self.registered_models)
        self.model = model
        self.max_body = max_body
        # Load/unload: refused unless control says explicit (serving.control); liveness follows it.
        self.controller = ModelController(model, control, self.registered_models)
        self.dataplane.controller = self.controller
        # Triton's metrics port (started before the model loads, so the counters exist at zero);
        # closed when the process ends, after the drain, so the last scrape sees the pending count fall.
        self.metrics_server = metrics_server
        metrics.watch(lambda: model.pending_requests, lambda: model.drain.in_flight)
        self._signalled: asyncio.Event | None = None  # set by SIGTERM/SIGINT: drain, then stop
        self._forced: asyncio.Event | None = None  # a second signal: stop without waiting further
        self._loop: asyncio.AbstractEventLoop | None = None
        # Per-request INFO lines from uvicorn and KServe's timing middleware cost throughput;
        # our own access log keeps errors (and every request at DEBUG).
        for name in ("uvicorn.access", "kserve.trace"):
            logging.getLogger(name).setLevel(logging.WARNING)

    def start(self, models: list[Any] | None = None) -> None:  # type: ignore[override]
        from kserve.model_server import app
        from kserve.model_server import args as kserve_args

        model = self.model
        self.register_model(model)  # registered even when not ready: readiness says why
        model.enable_latency_logging = self.enable_latency_logging
        # Before upstream's RESTServer adds KServe's routes, so that ours answer first.
        install_control_routes(app, self.controller)
        install_rest_extensions(app, model, self.max_body, self.dataplane)
        app.add_middleware(RedactAnswers)  # every answer but a successful inference (serving.redact)
        if self.serve_grpc:
            self._grpc_server = TaggerGRPCServer(
                self.grpc_port,
                self.dataplane,
                self.model_repository_extension,
                model,
                options=vars(kserve_args),
                grace_period=self.grace_period,
                limits=self.limits,
            )
            self.servers.append(self._grpc_server.start(self.max_threads))
        self.servers.append(self._drain_on_signal())
        _use_uvloop()
        super().start([])
        if self.metrics_server is not None:
            self.metrics_server.close()

    # --- drain (serving.drain) ------------------------------------------------------------------
    def register_signal_handler(self) -> None:
        """Upstream's hook, called by its ``start()`` after it built the REST server and before the
        event loop runs: SIGTERM/SIGINT/SIGQUIT start the drain instead of upstream's immediate stop.

        uvicorn would otherwise take the signals for itself (``capture_signals``) and close the
        REST port at once, then hand the signal to upstream's handler, which stops gRPC and
        unloads the model, failing every request still in flight.
        """
        rest = getattr(self, "_rest_server", None)
        if rest is not None:
            rest._server.capture_signals = contextlib.nullcontext  # the drain decides when uvicorn exits
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, sig: int, frame: object) -> None:
        loop, signalled, forced = self._loop, self._signalled, self._forced
        if loop is None or signalled is None or forced is None:  # before the event loop runs
            raise SystemExit(0)
        # The handler runs between two bytecodes of the loop's own thread: hand over, do nothing here.
        loop.call_soon_threadsafe((forced if signalled.is_set() else signalled).set)
        log.info("signal %s: %s", signal.Signals(sig).name, "stopping now" if signalled.is_set() else "draining")

    async def _drain_on_signal(self) -> None:
        """Wait for a signal; then not ready, refuse new work, finish the accepted, stop everything."""
        self._loop = asyncio.get_running_loop()
        self._signalled, self._forced = asyncio.Event(), asyncio.Event()
        await self._signalled.wait()
        drain = self.model.drain
        self.model.begin_drain()
        done = await drain.wait(stop_early=self._forced)
        if done:
            # Linger, still refusing new work with a retryable UNAVAILABLE, until a proxy's health
            # checks have taken this replica out: a request whose stream opens while the server
            # stops would otherwise be cancelled, and a cancellation is not retried.
            await _sleep_unless(self._forced, drain.linger_s())
        log.info(
            json.dumps(
                {
                    "event": "drained" if done else "drain cut short",
                    "in_flight": drain.in_flight,
                    "seconds": round(time.monotonic() - (drain.started_at or time.monotonic()), 3),
                }
            )
        )
        # Upstream's stop: gRPC's graceful stop and the model's unload (which fails whatever is left).
        self.stop(signal.SIGTERM)
        rest = getattr(self, "_rest_server", None)
        if rest is not None:
            rest._server.should_exit = True


def _use_uvloop() -> None:
    """Run both protocols on uvloop: upstream's ``asyncio.run`` takes the policy's loop.

    uvicorn picks uvloop only in its own ``run()``; KServe serves it from ``asyncio.run`` on the
    stdlib loop. uvloop took 15-40 µs of CPU off each batch-1 gRPC request (of ~350; grpc.aio and
    its loop are most of the rest: docs/benchmarks/serving/hotpath.md). A loop is set as well:
    upstream's ``setup_event_loop`` calls ``get_event_loop()``, which uvloop's policy does not create.
    """
    import uvloop

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.set_event_loop(asyncio.new_event_loop())


async def _sleep_unless(event: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), timeout=seconds)
