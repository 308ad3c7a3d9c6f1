"""Drain: the requests a replica has accepted, and how it ends without dropping any of them.

In a fleet (SuperSONIC: Envoy in front of N replicas, ``terminationGracePeriodSeconds: 60``) a
replica that is told to stop (SIGTERM) must not take new work, must answer everything it took,
and must say so in a way the proxy and Kubernetes act on:

- readiness turns false at once (REST ``/v2/health/ready`` and model ready 503; gRPC
  ``ServerReady`` and ``ModelReady`` false), liveness stays true (a restart would drop the work);
- a new inference request is refused before it is read: HTTP 503 with ``Retry-After`` and
  ``Connection: close``, gRPC UNAVAILABLE, the codes a proxy retries on another replica;
- the process exits once no accepted request is left, or after ``--drain-seconds`` at the latest.

One :class:`Drain` per served model; both transports count their inference requests in it
(:meth:`Drain.enter` / :meth:`Drain.leave`). Everything runs on the server's one event loop, so
plain integers suffice.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

DEFAULT_DRAIN_SECONDS = 30.0  # under SuperSONIC's 60 s grace period, with room for the exit itself
RETRY_AFTER_S = 1  # another replica can take it now; this one will not come back
# After the last accepted request: how long a drained replica keeps refusing (retryably) before
# it stops, so that a proxy's health checks (the local fleet's: 1 s x 2) take it out first.
LINGER_S = 3.0


class Draining(RuntimeError):
    """The server is shutting down: the request was not accepted (HTTP 503 / gRPC UNAVAILABLE)."""

    retry_after_s = RETRY_AFTER_S

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Drain:
    """Inference requests in flight, and whether new ones are still accepted."""

    def __init__(self, seconds: float = DEFAULT_DRAIN_SECONDS) -> None:
        if seconds < 0:
            raise ValueError("--drain-seconds must be >= 0")
        self.seconds = seconds
        self.draining = False
        self.in_flight = 0
        self.started_at: float | None = None  # time.monotonic() of begin()
        self._idle: asyncio.Event | None = None

    @property
    def reason(self) -> str:
        return "draining: the server is shutting down and takes no new requests; retry on another replica"

    def enter(self) -> None:
        """Count one request in, or raise :class:`Draining`; pair with :meth:`leave`."""
        if self.draining:
            raise Draining(self.reason)
        self.in_flight += 1

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0 and self._idle is not None:
            self._idle.set()

    def begin(self) -> None:
        """Take no new requests from now on (from the event loop's thread)."""
        if not self.draining:
            self.draining = True
            self.started_at = time.monotonic()

    def linger_s(self) -> float:
        """:data:`LINGER_S`, or what is left of ``seconds`` if less."""
        if self.started_at is None:
            return 0.0
        left = self.seconds - (time.monotonic() - self.started_at)
        return max(0.0, min(LINGER_S, left))

    async def wait(self, stop_early: asyncio.Event | None = None) -> bool:
        """Once draining: wait until nothing is in flight (True) or ``seconds`` have passed
        or ``stop_early`` is set (False)."""
        self._idle = asyncio.Event()
        if self.in_flight == 0:
            return True
        waits = [asyncio.ensure_future(self._idle.wait())]
        if stop_early is not None:
            waits.append(asyncio.ensure_future(stop_early.wait()))
        try:
            await asyncio.wait(waits, timeout=self.seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waits:
                waiter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await waiter
        return self.in_flight == 0
