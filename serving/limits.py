"""Request-size limits and time-based admission (backpressure in seconds of work, not requests).

Sizes (``python -m serving`` flags, each also an environment variable):

- ``--max-request-mb`` (64): the largest inference request, on both protocols. Over REST the
  declared ``Content-Length`` is checked before the body is read (413 at once; a chunked body is
  cut off at the cap); over gRPC the declared tensor size (shape x 4 bytes) is checked before its
  contents are converted (RESOURCE_EXHAUSTED). ``--max-body-mb`` / ``MAX_BODY_MB`` are its old
  names, still read.
- ``--max-message-mb`` (64): gRPC's send and receive message limits (the transport refuses a
  larger message with RESOURCE_EXHAUSTED before it is parsed). A gRPC request is thus bounded by
  the smaller of the two; the defaults are equal, and fit a batch of 16 images of 224x224x3 FP32
  (9.6 MB) more than six times over.

Admission (``--max-queue-ms``, 1000): a request of ``n`` rows is refused at once (503 with
``Retry-After`` / RESOURCE_EXHAUSTED) when the rows already admitted and not yet answered, plus
its own, would take longer than that at the measured rate: an exponentially weighted rows/second
of recent batches, seeded from a warm-up batch when the model loads. Rows count from the moment
the request's size is known (the gRPC message's shape, the JSON header of a binary REST request)
until its answer, so decoding, queueing and the batch that runs are all counted. A request always
gets in when nothing else is in flight, however large, so that it can never be refused forever.
``--max-queue`` (requests waiting in the batcher) stays as a second, count-based cap.
"""

from __future__ import annotations

import asyncio
import ctypes
import math
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from serving.errors import ServerOverloaded

MB = 1024 * 1024
DEFAULT_MAX_REQUEST_MB = 64.0
DEFAULT_MAX_MESSAGE_MB = 64.0
DEFAULT_MAX_QUEUE_MS = 1000.0
# Requests whose payload is larger than this are decoded and checked in the decode pool, not on
# the event loop that serves both protocols (a batch-1 64x64x3 image is 49 kB, 224x224x3 602 kB).
OFFLOOP_BYTES = 256 * 1024
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameters
M_TRIM_THRESHOLD = -1
MMAP_THRESHOLD = 1024 * 1024
# Free memory glibc keeps at the top of its heap instead of giving it back at once: with the
# default (128 kB) every refused request's buffers were returned and faulted in again (1300-1700
# minor page faults per refused 16-image request).
TRIM_THRESHOLD = 64 * 1024 * 1024
RATE_WEIGHT = 0.2  # weight of the newest batch in the rows/second average
DECODE_THREADS = 2
T = TypeVar("T")
_decode_pool: ThreadPoolExecutor | None = None


async def off_loop(nbytes: int, function: Callable[..., T], *args: Any) -> T:
    """``function(*args)`` inline when ``nbytes`` is small, else in the decode pool.

    The pool is small and shared by both protocols: numpy's conversions and checks release the
    GIL, so big requests are decoded beside the event loop instead of stalling it; the queue in
    front of the pool is bounded by the request cap and the admission limit.
    """
    global _decode_pool
    if nbytes < OFFLOOP_BYTES:
        return function(*args)
    if _decode_pool is None:
        _decode_pool = ThreadPoolExecutor(max_workers=DECODE_THREADS, thread_name_prefix="decode")
    return await asyncio.get_running_loop().run_in_executor(_decode_pool, function, *args)


def declared_size(shapes: Sequence[Sequence[int]]) -> tuple[int, int]:
    """(rows, FP32 bytes) that the one input's declared shape promises; (0, 0) if it tells nothing
    (not exactly one input, or a shape with a dimension below 1): the contract then says why."""
    if len(shapes) != 1 or not shapes[0]:
        return 0, 0
    try:
        dims = [int(d) for d in shapes[0]]
    except (TypeError, ValueError):
        return 0, 0
    if any(d < 1 for d in dims):
        return 0, 0
    return dims[0], 4 * math.prod(dims)


@dataclass(frozen=True)
class Limits:
    """Byte limits of one server (see the module docstring)."""

    max_request_bytes: int = int(DEFAULT_MAX_REQUEST_MB * MB)
    max_message_bytes: int = int(DEFAULT_MAX_MESSAGE_MB * MB)

    @classmethod
    def from_mb(cls, max_request_mb: float, max_message_mb: float) -> Limits:
        if max_request_mb <= 0 or max_message_mb <= 0:
            raise ValueError("--max-request-mb and --max-message-mb must be > 0")
        return cls(int(max_request_mb * MB), int(max_message_mb * MB))

    def grpc_options(self) -> list[tuple[str, int]]:
        return [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
        ]


def return_big_buffers_to_the_system(threshold_bytes: int = MMAP_THRESHOLD) -> bool:
    """Have glibc allocate buffers of ``threshold_bytes`` or more with mmap, always.

    glibc raises its mmap threshold to the largest block freed (up to 32 MiB), so after the first
    big request every later one is carved from the heaps of whichever threads touched it and is
    seldom given back: refusing 4 MB gRPC requests in a loop grew the server by 30 MB per 2000
    (docs/benchmarks/serving/limits.md); with the threshold pinned, by nothing. Big requests are
    rare and already cost their copy; a request of a few rows stays on the heap. A threshold
    set in the environment (``MALLOC_MMAP_THRESHOLD_``) wins. False where this is not glibc.
    """
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        if "MALLOC_TRIM_THRESHOLD_" not in os.environ:
            libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
        return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold_bytes))
    except (OSError, AttributeError):
        return False


class QueueTooLong(ServerOverloaded):
    """Refused by :class:`Admission`: the queued work would take longer than ``--max-queue-ms``."""

    def __init__(self, reason: str, retry_after_s: float) -> None:
        super().__init__(reason)
        self.retry_after_s = retry_after_s


def retry_after_header(exc: Exception) -> str:
    """Whole seconds for HTTP's ``Retry-After`` (at least 1)."""
    return str(max(1, math.ceil(getattr(exc, "retry_after_s", 1.0))))


class Admission:
    """Rows admitted and not yet answered, against an exponentially weighted rows/second.

    Thread-safe (the rate is observed from the batcher's loop, rows admitted from the event loop
    and released wherever the request ends).
    """

    def __init__(self, max_queue_ms: float | None, rows_per_s: float | None = None) -> None:
        if max_queue_ms is not None and max_queue_ms <= 0:
            raise ValueError("--max-queue-ms must be > 0")
        self.max_queue_s = None if max_queue_ms is None else max_queue_ms / 1000
        self.rows_per_s = rows_per_s  # None until seeded or measured: admit everything meanwhile
        self.in_flight = 0
        self.refused = 0
        self._lock = threading.Lock()

    def seed(self, rows: int, seconds: float) -> None:
        """The rate before any batch has run (a warm-up batch)."""
        if rows > 0 and seconds > 0:
            with self._lock:
                self.rows_per_s = rows / seconds

    def observe(self, rows: int, seconds: float) -> None:
        """One batch of ``rows`` took ``seconds`` of compute."""
        if rows <= 0 or seconds <= 0:
            return
        rate = rows / seconds
        with self._lock:
            old = self.rows_per_s
            self.rows_per_s = rate if old is None else RATE_WEIGHT * rate + (1 - RATE_WEIGHT) * old

    def queued_seconds(self, extra_rows: int = 0) -> float:
        rate = self.rows_per_s
        return 0.0 if not rate else (self.in_flight + extra_rows) / rate

    def try_admit(self, rows: int) -> None:
        """Count ``rows`` in, or raise :class:`QueueTooLong`; pair with :meth:`release`."""
        with self._lock:
            self._raise_if_too_long(rows)
            self.in_flight += rows

    def check(self, rows: int) -> None:
        """Raise :class:`QueueTooLong` if ``rows`` would be refused now, counting nothing in.

        For a request whose body is still to be read: refused before the read, admitted only
        once its tensor is there (an upload in progress must not hold rows others wait behind).
        """
        with self._lock:
            self._raise_if_too_long(rows)

    def _raise_if_too_long(self, rows: int) -> None:  # under self._lock
        limit, rate = self.max_queue_s, self.rows_per_s
        if limit is not None and rate and self.in_flight > 0:
            wait = (self.in_flight + rows) / rate
            if wait > limit:
                self.refused += 1
                ahead = self.in_flight / rate
                raise QueueTooLong(
                    f"the inference queue holds {ahead * 1e3:.0f} ms of work ({self.in_flight} rows at "
                    f"{rate:.0f} rows/s); with {rows} more rows it exceeds --max-queue-ms "
                    f"{limit * 1e3:.0f}; retry later",
                    retry_after_s=max(ahead - limit + rows / rate, 0.001),
                )

    def release(self, rows: int) -> None:
        with self._lock:
            self.in_flight -= rows

    @contextmanager
    def admit(self, rows: int) -> Iterator[None]:
        self.try_admit(rows)
        try:
            yield
        finally:
            self.release(rows)
