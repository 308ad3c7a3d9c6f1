"""How the serving benchmarks measure: servers on free ports, closed-loop clients, in-process calls.

Shared by :mod:`benchmarks.serving` (the throughput sweep) and :mod:`benchmarks.peers` (our server
next to its peers), so that both tables come from the same load generator and the same
statistics; it imports neither of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from serving.backends import Backend
from serving.client import InferenceFailed, TaggerClient
from serving.process import free_port, start_local
from toptagger.constants import MODEL_NAME
from toptagger.errors import ConfigError


@dataclass
class LoadResult:
    rows_per_s: int
    latencies: list[float]
    errors: int
    device_busy: float | None  # from the server's compute-time metric, when a probe was given


@contextlib.contextmanager
def running_server(module: str, model_uri: str, extra: Sequence[str] = (), timeout: float = 180) -> Iterator[dict]:
    """Start ``python -m <module>`` on free ports; yield its URLs; stop it afterwards."""
    http, grpc = free_port(), free_port()
    if module == "serving":
        # Triton's metrics on a free port too: the default (8002) is taken by a second server
        extra = ["--metrics-port", str(free_port()), *extra]
        with start_local(model_uri, http_port=http, grpc_port=grpc, extra_args=extra, timeout_s=timeout) as server:
            yield {"grpc": server.grpc_url, "rest": server.url}
        return
    # The stock-KServe peer: a plain ModelServer, which only becomes reachable once loaded.
    import httpx

    command = [
        sys.executable,
        "-m",
        module,
        "--model-uri",
        model_uri,
        "--http-port",
        str(http),
        "--grpc-port",
        str(grpc),
    ]
    process = subprocess.Popen([*command, *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise ConfigError(f"{module} exited with status {process.returncode} before becoming ready")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{http}/v2/models/{MODEL_NAME}/ready", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise ConfigError(f"{module} not ready after {timeout} s")
            time.sleep(0.2)
        yield {"grpc": f"grpc://127.0.0.1:{grpc}", "rest": f"http://127.0.0.1:{http}"}
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


def percentiles(latencies: list[float]) -> tuple[float, float, float]:
    if not latencies:
        return (float("nan"),) * 3
    p50, p90, p99 = np.percentile(np.asarray(latencies) * 1e3, [50, 90, 99])
    return float(p50), float(p90), float(p99)


async def closed_loop(
    url: str,
    clients: int,
    payload: np.ndarray,
    kind: str,
    seconds: float,
    busy_probe: Callable[[], float] | None = None,
) -> LoadResult:
    """``clients`` clients, each with its own connection, sending back-to-back for ``seconds``.

    ``busy_probe`` (the server's cumulative compute seconds) turns into the share of the timed
    window the model was busy: what the serving path leaves the device idle is 1 minus that.
    """
    latencies: list[float] = []
    errors = 0
    sessions = [TaggerClient(url, deadline_s=30) for _ in range(clients)]
    stop_at = 0.0

    async def client(session: TaggerClient) -> None:
        nonlocal errors
        while time.perf_counter() < stop_at:
            start = time.perf_counter()
            try:
                await session.infer(**{kind: payload})
            except InferenceFailed:
                errors += 1
                continue
            latencies.append(time.perf_counter() - start)

    try:
        # warm-up: one request per client, not timed; a refusal here (a slow or busy machine under
        # --max-queue-ms) is not a result, and the timed loop counts its own failures
        await asyncio.gather(*(s.infer(**{kind: payload}) for s in sessions), return_exceptions=True)
        busy_start = busy_probe() if busy_probe else 0.0
        start = time.perf_counter()
        stop_at = start + seconds
        await asyncio.gather(*(client(s) for s in sessions))
        elapsed = time.perf_counter() - start
        busy = (busy_probe() - busy_start) / elapsed if busy_probe else None
    finally:
        await asyncio.gather(*(s.close() for s in sessions))
    return LoadResult(int(len(latencies) / elapsed * len(payload)), latencies, errors, busy)


def timed_calls(backend: Backend, x: np.ndarray, seconds: float) -> list[float]:
    """Back-to-back in-process calls for ``seconds`` (after one warm-up call); each call's time."""
    backend.predict(x)
    times = []
    stop_at = time.perf_counter() + seconds
    while time.perf_counter() < stop_at:
        start = time.perf_counter()
        backend.predict(x)
        times.append(time.perf_counter() - start)
    return times


def sample_inputs(backend: Backend, n: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Real generated jets, and their images rendered as the model expects."""
    from toptagger.jets.generator import generate_jets

    jets = generate_jets(n // 2, n - n // 2, seed=31, workers=2).constituents
    images = np.ascontiguousarray(backend.render(jets))
    return jets, images


# A served rate cannot beat the same model called in-process: a ratio above this is noise in one of
# the two measurements (the machine's speed drifts), and is flagged instead of reported.
MAX_RATIO_TO_BOUND = 1.05


def bounded_ratio(value: float, bound: float, name: str) -> str:
    """``0.87× <name>``, or that ratio flagged as a measurement error where it exceeds its in-process bound."""
    ratio = value / bound
    if ratio > MAX_RATIO_TO_BOUND:
        return f"{ratio:.2f}× {name} (MEASUREMENT ERROR: above its in-process bound; measure longer, --seconds)"
    return f"{ratio:.2f}× {name}"
