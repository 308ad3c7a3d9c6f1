"""Typed serving errors: REST maps them in serving.server, gRPC in serving.grpc_infer."""

from __future__ import annotations

# The readiness reason of a model still loading; any other reason of a server that is up is final.
NOT_LOADED = "not loaded yet"


class ServerOverloaded(RuntimeError):
    """The batching queue is full: HTTP 503, gRPC RESOURCE_EXHAUSTED. Clients should back off."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
