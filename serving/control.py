"""The model control plane (load / unload over REST and gRPC): off unless the operator turns it on.

KServe answers the model-repository extension's load and unload for anyone who asks; an unload
there stops the model for good while liveness stays 200, so nothing ever brings it back. Here:

- **Mode NONE (the default).** ``POST /v2/repository/models/{name}/load|unload`` answers 404 and
  gRPC ``RepositoryModelLoad|Unload`` UNIMPLEMENTED, with Triton's wording for a server started
  without explicit model control (:data:`NOT_ALLOWED`).
- **Mode EXPLICIT** (``--model-control explicit``, env ``MODEL_CONTROL``): the calls need a
  bearer token (REST ``Authorization: Bearer <token>``, gRPC metadata ``authorization``), read
  from ``--control-token-file`` (env ``CONTROL_TOKEN_FILE``: a mounted Secret) or the env
  variable ``CONTROL_TOKEN`` (a Secret's ``secretKeyRef``); never from a flag value. Without a
  token the server refuses to start. A missing or wrong token is 401 / UNAUTHENTICATED (compared
  in constant time); the token is registered with :mod:`serving.redact`, so no message shows it.
- **Liveness follows an explicit unload.** After an unload the server reports *not live*
  (``/v2/health/live`` 503 with the reason, gRPC ``ServerLive`` false) until a load brings the
  model back: Kubernetes restarts a pod left unloaded past its liveness probe's failure
  threshold, and the restarted pod loads its model. A pod is never left alive and unready for
  good. A load after an unload builds a fresh backend, batchers and device thread
  (:meth:`TopTagger.reopen` then :meth:`TopTagger.load`); a load that fails leaves the server
  not live, so the restart follows too.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from grpc_interceptor.exceptions import GrpcException

from serving import redact
from toptagger.errors import ConfigError

if TYPE_CHECKING:
    from serving.predictor import TopTagger

log = logging.getLogger("serving.control")

MODES = ("none", "explicit")
TOKEN_ENV = "CONTROL_TOKEN"
# Triton's answer when model control is not EXPLICIT ("explicit model load / unload is not
# allowed if polling is enabled"), without the part about polling, which this server does not do.
NOT_ALLOWED = (
    "explicit model load / unload is not allowed: the model control mode is NONE "
    "(start the server with --model-control explicit and a control token to allow it)"
)
UNLOADED = "unloaded through the model control API; a load brings it back"
REPOSITORY = "/v2/repository/models/{model_name}"


class ControlRefused(Exception):
    """A control call refused: the HTTP status and gRPC code that say why, and the message."""

    def __init__(self, http_status: int, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.http_status, self.code, self.message = http_status, code, redact.redact(message)


@dataclass(frozen=True)
class ModelControl:
    """The control-plane settings: the mode and, in mode explicit, the bearer token."""

    mode: str = "none"
    token: bytes | None = field(default=None, repr=False)

    @property
    def enabled(self) -> bool:
        return self.mode == "explicit"

    @classmethod
    def from_options(
        cls, mode: str | None, token_file: str | None = None, environ: Mapping[str, str] | None = None
    ) -> ModelControl:
        """Settings from the flags; the token from ``token_file`` or ``CONTROL_TOKEN``.

        Raises :class:`ConfigError` for an unknown mode, an unreadable token file, or mode
        explicit without a token.
        """
        environ = os.environ if environ is None else environ
        mode = (mode or "none").strip().lower()
        if mode not in MODES:
            raise ConfigError(f"--model-control must be one of {', '.join(MODES)}, not {mode!r}")
        if mode == "none":
            return cls("none")
        token = ""
        if token_file:
            try:
                token = Path(token_file).read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                reason = exc.__class__.__name__
                raise ConfigError(f"cannot read the control token file {token_file}: {reason}") from None
            if not token:
                raise ConfigError(f"the control token file {token_file} is empty")
        else:
            token = (environ.get(TOKEN_ENV) or "").strip()
        if not token:
            raise ConfigError(
                "--model-control explicit needs a bearer token: mount one from a Kubernetes Secret and "
                f"pass its path with --control-token-file (env CONTROL_TOKEN_FILE), or set {TOKEN_ENV} "
                "from the Secret (secretKeyRef)"
            )
        redact.add_secret(token)
        return cls("explicit", token.encode())

    def authorized(self, authorization: str | None) -> bool:
        """Whether an ``Authorization`` value (``Bearer <token>``) carries the token (constant time)."""
        if not self.token or not authorization:
            return False
        scheme, _, presented = authorization.strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(presented.strip().encode(), self.token)


class ModelController:
    """Load and unload of the one model, when :class:`ModelControl` allows them, and liveness."""

    def __init__(self, model: TopTagger, control: ModelControl | None = None, registry: Any = None) -> None:
        self.model, self.control, self.registry = model, control or ModelControl(), registry
        self.unloaded = False
        self._lock = asyncio.Lock()

    # --- liveness -------------------------------------------------------------------------------
    def not_live_reason(self) -> str | None:
        """Why the server is not live (an explicit unload not followed by a successful load), or None."""
        if not self.unloaded:
            return None
        if self.model.ready:  # loaded again meanwhile (a KServe load retry after a failed load)
            self.unloaded = False
            return None
        return f"model '{self.model.name}' was {UNLOADED}; until then the server is not live"

    # --- the calls ------------------------------------------------------------------------------
    def check(self, model_name: str, authorization: str | None) -> None:
        """Refuse a call: not allowed (mode none), not authenticated, or another model."""
        if not self.control.enabled:
            raise ControlRefused(404, grpc.StatusCode.UNIMPLEMENTED, NOT_ALLOWED)
        if not self.control.authorized(authorization):
            raise ControlRefused(
                401, grpc.StatusCode.UNAUTHENTICATED, "model control needs a valid bearer token (Authorization)"
            )
        if model_name != self.model.name:
            message = f"unknown model '{model_name}'; this server serves '{self.model.name}'"
            raise ControlRefused(404, grpc.StatusCode.NOT_FOUND, message)

    async def unload(self, model_name: str, authorization: str | None) -> None:
        self.check(model_name, authorization)
        async with self._lock:
            await asyncio.to_thread(self.model.stop)
            self.model.not_ready_reason = UNLOADED
            self.unloaded = True
        log.warning("model %s %s; the server reports not live until then", model_name, UNLOADED)

    async def load(self, model_name: str, authorization: str | None) -> None:
        """(Re)load the model; a loaded model loads nothing again."""
        self.check(model_name, authorization)
        model = self.model
        async with self._lock:
            if model.ready and not self.unloaded:
                return
            await asyncio.to_thread(self._reload)
            if not model.ready:
                raise ControlRefused(
                    503, grpc.StatusCode.UNAVAILABLE, f"failed to load '{model_name}': {model.not_ready_reason}"
                )
            self.unloaded = False
            if self.registry is not None:
                self.registry.update(model)
        log.info("model %s loaded through the model control API", model_name)

    def _reload(self) -> None:
        self.model.reopen()  # a fresh backend, batchers and device thread after an unload
        self.model.load()


# --- REST ---------------------------------------------------------------------------------------
def install_rest(app: FastAPI, controller: ModelController) -> None:
    """The load/unload routes and a liveness route that says why, ahead of KServe's own."""

    async def call(request: Request, model_name: str, action: str) -> JSONResponse:
        try:
            await getattr(controller, action)(model_name, request.headers.get("authorization"))
        except ControlRefused as refused:
            headers = {"www-authenticate": "Bearer"} if refused.http_status == 401 else None
            return JSONResponse({"error": refused.message}, status_code=refused.http_status, headers=headers)
        return JSONResponse({"name": model_name, action: True})

    async def load(request: Request, model_name: str) -> JSONResponse:
        return await call(request, model_name, "load")

    async def unload(request: Request, model_name: str) -> JSONResponse:
        return await call(request, model_name, "unload")

    async def live() -> JSONResponse:
        reason = controller.not_live_reason()
        if reason is None:
            return JSONResponse({"live": True})
        return JSONResponse({"live": False, "reason": reason}, status_code=503)

    app.add_api_route(f"{REPOSITORY}/load", load, methods=["POST"])
    app.add_api_route(f"{REPOSITORY}/unload", unload, methods=["POST"])
    app.add_api_route("/v2/health/live", live, methods=["GET"])


# --- gRPC ---------------------------------------------------------------------------------------
async def grpc_call(controller: ModelController, action: str, model_name: str, context: Any) -> None:
    """``RepositoryModelLoad`` / ``RepositoryModelUnload``: refusals raise the matching status."""
    metadata = dict(context.invocation_metadata() or ())
    try:
        await getattr(controller, action)(model_name, metadata.get("authorization"))
    except ControlRefused as refused:
        raise GrpcException(refused.message, refused.code) from None
