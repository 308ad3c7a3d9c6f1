"""Our server next to the real peers, one run, same model: the table with the peers as columns.

    python -m benchmarks.serving --peers --model-uri models:/top-tagger@champion [--seconds 6]

Columns: each runtime in-process (torch, ONNX Runtime, OpenVINO) at batch 1 and 16; our server on
torch and on the fastest runtime (the best in-process batch-16 rate, measured here, not assumed);
stock KServe (a plain ``kserve.Model``, no batching) on that runtime; real Triton
(``tritonserver`` 2.51) running that runtime in its Python backend with its dynamic batcher, at
its usual 2 ms queue delay and at our server's batching wait, the better one counting.
Every server gets batch-1 gRPC image requests from closed-loop clients (as CMSSW streams send):
16 clients for throughput, one client for latency.

These 2 shared cores drift by ±20 % within minutes, more than the differences measured. So every
server runs for the whole benchmark (idle ones cost nothing), and the measurements go in rounds,
each round every runtime and server once, one after another; each cell is the median over the
rounds, and the ratios are of medians, so that a slow minute hits every column alike.

Targets (issue 12): ours on the fastest runtime, 16 clients, ≥ 1.6× ours on torch, ≥ 0.85× the
runtime's in-process batch-16 rate, ≥ 1.0× Triton on the same runtime, ≥ 3× stock KServe;
batch-1 p50 at one client ≤ 0.35× ours on torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.common import machine, publish
from benchmarks.measure import bounded_ratio, closed_loop, percentiles, running_server, sample_inputs, timed_calls
from serving.backends import load_backend
from serving.triton.process import start_triton
from serving.triton.repository import write_repository
from toptagger.images import three_channels
from toptagger.storage import atomic_output

RUNTIMES = ("torch", "onnxruntime", "openvino")
TRITON_DELAY_US = 2000  # Triton's dynamic batcher as its users usually set it (reference §2)
CLIENTS = 16
ROUNDS = 3


@dataclass
class Served:
    """One server's measurements, one entry per round."""

    label: str
    rows_per_s: list[float] = field(default_factory=list)  # CLIENTS batch-1 clients
    p50_ms: list[float] = field(default_factory=list)  # CLIENTS clients
    single_rows_per_s: list[float] = field(default_factory=list)  # one client
    single_p50_ms: list[float] = field(default_factory=list)
    errors: int = 0

    def measure(self, grpc_url: str, image: np.ndarray, seconds: float) -> None:
        many = asyncio.run(closed_loop(grpc_url, CLIENTS, image, "images", seconds))
        one = asyncio.run(closed_loop(grpc_url, 1, image, "images", seconds))
        self.rows_per_s.append(many.rows_per_s)
        self.p50_ms.append(percentiles(many.latencies)[0])
        self.single_rows_per_s.append(one.rows_per_s)
        self.single_p50_ms.append(percentiles(one.latencies)[0])
        self.errors += many.errors + one.errors


def in_process(model_uri: str, images: np.ndarray, seconds: float, rounds: int) -> dict[str, dict[int, list[float]]]:
    """Each runtime's own rate (jets/s) at batch 1 and at batch :data:`CLIENTS`, one entry per round."""
    backends = {runtime: load_backend(model_uri, runtime) for runtime in RUNTIMES}
    inputs = {batch: np.ascontiguousarray(np.resize(images, (batch, *images.shape[1:]))) for batch in (1, CLIENTS)}
    rates: dict[str, dict[int, list[float]]] = {runtime: {batch: [] for batch in inputs} for runtime in RUNTIMES}
    for _ in range(rounds):
        for runtime, backend in backends.items():
            for batch, x in inputs.items():
                rates[runtime][batch].append(batch / float(np.mean(timed_calls(backend, x, seconds))))
    return rates


@contextlib.contextmanager
def triton(model_uri: str, runtime: str, delay_us: int, max_batch_size: int) -> Iterator[dict[str, str]]:
    """Real Triton on a repository written for ``runtime``; yields its gRPC URL as ``{"grpc": url}``."""
    repo_root = str(Path(__file__).resolve().parents[1])
    with tempfile.TemporaryDirectory(prefix="top-tagger-triton-repo-") as repository:
        write_repository(model_uri, repository, runtime, max_batch_size, delay_us, python_path=repo_root)
        with start_triton(repository) as server:
            yield {"grpc": server.grpc_url}


def servers(model_uri: str, fastest: str, max_batch_size: int, max_latency_ms: float) -> list[tuple[str, Callable]]:
    """(label, context manager yielding URLs) for every served column."""
    ours = ["--max-batch-size", str(max_batch_size), "--max-latency-ms", str(max_latency_ms)]
    wait_us = round(max_latency_ms * 1000)
    return [
        ("ours, torch", lambda: running_server("serving", model_uri, [*ours, "--backend", "torch"])),
        (f"ours, {fastest}", lambda: running_server("serving", model_uri, [*ours, "--backend", fastest])),
        (f"stock KServe, {fastest}",
         lambda: running_server("benchmarks.stock_kserve", model_uri, ["--backend", fastest])),
        (f"Triton, {fastest}, {TRITON_DELAY_US} µs",
         lambda: triton(model_uri, fastest, TRITON_DELAY_US, max_batch_size)),
        (f"Triton, {fastest}, {wait_us} µs", lambda: triton(model_uri, fastest, wait_us, max_batch_size)),
    ]  # fmt: skip


def run(
    model_uri: str, seconds: float, max_batch_size: int, max_latency_ms: float, out: Path | None, rounds: int = ROUNDS
) -> dict:
    from tqdm import tqdm

    reference = load_backend(model_uri, "torch")
    _, images = sample_inputs(reference)
    del reference
    rates = in_process(model_uri, images, seconds, rounds)
    fastest = max(RUNTIMES, key=lambda r: statistics.median(rates[r][CLIENTS]))
    # Three channels, as CMSSW's producer sends them and as Triton's config declares them.
    image = np.ascontiguousarray(three_channels(images[:1]))
    plan = servers(model_uri, fastest, max_batch_size, max_latency_ms)
    served = [Served(label) for label, _ in plan]
    with contextlib.ExitStack() as running:
        starting = tqdm(plan, desc="starting servers", unit="server")
        urls = [running.enter_context(start())["grpc"] for _, start in starting]
        with tqdm(total=rounds * len(plan), desc="measuring (rounds x servers)", unit="server") as progress:
            for _ in range(rounds):
                for column, url in zip(served, urls, strict=True):
                    column.measure(url, image, seconds)
                    progress.update()
    result = {"machine": machine(), "model_uri": model_uri, "fastest": fastest, "in_process": rates,
              "served": [asdict(s) for s in served], "seconds": seconds, "rounds": rounds,
              "max_latency_ms": max_latency_ms}  # fmt: skip
    report = markdown(result)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        with atomic_output(out / "peers.json") as path:
            path.write_text(json.dumps(result, indent=2) + "\n")
        publish(report, out / "peers.md")
    else:
        publish(report, None)
    return result


def markdown(result: dict) -> str:
    """The table (medians over the rounds, the slowest and fastest round beside throughputs) and the ratios."""
    rates, fastest, rounds = result["in_process"], result["fastest"], result.get("rounds", 1)
    served = {s["label"]: s for s in result["served"]}
    ours, torch_server = _medians(served[f"ours, {fastest}"]), _medians(served["ours, torch"])
    stock = _medians(served[f"stock KServe, {fastest}"])
    tritons = {label: _medians(s) for label, s in served.items() if label.startswith("Triton")}
    best_triton = max(tritons, key=lambda label: tritons[label]["rows_per_s"])
    columns = [f"in-process {r}" for r in RUNTIMES] + list(served)
    lines = [
        "# Serving next to the peers (one run, same model)",
        "",
        f"Machine: {result['machine']}. Model: `{result['model_uri']}`. {rounds} round(s), each measuring every "
        f"column for {result['seconds']:g} s in turn; a cell is the median over the rounds, [slowest–fastest "
        f"round] beside throughputs. Our batching wait {result['max_latency_ms']:g} ms. Fastest runtime "
        f"in-process at batch {CLIENTS}: **{fastest}**. Command: `python -m benchmarks.serving --peers --model-uri "
        f"{result['model_uri']} --seconds {result['seconds']:g} --rounds {rounds}`.",
        "",
        "| | " + " | ".join(columns) + " |",
        "|---" * (len(columns) + 1) + "|",
        _row("batch 1 / 1 client, jets/s", [_rate(rates[r], 1) for r in RUNTIMES], served, "single_rows_per_s", True),
        _row(f"batch {CLIENTS} / {CLIENTS} clients, jets/s", [_rate(rates[r], CLIENTS) for r in RUNTIMES], served,
             "rows_per_s", True),
        _row("p50 at 1 client, ms", [None] * len(RUNTIMES), served, "single_p50_ms", False),
        _row(f"p50 at {CLIENTS} clients, ms", [None] * len(RUNTIMES), served, "p50_ms", False),
        "| errors | " + " | ".join(["—"] * len(RUNTIMES) + [str(s["errors"]) for s in served.values()]) + " |",
        "",
        "| ratio (medians, one run) | result | target |",
        "|---|---|---|",
        f"| ours on {fastest} / ours on torch, {CLIENTS} clients | "
        f"{ours['rows_per_s'] / torch_server['rows_per_s']:.2f}× | ≥ 1.6× |",
        f"| ours on {fastest}, {CLIENTS} clients / {fastest} in-process at batch {CLIENTS} | "
        f"{bounded_ratio(ours['rows_per_s'], statistics.median(_rate(rates[fastest], CLIENTS)), 'in-process')} "
        "| ≥ 0.85× |",
        f"| ours on {fastest} / {best_triton} (the better Triton), {CLIENTS} clients | "
        f"{ours['rows_per_s'] / tritons[best_triton]['rows_per_s']:.2f}× | ≥ 1.0× |",
        f"| ours on {fastest} / stock KServe on {fastest}, {CLIENTS} clients | "
        f"{ours['rows_per_s'] / stock['rows_per_s']:.2f}× | ≥ 3× |",
        f"| p50 at 1 client, ours on {fastest} / ours on torch | "
        f"{ours['single_p50_ms'] / torch_server['single_p50_ms']:.2f}× | ≤ 0.35× |",
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def _medians(served: dict) -> dict[str, float]:
    return {key: statistics.median(_rounds(served[key])) for key in ("rows_per_s", "p50_ms", "single_rows_per_s",
                                                                      "single_p50_ms")}  # fmt: skip


def _cell(values: list[float] | float | None, spread: bool) -> str:
    if values is None:
        return "—"
    values = _rounds(values)
    median = statistics.median(values)
    if not spread:
        return f"{median:.2f}"
    return f"{median:.0f} [{min(values):.0f}–{max(values):.0f}]" if len(values) > 1 else f"{median:.0f}"


def _row(name: str, in_process: list, served: dict[str, dict], key: str, spread: bool) -> str:
    cells = [_cell(v, spread) for v in in_process] + [_cell(s[key], spread) for s in served.values()]
    return f"| {name} | " + " | ".join(cells) + " |"


def _rounds(values: list[float] | float) -> list[float]:
    return [float(v) for v in values] if isinstance(values, list) else [float(values)]  # one number: a one-round run


def _rate(rates: dict, batch: int) -> list[float]:
    return _rounds(rates[batch] if batch in rates else rates[str(batch)])  # keys are strings after JSON
