"""The dynamic batcher on its own: merging, ownership of rows, backpressure, failures, shutdown."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from serving.batching import BACKEND, CANCELED, OTHER, REJECTED, BatcherClosed, DynamicBatcher, QueueFull


def row_sums(batch: np.ndarray) -> np.ndarray:
    """A 'model' whose every output row identifies its input row."""
    return batch.reshape(len(batch), -1).sum(axis=1, keepdims=True)


def test_concurrent_requests_are_merged_and_each_caller_gets_its_rows() -> None:
    sizes: list[int] = []

    def model(batch: np.ndarray) -> np.ndarray:
        sizes.append(len(batch))
        time.sleep(0.01)
        return row_sums(batch)

    async def scenario() -> None:
        batcher = DynamicBatcher(model, max_batch_size=8, max_latency_ms=20, max_queue=100)
        rng = np.random.default_rng(0)
        requests = [rng.normal(size=(int(rng.integers(1, 4)), 3)).astype(np.float32) for _ in range(40)]
        answers = await asyncio.gather(*(batcher.submit(r) for r in requests))
        for request, answer in zip(requests, answers, strict=True):
            # each row's sum is the same 3 float32 additions in the same order however the rows are
            # batched: identical, not merely close (a row of another caller would be far off)
            np.testing.assert_array_equal(answer, row_sums(request))
        await batcher.close()

    asyncio.run(scenario())
    assert max(sizes) <= 8
    assert len(sizes) < 40, "requests must have been merged"


def test_a_lone_request_waits_at_most_max_latency() -> None:
    async def scenario() -> float:
        batcher = DynamicBatcher(row_sums, max_batch_size=64, max_latency_ms=30, max_queue=10)
        start = time.perf_counter()
        await batcher.submit(np.ones((1, 2), np.float32))
        await batcher.close()
        return time.perf_counter() - start

    # Not a timing assertion on the machine's speed: the batch can never fill, so without the
    # latency bound this would hang; the generous bound only catches a missing timeout.
    assert asyncio.run(asyncio.wait_for(scenario(), timeout=10)) < 5


def test_closed_loop_clients_in_two_groups_are_merged_into_full_batches() -> None:
    """Two groups of closed-loop clients, each answered while the other's batch runs, must not
    stay split: the batcher waits (within max_latency) for the group answered last."""
    sizes: list[int] = []

    def model(batch: np.ndarray) -> np.ndarray:
        sizes.append(len(batch))
        time.sleep(0.04)  # the device is busy long after the second group has queued
        return row_sums(batch)

    async def client(batcher: DynamicBatcher, start_delay: float, rounds: int) -> None:
        await asyncio.sleep(start_delay)
        for _ in range(rounds):
            await batcher.submit(np.ones((1, 2), np.float32))
            await asyncio.sleep(0.001)  # the client's own work before it sends again

    async def scenario() -> None:
        batcher = DynamicBatcher(model, max_batch_size=8, max_latency_ms=15, max_queue=100)
        # group A starts at once, group B while A's first batch is running
        await asyncio.gather(*(client(batcher, 0.0 if i < 4 else 0.01, 12) for i in range(8)))
        await batcher.close()

    asyncio.run(asyncio.wait_for(scenario(), timeout=30))
    assert sizes[0] == 4, sizes  # group B arrived while group A was already running
    assert set(sizes[1:-1]) == {8}, sizes  # merged from the second batch on; the last may be a straggler


def test_full_queue_answers_at_once() -> None:
    release = threading.Event()

    def slow(batch: np.ndarray) -> np.ndarray:
        release.wait(10)
        return row_sums(batch)

    async def scenario() -> tuple[int, int]:
        batcher = DynamicBatcher(slow, max_batch_size=1, max_latency_ms=0, max_queue=3)
        first = asyncio.ensure_future(batcher.submit(np.ones((1, 1), np.float32)))
        await asyncio.sleep(0.05)  # the first request is now running, the queue is empty
        waiting = [asyncio.ensure_future(batcher.submit(np.ones((1, 1), np.float32))) for _ in range(3)]
        await asyncio.sleep(0)
        with pytest.raises(QueueFull, match="queue is full"):
            await batcher.submit(np.ones((1, 1), np.float32))
        release.set()
        done = await asyncio.gather(first, *waiting)
        await batcher.close()
        return len(done), batcher.stats.fail_count

    answered, failed = asyncio.run(scenario())
    assert answered == 4 and failed == 1


def test_pending_count_is_what_waits_and_not_what_runs() -> None:
    """Triton's nv_inference_pending_request_count: accepted, not yet executing; right at any moment."""
    started, release = threading.Event(), threading.Event()

    def held(batch: np.ndarray) -> np.ndarray:
        started.set()
        release.wait(30)
        return row_sums(batch)

    async def scenario() -> list[int]:
        batcher = DynamicBatcher(held, max_batch_size=1, max_latency_ms=0, max_queue=10)
        seen = [batcher.pending_count]
        calls = [asyncio.ensure_future(batcher.submit(np.ones((1, 1), np.float32))) for _ in range(3)]
        await asyncio.to_thread(started.wait, 30)  # the first runs on the device, two wait
        seen.append(batcher.pending_count)
        release.set()
        await asyncio.gather(*calls)
        seen.append(batcher.pending_count)
        await batcher.close()
        return seen

    assert asyncio.run(scenario()) == [0, 2, 0]


def test_failures_are_counted_by_triton_reason() -> None:
    """REJECTED (queue full), BACKEND (the batch raised), CANCELED (caller gone), OTHER (shut down)."""
    release = threading.Event()

    def model(batch: np.ndarray) -> np.ndarray:
        release.wait(30)
        if batch[0, 0] < 0:
            raise RuntimeError("the device failed")
        return row_sums(batch)

    async def scenario() -> dict[str, int]:
        batcher = DynamicBatcher(model, max_batch_size=1, max_latency_ms=0, max_queue=2)
        running = asyncio.ensure_future(batcher.submit(-np.ones((1, 1), np.float32)))  # fails in the backend
        await asyncio.sleep(0)
        gone = asyncio.ensure_future(batcher.submit(np.ones((1, 1), np.float32)))
        kept = asyncio.ensure_future(batcher.submit(np.ones((1, 1), np.float32)))
        await asyncio.sleep(0)
        with pytest.raises(QueueFull):
            await batcher.submit(np.ones((1, 1), np.float32))
        gone.cancel()  # its caller gave up while it was queued
        release.set()
        with pytest.raises(RuntimeError, match="device failed"):
            await running
        await kept
        stuck = threading.Event()
        batcher.run_batch = lambda batch: stuck.wait(30) and row_sums(batch)
        blocked = asyncio.ensure_future(batcher.submit(np.ones((1, 1), np.float32)))
        queued = asyncio.ensure_future(batcher.submit(np.ones((1, 1), np.float32)))
        await asyncio.sleep(0)
        batcher.shutdown("stopping")  # both callers are answered with BatcherClosed
        stuck.set()
        for call in (blocked, queued):
            with pytest.raises(BatcherClosed):
                await call
        return dict(batcher.stats.failures)

    failures = asyncio.run(asyncio.wait_for(scenario(), timeout=60))
    assert failures == {REJECTED: 1, BACKEND: 1, CANCELED: 1, OTHER: 2}


def test_a_failing_batch_fails_only_its_callers_and_the_batcher_keeps_going() -> None:
    def sometimes(batch: np.ndarray) -> np.ndarray:
        if (batch < 0).any():
            raise RuntimeError("device error")
        return row_sums(batch)

    async def scenario() -> None:
        batcher = DynamicBatcher(sometimes, max_batch_size=1, max_latency_ms=0, max_queue=10)
        with pytest.raises(RuntimeError, match="device error"):
            await batcher.submit(-np.ones((1, 1), np.float32))
        good = await batcher.submit(np.full((1, 2), 2, np.float32))
        np.testing.assert_array_equal(good, [[4.0]])  # 2 + 2 is exact in float32
        await batcher.close()

    asyncio.run(scenario())


def test_statistics_count_rows_and_batches() -> None:
    async def scenario() -> DynamicBatcher:
        batcher = DynamicBatcher(row_sums, max_batch_size=4, max_latency_ms=50, max_queue=10)
        await asyncio.gather(*(batcher.submit(np.ones((1, 1), np.float32)) for _ in range(8)))
        await batcher.close()
        return batcher

    stats = asyncio.run(scenario()).stats
    assert stats.inference_count == 8
    assert stats.success_count == 8
    assert stats.execution_count == sum(sized.count for sized in stats.batch_sizes.values())
    assert stats.execution_count < 8
    assert set(stats.batch_sizes) <= {1, 2, 3, 4}


def test_oversized_request_is_refused() -> None:
    async def scenario() -> None:
        batcher = DynamicBatcher(row_sums, max_batch_size=2)
        with pytest.raises(ValueError, match="exceed the maximum batch size 2"):
            await batcher.submit(np.ones((3, 1), np.float32))
        await batcher.close()

    asyncio.run(scenario())


def test_shutdown_answers_running_and_queued_callers_and_refuses_new_ones() -> None:
    started, release = threading.Event(), threading.Event()

    def slow(batch: np.ndarray) -> np.ndarray:
        started.set()
        release.wait(10)
        return row_sums(batch)

    async def scenario() -> list[BaseException | np.ndarray]:
        batcher = DynamicBatcher(slow, max_batch_size=1, max_latency_ms=0, max_queue=10)
        running = asyncio.ensure_future(batcher.submit(np.ones((1, 1), np.float32)))
        await asyncio.get_running_loop().run_in_executor(None, started.wait, 10)  # the first batch runs
        queued = [asyncio.ensure_future(batcher.submit(np.ones((1, 1), np.float32))) for _ in range(3)]
        await asyncio.sleep(0)
        release.set()  # the running batch may finish on its thread; its answer is dropped
        batcher.shutdown("model stopped")  # from the loop's own thread, as KServe's signal handler does
        with pytest.raises(BatcherClosed, match="model stopped"):
            await batcher.submit(np.ones((1, 1), np.float32))
        return await asyncio.gather(running, *queued, return_exceptions=True)

    before = set(threading.enumerate())
    answers = asyncio.run(asyncio.wait_for(scenario(), timeout=30))
    assert all(isinstance(a, BatcherClosed) and "model stopped" in str(a) for a in answers), answers
    assert not [t for t in set(threading.enumerate()) - before if t.name.startswith("batch")]  # its thread ended


def test_shutdown_from_another_thread_answers_the_callers_on_their_loop() -> None:
    release = threading.Event()

    def slow(batch: np.ndarray) -> np.ndarray:
        release.wait(10)
        return row_sums(batch)

    async def scenario(executor: ThreadPoolExecutor) -> list[BaseException | np.ndarray]:
        batcher = DynamicBatcher(slow, max_batch_size=1, max_latency_ms=0, executor=executor)
        waiting = [asyncio.ensure_future(batcher.submit(np.ones((1, 1), np.float32))) for _ in range(3)]
        await asyncio.sleep(0.05)  # the first batch runs, two requests wait
        stopper = threading.Thread(target=batcher.shutdown, args=("stopped elsewhere",))
        stopper.start()
        stopper.join(10)  # returns at once: the executor is the caller's, so nothing to wait for
        release.set()
        answers = await asyncio.gather(*waiting, return_exceptions=True)
        await batcher.close()  # a second close does nothing
        return answers

    with ThreadPoolExecutor(max_workers=1) as executor:
        answers = asyncio.run(asyncio.wait_for(scenario(executor), timeout=30))
    assert all(isinstance(a, BatcherClosed) and "stopped elsewhere" in str(a) for a in answers), answers
