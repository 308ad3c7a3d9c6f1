"""The unread rest of a refused REST upload, discarded at a bounded rate.

A request refused before its body is read (413 by ``Content-Length``, 400 or 503 from the JSON
header of a binary request, 404 for another model) is answered at once, and uvicorn then reads
the rest of the upload and drops it, so that the keep-alive connection stays usable (closing it
instead makes clients see a reset and reconnect in a loop; nginx drains too, with
``lingering_close``). At loopback speed that drain is work proportional to the request's size on
the event loop that also serves gRPC: a client looping 64 MB bodies pushed ~600 MB/s through
the server's socket reads, taking CPU from the model.

So the first :data:`FREE_BYTES` of a refused upload are read at full speed (a small mistake costs
the client nothing), and the rest at :data:`RATE_BYTES_PER_S` per connection: reading pauses
until the budget refills, TCP's flow control stops the sender, and a client that insists on
sending 64 MB it was told are refused waits in its own ``send`` instead of spending the server's
CPU. A client that reads the early answer (and stops sending) is not slowed at all.

The rate is counted on the transport, under uvicorn's protocol (a pass-through protocol between
the two, removed once the declared body has gone by); it pauses and resumes through uvicorn's own
flow control, so the two never disagree about whether the socket is read.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from serving import metrics

MB = 1024 * 1024
FREE_BYTES = 8 * MB
RATE_BYTES_PER_S = 16 * MB


def throttle(receive: Callable, unread: int, rate: float = RATE_BYTES_PER_S, free: int = FREE_BYTES) -> bool:
    """Bound the rate at which the last ``unread`` bytes of this request's body are discarded.

    ``receive`` is the ASGI receive callable of a request whose answer is complete. Returns
    False where the server is not uvicorn's httptools/h11 protocol (nothing is changed then).
    """
    cycle = getattr(receive, "__self__", None)
    transport = getattr(cycle, "transport", None)
    flow = getattr(cycle, "flow", None)
    unread -= len(getattr(cycle, "body", b""))  # read by uvicorn already, not handed to the app
    if unread <= 0 or transport is None or flow is None or transport.is_closing():
        return False
    protocol = transport.get_protocol()
    if isinstance(protocol, _Throttled):
        return False
    transport.set_protocol(_Throttled(transport, protocol, flow, unread, rate, free))
    return True


class _Throttled:
    """A pass-through protocol that counts the discarded bytes and pauses reading when over budget."""

    def __init__(self, transport: Any, protocol: Any, flow: Any, unread: int, rate: float, free: int) -> None:
        self._transport, self._protocol, self._flow = transport, protocol, flow
        self._left, self._rate = unread, rate
        self._burst = self._tokens = float(free)
        self._stamp = time.monotonic()
        self._resume: asyncio.TimerHandle | None = None

    def data_received(self, data: bytes) -> None:
        self._protocol.data_received(data)
        discarded = min(len(data), self._left)
        metrics.DISCARDED_BYTES.inc(discarded)
        self._left -= discarded
        if self._left <= 0:  # the body has gone by: what follows is the next request
            self._detach()
            return
        now = time.monotonic()
        self._tokens = min(self._tokens + (now - self._stamp) * self._rate, self._burst) - len(data)
        self._stamp = now
        if self._tokens < 0 and self._resume is None:
            metrics.DISCARD_PAUSES.inc()
            self._flow.pause_reading()
            delay = -self._tokens / self._rate
            self._resume = asyncio.get_running_loop().call_later(delay, self._refilled)

    def _refilled(self) -> None:
        self._resume = None
        if not self._transport.is_closing():
            self._flow.resume_reading()

    def _detach(self) -> None:
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
            self._flow.resume_reading()
        if self._transport.get_protocol() is self:
            self._transport.set_protocol(self._protocol)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        self._protocol.connection_lost(exc)

    def __getattr__(self, name: str) -> Any:  # eof_received, pause_writing, resume_writing, ...
        return getattr(self._protocol, name)
