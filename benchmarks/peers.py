"""Our server next to the real peers, one run, same model: the table with the peers as columns.

    python -m serving.bench --peers --model-uri models:/top-tagger@champion [--seconds 6]

Columns: each runtime in-process (torch, ONNX Runtime, OpenVINO) at batch 1 and 16; our server on
torch and on the fastest runtime (the best in-process batch-16 rate, measured here, not assumed);
stock KServe (a plain ``kserve.Model``, no batching) on that runtime; real Triton
(``tritonserver`` 2.51) running that runtime in its Python backend with its dynamic batcher, at
its usual 2 ms queue delay and at our server's batching wait, the better one counting.
Every server gets batch-1 gRPC image requests from closed-loop clients (as CMSSW streams send):
16 clients for throughput, one client for latency.

Targets (issue 12): ours on the fastest runtime, 16 clients, ≥ 1.6× ours on torch, ≥ 0.85× the
runtime's in-process batch-16 rate, ≥ 1.0× Triton on the same runtime, ≥ 3× stock KServe;
batch-1 p50 at one client ≤ 0.35× ours on torch.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from benchmarks.common import machine, publish
from benchmarks.serving import bounded_ratio, closed_loop, percentiles, running_server, sample_inputs, timed_calls
from serving.backends import load_backend
from serving.triton_process import start_triton
from serving.triton_repository import write_repository
from toptagger.images import three_channels

RUNTIMES = ("torch", "onnxruntime", "openvino")
TRITON_DELAY_US = 2000  # Triton's dynamic batcher as its users usually set it (reference §2)
CLIENTS = 16


@dataclass
class Served:
    label: str
    rows_per_s: float  # CLIENTS batch-1 clients
    p50_ms: float  # CLIENTS clients
    single_rows_per_s: float  # one client
    single_p50_ms: float
    errors: int


def in_process(model_uri: str, images: np.ndarray, seconds: float) -> dict[str, dict[int, float]]:
    """Each runtime's own rate (jets/s) at batch 1 and at batch :data:`CLIENTS`."""
    rates: dict[str, dict[int, float]] = {}
    for runtime in RUNTIMES:
        backend = load_backend(model_uri, runtime)
        rates[runtime] = {}
        for batch in (1, CLIENTS):
            x = np.ascontiguousarray(np.resize(images, (batch, *images.shape[1:])))
            rates[runtime][batch] = batch / float(np.mean(timed_calls(backend, x, seconds)))
        del backend
    return rates


def measure(label: str, grpc_url: str, image: np.ndarray, seconds: float) -> Served:
    many = asyncio.run(closed_loop(grpc_url, CLIENTS, image, "images", seconds))
    one = asyncio.run(closed_loop(grpc_url, 1, image, "images", seconds))
    p50, single_p50 = percentiles(many.latencies)[0], percentiles(one.latencies)[0]
    return Served(label, many.rows_per_s, p50, one.rows_per_s, single_p50, many.errors + one.errors)


@contextmanager
def triton(model_uri: str, runtime: str, delay_us: int, max_batch_size: int) -> Iterator[str]:
    """Real Triton on a repository written for ``runtime``; yields its gRPC URL."""
    repo_root = str(Path(__file__).resolve().parents[1])
    with tempfile.TemporaryDirectory(prefix="top-tagger-triton-repo-") as repository:
        write_repository(model_uri, repository, runtime, max_batch_size, delay_us, python_path=repo_root)
        with start_triton(repository) as server:
            yield server.grpc_url


def run(model_uri: str, seconds: float, max_batch_size: int, max_latency_ms: float, out: Path | None) -> dict:
    from tqdm import tqdm

    reference = load_backend(model_uri, "torch")
    _, images = sample_inputs(reference)
    del reference
    rates = in_process(model_uri, images, seconds)
    fastest = max(RUNTIMES, key=lambda r: rates[r][CLIENTS])
    # Three channels, as CMSSW's producer sends them and as Triton's config declares them.
    image = np.ascontiguousarray(three_channels(images[:1]))
    ours = ["--max-batch-size", str(max_batch_size), "--max-latency-ms", str(max_latency_ms)]
    plan = [
        ("ours, torch", lambda: running_server("serving", model_uri, [*ours, "--backend", "torch"])),
        (f"ours, {fastest}", lambda: running_server("serving", model_uri, [*ours, "--backend", fastest])),
        (f"stock KServe, {fastest}",
         lambda: running_server("benchmarks.stock_kserve", model_uri, ["--backend", fastest])),
        (f"Triton, {fastest}, {TRITON_DELAY_US} µs",
         lambda: _as_urls(triton(model_uri, fastest, TRITON_DELAY_US, max_batch_size))),
        (f"Triton, {fastest}, {round(max_latency_ms * 1000)} µs",
         lambda: _as_urls(triton(model_uri, fastest, round(max_latency_ms * 1000), max_batch_size))),
    ]  # fmt: skip
    served: list[Served] = []
    for label, start in tqdm(plan, desc="servers", unit="server"):
        with start() as urls:
            served.append(measure(label, urls["grpc"], image, seconds))
    result = {"machine": machine(), "model_uri": model_uri, "fastest": fastest, "in_process": rates,
              "served": [asdict(s) for s in served], "seconds": seconds, "max_latency_ms": max_latency_ms}  # fmt: skip
    report = markdown(result)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "peers.json").write_text(json.dumps(result, indent=2) + "\n")
        publish(report, out / "peers.md")
    else:
        publish(report, None)
    return result


@contextmanager
def _as_urls(grpc_urls: Iterator[str]) -> Iterator[dict[str, str]]:
    with grpc_urls as url:
        yield {"grpc": url}


def markdown(result: dict) -> str:
    rates, fastest = result["in_process"], result["fastest"]
    served = {s["label"]: s for s in result["served"]}
    ours, torch_server = served[f"ours, {fastest}"], served["ours, torch"]
    stock = served[f"stock KServe, {fastest}"]
    tritons = [s for label, s in served.items() if label.startswith("Triton")]
    best_triton = max(tritons, key=lambda s: s["rows_per_s"])
    columns = [f"in-process {r}" for r in RUNTIMES] + list(served)
    lines = [
        "# Serving next to the peers (one run, same model)",
        "",
        f"Machine: {result['machine']}. Model: `{result['model_uri']}`. {result['seconds']:g} s per measurement; "
        f"our batching wait {result['max_latency_ms']:g} ms. Fastest runtime in-process at batch {CLIENTS}: "
        f"**{fastest}**. Command: `python -m serving.bench --peers --model-uri {result['model_uri']}`.",
        "",
        "| | " + " | ".join(columns) + " |",
        "|---" * (len(columns) + 1) + "|",
        _row("batch 1 / 1 client, jets/s", [_rate(rates[r], 1) for r in RUNTIMES], served, "single_rows_per_s",
             "{:.0f}"),
        _row(f"batch {CLIENTS} / {CLIENTS} clients, jets/s", [_rate(rates[r], CLIENTS) for r in RUNTIMES], served,
             "rows_per_s", "{:.0f}"),
        _row("p50 at 1 client, ms", [None] * len(RUNTIMES), served, "single_p50_ms", "{:.2f}"),
        _row(f"p50 at {CLIENTS} clients, ms", [None] * len(RUNTIMES), served, "p50_ms", "{:.2f}"),
        _row("errors", [None] * len(RUNTIMES), served, "errors", "{}"),
        "",
        "| ratio (one run) | result | target |",
        "|---|---|---|",
        f"| ours on {fastest} / ours on torch, {CLIENTS} clients | "
        f"{ours['rows_per_s'] / torch_server['rows_per_s']:.2f}× | ≥ 1.6× |",
        f"| ours on {fastest}, {CLIENTS} clients / {fastest} in-process at batch {CLIENTS} | "
        f"{bounded_ratio(ours['rows_per_s'], _rate(rates[fastest], CLIENTS), 'in-process')} | ≥ 0.85× |",
        f"| ours on {fastest} / {best_triton['label']} (the better Triton), {CLIENTS} clients | "
        f"{ours['rows_per_s'] / best_triton['rows_per_s']:.2f}× | ≥ 1.0× |",
        f"| ours on {fastest} / stock KServe on {fastest}, {CLIENTS} clients | "
        f"{ours['rows_per_s'] / stock['rows_per_s']:.2f}× | ≥ 3× |",
        f"| p50 at 1 client, ours on {fastest} / ours on torch | "
        f"{ours['single_p50_ms'] / torch_server['single_p50_ms']:.2f}× | ≤ 0.35× |",
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def _row(name: str, in_process: list, served: dict[str, dict], key: str, form: str) -> str:
    cells = ["—" if v is None else form.format(v) for v in in_process]
    cells += [form.format(s[key]) for s in served.values()]
    return f"| {name} | " + " | ".join(cells) + " |"


def _rate(rates: dict, batch: int) -> float:
    return float(rates[batch] if batch in rates else rates[str(batch)])  # keys are strings after JSON
