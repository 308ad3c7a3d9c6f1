"""Client errors: logged quietly, at most once per (endpoint, reason) a minute, and never as 5xx.

A request that is the client's mistake (malformed body, bad shape, unknown model, impossible
jet...) gets a 4xx / INVALID_ARGUMENT-style answer that says what is wrong; the log needs to know
that such requests arrive, not each one with a traceback. KServe's own handlers log every
``InvalidInput`` and ``ModelNotFound`` at ERROR with a traceback (``kserve/errors.py``, and the
gRPC ``ExceptionToStatusInterceptor``), so one client could flood the log and trip alerts.

- :class:`ClientErrorLog` logs one INFO line per (endpoint, reason) per interval, with the count
  of lines it held back since; the reason is the message with client-chosen parts (quoted names,
  numbers) masked, and the table of reasons is bounded, so varying a request does not get past it.
- :func:`install_rest` puts our handlers for KServe's client-error exceptions in front of
  KServe's (which ``RESTServer`` adds after ours) and wraps the server's other 4xx handlers.
- :func:`grpc_client_error` is what the gRPC paths (``serving.grpc_infer``) call.

Server faults (5xx, INTERNAL) are not handled here: they keep their ERROR line and traceback.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from kserve.errors import InvalidInput, ModelNotFound

from serving.redact import redact

log = logging.getLogger("serving.client_errors")
INTERVAL_S = 60.0
MAX_REASONS = 512  # distinct (endpoint, reason) pairs remembered; beyond, one shared "other" key
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?", re.IGNORECASE)


def reason_of(message: str) -> str:
    """The kind of mistake a message describes: quoted names and numbers masked, length capped."""
    return _NUMBER.sub("#", _QUOTED.sub("'…'", message))[:120]


class ClientErrorLog:
    """At most one log line per (endpoint, reason) per ``interval_s``; thread-safe."""

    def __init__(
        self,
        logger: logging.Logger = log,
        interval_s: float = INTERVAL_S,
        max_reasons: int = MAX_REASONS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger, self.interval_s, self.max_reasons, self.clock = logger, interval_s, max_reasons, clock
        self._last: dict[tuple[str, str], tuple[float, int]] = {}  # key -> (time logged, held back since)
        self._lock = threading.Lock()

    def record(self, endpoint: str, message: str, level: int = logging.INFO, **fields: Any) -> bool:
        """Log ``message`` unless its (endpoint, reason) was logged within the interval; True if logged."""
        if not self.logger.isEnabledFor(level):
            return False
        key = (endpoint, reason_of(message))
        now = self.clock()
        with self._lock:
            if key not in self._last and len(self._last) >= self.max_reasons:
                self._forget(now)
                if len(self._last) >= self.max_reasons:
                    key = (endpoint, "other")
            last = self._last.get(key)
            if last is not None and now - last[0] < self.interval_s:
                self._last[key] = (last[0], last[1] + 1)
                return False
            self._last[key] = (now, 0)
        # Redacted before JSON escaping could hide a secret from the log's own redaction (serving.redact).
        entry = {"client_error": redact(message[:500]), "endpoint": endpoint, **fields}
        if last is not None and last[1]:
            entry["suppressed"] = last[1]  # same kind of mistake, not logged, in the last interval
        self.logger.log(level, json.dumps(entry, default=str))  # no traceback: nothing failed here
        return True

    def _forget(self, now: float) -> None:
        for key in [k for k, (at, _) in self._last.items() if now - at >= self.interval_s]:
            del self._last[key]


CLIENT_ERRORS = ClientErrorLog()


# --- REST ---------------------------------------------------------------------------------------
Handler = Callable[[Any, Exception], Awaitable[Any]]


def rest_endpoint(request: Any) -> str:
    """The route's template (``/v2/models/{model_name}/infer``), not the path a client chose."""
    route = request.scope.get("route")
    return f"{request.method} {getattr(route, 'path', 'unmatched')}"


def _error_text(response: Any) -> str:
    try:
        return str(json.loads(bytes(response.body)).get("error", ""))
    except (ValueError, AttributeError, TypeError):
        return ""


def logged(handler: Handler) -> Handler:
    """``handler`` whose 4xx answers are logged as client errors (its 5xx pass untouched)."""

    async def wrapper(request: Any, exc: Exception) -> Any:
        response = await handler(request, exc)
        if 400 <= response.status_code < 500:
            message = _error_text(response) or f"{type(exc).__name__}: {exc}"
            CLIENT_ERRORS.record(rest_endpoint(request), message, status=response.status_code)
        return response

    wrapper.__wrapped__ = handler  # type: ignore[attr-defined]
    return wrapper


async def invalid_input(_: Any, exc: InvalidInput) -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": str(exc)}, status_code=400)


async def model_not_found(_: Any, exc: ModelNotFound) -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": str(exc)}, status_code=404)


async def not_served(request: Any, exc: NotImplementedError) -> Any:
    """KServe raises NotImplementedError for what this model does not have (``:explain`` without an
    explainer, ...): a resource that is not here, 404, not 501 (a 5xx for a client's request)."""
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": f"{request.url.path} is not served here: {exc}"}, status_code=404)


class _PinnedHandlers(dict):
    """The app's exception handlers, where the pinned ones cannot be replaced by a later
    ``add_exception_handler`` (KServe's ``RESTServer`` adds its logging handlers after ours)."""

    def __init__(self, handlers: dict, pinned: dict) -> None:
        super().__init__(handlers)
        super().update(pinned)
        self.pinned = dict(pinned)

    def __setitem__(self, key: Any, value: Any) -> None:
        if key not in self.pinned:
            super().__setitem__(key, value)


def install_rest(app: Any, client_error_types: tuple[Any, ...] = ()) -> None:
    """Quiet, rate-limited logging for every REST client error, pinned before KServe adds its own.

    ``client_error_types``: exception classes whose handlers the server installed already (400s
    for malformed bodies...), wrapped to log through :data:`CLIENT_ERRORS`.
    """
    pinned = {
        InvalidInput: logged(invalid_input),
        ModelNotFound: logged(model_not_found),
        NotImplementedError: logged(not_served),
    }
    for kind in client_error_types:
        handler = app.exception_handlers.get(kind)
        if handler is not None:
            pinned[kind] = handler if hasattr(handler, "__wrapped__") else logged(handler)
    app.exception_handlers = _PinnedHandlers(app.exception_handlers, pinned)


# --- gRPC ---------------------------------------------------------------------------------------
CLIENT_CODES = frozenset({"INVALID_ARGUMENT", "NOT_FOUND", "OUT_OF_RANGE", "FAILED_PRECONDITION", "UNAUTHENTICATED"})


def grpc_client_error(method: str, code: Any, message: str, **fields: Any) -> bool:
    """Log a non-OK gRPC answer that is not a server fault: INFO for the client's own mistakes,
    WARNING for the server's state (UNAVAILABLE, RESOURCE_EXHAUSTED...), both rate-limited."""
    name = getattr(code, "name", str(code))
    level = logging.INFO if name in CLIENT_CODES else logging.WARNING
    return CLIENT_ERRORS.record(f"grpc {method.rsplit('/', 1)[-1]}", message, level, status=name, **fields)


class Undecodable:
    """A gRPC request whose bytes do not parse as the method's message (see :func:`safe_decoding`)."""

    def __init__(self, message: str) -> None:
        self.message = message


def safe_decoding(handler: Any, method: str, log_it: bool) -> Any:
    """``handler`` whose request bytes that do not parse get INVALID_ARGUMENT, not UNKNOWN.

    grpc answers UNKNOWN ("Unexpected DecodeError") when a request deserializer raises; this one
    returns an :class:`Undecodable` instead, which the wrapped method refuses with a message.
    ``log_it``: log the client error here (for methods no interceptor logs).
    """
    if handler is None or handler.unary_unary is None or handler.request_deserializer is None:
        return handler
    deserialize, behaviour = handler.request_deserializer, handler.unary_unary
    message_name = method.rsplit("/", 1)[-1]

    def decode(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:  # protobuf's DecodeError, RecursionError for deep nesting, ...
            return Undecodable(f"the request does not parse as a {message_name} request message ({exc})")

    async def refuse_undecodable(request: Any, context: Any) -> Any:
        if isinstance(request, Undecodable):
            import grpc

            if log_it:
                grpc_client_error(method, grpc.StatusCode.INVALID_ARGUMENT, request.message)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return await behaviour(request, context)

    return handler._replace(request_deserializer=decode, unary_unary=refuse_undecodable)
