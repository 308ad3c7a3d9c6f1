"""Dynamic batching inside the predictor.

KServe's Python server runs one model call per request, and its batcher sidecar speaks only the
v1 protocol (kserve/kserve#2275). CMSSW's SONIC clients send batch-1 requests from many
processes, so the server must merge them itself to use the accelerator well.

Requests wait in a bounded queue. When the device is free, one worker task takes the queued
requests, then keeps taking requests until the batch holds ``max_batch_size`` rows, or as many
requests as were in flight when the previous batch finished (its own plus those queued
meanwhile), or ``max_latency_ms`` have passed since it started collecting. The merged batch runs
once, in a worker thread, and each caller gets exactly its own rows back.

Waiting only for the concurrency last seen keeps a lone client from paying ``max_latency_ms`` on
every call. Closed-loop clients (each sends again when answered, as a CMSSW stream does) come
together in full batches; and clients that have drifted into two groups, each answered while the
other computes, are merged again: the wait counts from when the device became free, not from
when the oldest request arrived (which, behind a busy device, is always long ago). Measured on 2
CPU cores with 8 gRPC clients: 124 jets/s with the groups left split (alternating batches of 4),
171 merged (docs/benchmarks/serving). ``max_latency_ms`` thus bounds how long a request waits for
company while the device is idle.
When the queue is full, :class:`QueueFull` is raised at once, so that latency stays bounded and
the client can back off or go elsewhere. A closed batcher (:meth:`DynamicBatcher.shutdown`, when
the model stops) answers every waiting and later request with :class:`BatcherClosed` at once,
rather than leaving its callers waiting for a worker that is gone.

Every count and duration of a request's life is taken here, once, in Triton's units
(:class:`BatchStatistics`: per request, per execution, failures by Triton's reason), and so is
the pending count (queued or in a batch still being collected): ``ModelStatistics`` and the
``nv_inference_*`` metrics only read them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np


class QueueFull(RuntimeError):
    """The batching queue is full; the request was not accepted (HTTP 503 / RESOURCE_EXHAUSTED)."""


class BatcherClosed(RuntimeError):
    """The batcher was shut down (the model stopped); the request was not run."""


@dataclass
class _Pending:
    rows: np.ndarray
    future: asyncio.Future
    enqueued_ns: int


# Why a request failed, as Triton's ``nv_inference_request_failure`` labels it (``reason``).
REJECTED, CANCELED, BACKEND, OTHER = "REJECTED", "CANCELED", "BACKEND", "OTHER"
FAILURE_REASONS = (REJECTED, CANCELED, BACKEND, OTHER)


@dataclass
class SizeStatistics:
    """One batch size's executions: count and the batches' durations (ns), Triton's ``batch_stats``."""

    count: int = 0
    compute_input_ns: int = 0
    compute_infer_ns: int = 0
    compute_output_ns: int = 0


@dataclass
class BatchStatistics:
    """Cumulative counters in the units of Triton's ModelStatistics (counts and nanoseconds).

    The one owner of these counts: ModelStatistics (gRPC and HTTP) and the ``nv_inference_*``
    metrics (:mod:`serving.triton.metrics`) both read them. As Triton counts them, durations are
    summed per request: a batch's compute time counts once for each request in it, so that
    ``compute_infer_ns / success_count`` is what a request saw; ``batch_sizes`` has them per execution.
    """

    inference_count: int = 0  # rows inferred
    execution_count: int = 0  # batches run
    success_count: int = 0  # requests answered
    failures: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FAILURE_REASONS, 0))
    request_ns: int = 0  # queued until answered
    queue_ns: int = 0
    compute_input_ns: int = 0  # merging the rows, rendering constituents into images
    compute_infer_ns: int = 0
    compute_output_ns: int = 0  # handing each caller its rows
    last_inference_ms: int = 0
    batch_sizes: dict[int, SizeStatistics] = field(default_factory=dict)

    @property
    def fail_count(self) -> int:
        return sum(self.failures.values())

    @classmethod
    def combined(cls, parts: Iterable[BatchStatistics]) -> BatchStatistics:
        """The sum of several batchers' counters (one model served through several queues)."""
        total = cls()
        # list(...items()): copied in one step, as a metrics scrape reads these from another thread.
        for part in parts:
            for name in _SUMMED:
                setattr(total, name, getattr(total, name) + getattr(part, name))
            for reason, count in list(part.failures.items()):
                total.failures[reason] = total.failures.get(reason, 0) + count
            total.last_inference_ms = max(total.last_inference_ms, part.last_inference_ms)
            for size, entry in list(part.batch_sizes.items()):
                into = total.batch_sizes.setdefault(size, SizeStatistics())
                for name in _SIZE_SUMMED:
                    setattr(into, name, getattr(into, name) + getattr(entry, name))
        return total


_SUMMED = (
    "inference_count",
    "execution_count",
    "success_count",
    "request_ns",
    "queue_ns",
    "compute_input_ns",
    "compute_infer_ns",
    "compute_output_ns",
)
_SIZE_SUMMED = ("count", "compute_input_ns", "compute_infer_ns", "compute_output_ns")


class DynamicBatcher:
    """Merge concurrent requests into batches for ``run_batch`` (rows in -> rows out)."""

    def __init__(
        self,
        run_batch: Callable[[np.ndarray], np.ndarray],
        max_batch_size: int = 16,
        max_latency_ms: float = 5.0,
        max_queue: int = 256,
        on_batch: Callable[[int, float, float], None] | None = None,
        executor: ThreadPoolExecutor | None = None,
        prepare: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1 or max_latency_ms < 0:
            raise ValueError("max_batch_size and max_queue must be >= 1 and max_latency_ms >= 0")
        self.run_batch = run_batch
        # Rows -> the model's input (constituents rendered into images), timed as Triton's compute_input.
        self.prepare = prepare
        self.max_batch_size = max_batch_size
        self.max_latency_s = max_latency_ms / 1000
        self.max_queue = max_queue
        self.on_batch = on_batch
        self.stats = BatchStatistics()
        self._expected_requests = 1  # requests in flight at the end of the last batch: worth waiting for
        self._queue: deque[_Pending] = deque()
        self._forming = 0  # requests taken from the queue into the batch being collected, not yet run
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._closed: str | None = None  # why the batcher was shut down; None while it serves
        # One thread: batches run one after another, which is what an accelerator does anyway,
        # and torch/OpenCL use their own threads inside a batch. A caller may pass the thread
        # that built the model (see serving.predictor: torch is 1.8x slower on 2 cores when its
        # OpenMP pool is used from a second thread).
        self._owns_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch")

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def pending_count(self) -> int:
        """Requests accepted and not yet executing: Triton's ``nv_inference_pending_request_count``."""
        return len(self._queue) + self._forming

    async def submit(self, rows: np.ndarray) -> np.ndarray:
        """Queue ``rows`` ([n, ...], n <= max_batch_size) and return their outputs."""
        if self._closed is not None:
            raise BatcherClosed(self._closed)
        if len(rows) > self.max_batch_size:
            raise ValueError(f"{len(rows)} rows exceed the maximum batch size {self.max_batch_size}")
        if len(self._queue) >= self.max_queue:
            self.stats.failures[REJECTED] += 1
            raise QueueFull(f"the inference queue is full ({self.max_queue} requests waiting); retry later")
        loop = asyncio.get_running_loop()
        self._ensure_worker(loop)
        pending = _Pending(rows, loop.create_future(), time.perf_counter_ns())
        self._queue.append(pending)
        assert self._wakeup is not None
        self._wakeup.set()
        return await pending.future

    def _ensure_worker(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._worker is None or self._worker.done():
            self._wakeup = asyncio.Event()
            self._worker = loop.create_task(self._run(), name="dynamic-batcher")

    async def _run(self) -> None:
        assert self._wakeup is not None
        while True:
            while not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            batch: list[_Pending] = []
            try:
                await self._collect(batch)
                await self._execute(batch)
            except asyncio.CancelledError:  # shut down while collecting or running: answer its callers
                self.stats.failures[OTHER] += _fail(batch, BatcherClosed(self._closed or "the batcher was stopped"))
                raise
            finally:
                self._forming = 0

    async def _collect(self, batch: list[_Pending]) -> None:
        """Take requests into ``batch`` until it is full, the expected requests are in, or max_latency passed."""
        assert self._wakeup is not None
        # Counted from now (the device just became free, or the first request just arrived), so
        # that requests queued behind a busy device can still wait for the clients answered last.
        deadline = time.perf_counter() + self.max_latency_s
        rows = 0
        while True:
            while self._queue and rows + len(self._queue[0].rows) <= self.max_batch_size:
                item = self._queue.popleft()
                if item.future.cancelled():  # the caller gave up (deadline): skip its work
                    self.stats.failures[CANCELED] += 1
                    continue
                batch.append(item)
                self._forming = len(batch)
                rows += len(item.rows)
            remaining = deadline - time.perf_counter()
            if rows >= self.max_batch_size or self._queue or remaining <= 0 or len(batch) >= self._expected_requests:
                return
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), remaining)

    async def _execute(self, batch: list[_Pending]) -> None:
        if not batch:
            return
        start_ns = time.perf_counter_ns()
        self._forming = 0  # executing from here on: no longer pending
        merged = batch[0].rows if len(batch) == 1 else np.concatenate([p.rows for p in batch])
        merge_ns = time.perf_counter_ns() - start_ns
        try:
            if self._closed is not None:  # shut down from another thread: its executor may be gone
                raise BatcherClosed(self._closed)
            loop = asyncio.get_running_loop()
            outputs, prepare_ns, infer_ns = await loop.run_in_executor(self._executor, self._timed_run, merged)
        except Exception as exc:  # a failing batch fails its own callers, never the server
            if self._closed is not None and not isinstance(exc, BatcherClosed):
                exc = BatcherClosed(self._closed)  # the executor refused the batch: it was shut down
            self.stats.failures[OTHER if isinstance(exc, BatcherClosed) else BACKEND] += _fail(batch, exc)
            return
        output_start_ns = time.perf_counter_ns()
        self._expected_requests = min(len(batch) + len(self._queue), self.max_batch_size)
        answered, offset = [], 0
        for pending in batch:
            n = len(pending.rows)
            if not pending.future.done():
                pending.future.set_result(outputs[offset : offset + n])
                answered.append(pending)
            offset += n
        end_ns = time.perf_counter_ns()
        durations = (merge_ns + prepare_ns, infer_ns, end_ns - output_start_ns)
        self._record(answered, len(batch) - len(answered), len(merged), start_ns, end_ns, durations)

    def _timed_run(self, merged: np.ndarray) -> tuple[np.ndarray, int, int]:
        """On the device thread: (outputs, ns preparing the input, ns inferring)."""
        start_ns = time.perf_counter_ns()
        model_input = merged if self.prepare is None else self.prepare(merged)
        prepared_ns = time.perf_counter_ns()
        outputs = self.run_batch(model_input)
        return outputs, prepared_ns - start_ns, time.perf_counter_ns() - prepared_ns

    def _record(
        self,
        answered: list[_Pending],
        cancelled: int,
        size: int,
        start_ns: int,
        end_ns: int,
        durations: tuple[int, int, int],
    ) -> None:
        stats = self.stats
        input_ns, infer_ns, output_ns = durations
        stats.inference_count += size
        stats.execution_count += 1
        stats.success_count += len(answered)
        stats.failures[CANCELED] += cancelled  # gave up while its batch ran
        queue_ns = sum(start_ns - p.enqueued_ns for p in answered)
        stats.queue_ns += queue_ns
        stats.request_ns += sum(end_ns - p.enqueued_ns for p in answered)
        stats.compute_input_ns += input_ns * len(answered)
        stats.compute_infer_ns += infer_ns * len(answered)
        stats.compute_output_ns += output_ns * len(answered)
        stats.last_inference_ms = int(time.time() * 1000)
        entry = stats.batch_sizes.setdefault(size, SizeStatistics())
        entry.count += 1
        entry.compute_input_ns += input_ns
        entry.compute_infer_ns += infer_ns
        entry.compute_output_ns += output_ns
        if self.on_batch is not None:
            self.on_batch(size, (input_ns + infer_ns) / 1e9, queue_ns / 1e9 / max(1, len(answered)))

    def shutdown(self, reason: str = "the server is shutting down") -> None:
        """Stop taking requests and fail the waiting ones with :class:`BatcherClosed`; from any thread.

        The worker task is cancelled on its own event loop (at once from that loop's thread, else
        as soon as that loop runs), and its callers, queued or in the batch being collected or run,
        get the error there. A batch already running on the device finishes there; its answer is
        dropped. A thread the batcher made itself is ended before this returns; a caller's
        executor (``executor=``) is the caller's to shut down.
        """
        if self._closed is not None:
            return
        self._closed = reason
        worker, self._worker = self._worker, None

        def fail_on_the_loop() -> None:  # on the loop's thread, so no submit() runs meanwhile
            queued = list(self._queue)
            self._queue.clear()
            self.stats.failures[OTHER] += _fail(queued, BatcherClosed(reason))
            if worker is not None:
                worker.cancel()

        # Without a worker nothing was ever queued; a closed loop took its worker and callers with it.
        loop = worker.get_loop() if worker is not None else None
        if loop is None or loop.is_closed():
            self._queue.clear()
        elif _running_loop() is loop:
            fail_on_the_loop()
        else:  # asyncio's futures and tasks belong to their loop's thread
            try:
                loop.call_soon_threadsafe(fail_on_the_loop)
            except RuntimeError:  # the loop closed meanwhile
                self._queue.clear()
        if self._owns_executor:
            self._executor.shutdown(wait=True, cancel_futures=True)

    async def close(self) -> None:
        """:meth:`shutdown` from the worker's event loop, and wait until the worker has ended."""
        worker = self._worker
        self.shutdown()
        if worker is not None and worker.get_loop() is asyncio.get_running_loop():
            with contextlib.suppress(asyncio.CancelledError):
                await worker


def _fail(batch: Iterable[_Pending], exc: BaseException) -> int:
    """Fail the callers still waiting; how many there were."""
    failed = 0
    for pending in batch:
        if not pending.future.done():
            pending.future.set_exception(exc)
            failed += 1
    return failed


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:  # this thread runs no event loop
        return None
