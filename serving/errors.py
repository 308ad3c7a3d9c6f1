"""Typed serving errors, mapped to HTTP and gRPC status codes in one place."""

from __future__ import annotations

from grpc_interceptor.exceptions import ResourceExhausted


class ServerOverloaded(ResourceExhausted):
    """The batching queue is full: HTTP 503, gRPC RESOURCE_EXHAUSTED. Clients should back off."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


class ModelLoadError(RuntimeError):
    """The model URI could not be turned into a ready backend; the server stays up, not ready."""
