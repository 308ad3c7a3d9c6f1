"""The paper's throughput study, against our predictor on loopback.

    python -m benchmarks.serving --model-uri DIR [--clients 1,2,4,8,16,32,64] [--batch-sizes 1,4,16]
                            [--protocols grpc,rest] [--inputs images,constituents] [--seconds 4]
                            [--out docs/benchmarks/serving] [--mlflow-run-id RUN]

In one run it measures:
- the *ceiling*: the same backend called in-process, at each batch size (best batch = ceiling);
- our server: closed-loop clients (each sends its next request when the answer arrives, as a
  CMSSW stream does), swept over simultaneous clients, batch sizes, protocols and input kinds;
- the *peer*: the same model behind a stock ``kserve.Model`` without batching (16 clients);
- batch-1 latency: one gRPC client and the in-process call, in alternating slices;
- for each point, the share of the time the model was computing (the server's own metric);
- bytes on the wire per jet for constituents against 224x224x3 images.

It writes ``serving_bench.json``, two PNG plots and a Markdown table, and logs them to MLflow
when ``--mlflow-run-id`` is given. Ratios, not absolute numbers, are the result: the machine is
shared and the load generator runs on the same cores as the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from benchmarks.common import machine
from benchmarks.fleet import add_arguments as fleet_arguments
from benchmarks.measure import bounded_ratio, closed_loop, percentiles, running_server, sample_inputs, timed_calls
from serving.backends import BACKENDS, PRECISIONS, Backend, load_backend
from toptagger.cli import positive_int, run_cli
from toptagger.constants import MODEL_NAME, N_CONSTITUENTS

PAPER_IMAGE_BYTES = 224 * 224 * 3 * 4


@dataclass
class Point:
    server: str
    protocol: str
    input: str
    clients: int
    batch: int
    requests: int
    rows_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    errors: int
    device_busy: float | None = None  # share of the timed window the model was computing (ours only)


def parse_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"values must be >= 1, got {text!r}")
    return values


def compute_seconds(rest_url: str) -> float:
    """The server's cumulative model compute time (``toptagger_compute_seconds_sum`` in /metrics)."""
    import httpx

    lines = httpx.get(f"{rest_url}/metrics", timeout=10).text.splitlines()
    return sum(float(line.split()[-1]) for line in lines if line.startswith("toptagger_compute_seconds_sum"))


def measure_point(
    server: str,
    url: str,
    protocol: str,
    kind: str,
    clients: int,
    payload: np.ndarray,
    seconds: float,
    metrics_url: str | None = None,
) -> Point:
    probe = (lambda: compute_seconds(metrics_url)) if metrics_url else None
    load = asyncio.run(closed_loop(url, clients, payload, kind, seconds, probe))
    p50, p90, p99 = percentiles(load.latencies)
    return Point(
        server,
        protocol,
        kind,
        clients,
        len(payload),
        len(load.latencies),
        load.rows_per_s,
        p50,
        p90,
        p99,
        load.errors,
        load.device_busy,
    )


def in_process_ceiling(backend: Backend, images: np.ndarray, batch_sizes: Sequence[int], seconds: float) -> dict:
    """Throughput of the backend called directly, per batch size, and its latency."""
    result: dict = {"throughput": {}, "latency_ms": {}}
    for batch in batch_sizes:
        x = np.ascontiguousarray(np.resize(images, (batch, *images.shape[1:])))
        times = timed_calls(backend, x, seconds)
        result["throughput"][batch] = batch / float(np.mean(times))
        result["latency_ms"][batch] = percentiles(times)
    result["best_batch"] = max(result["throughput"], key=result["throughput"].get)
    result["best_throughput"] = result["throughput"][result["best_batch"]]
    return result


def wire_bytes_per_jet() -> dict:
    """Serialized v2 gRPC request size per jet, constituents against the paper's 224x224x3 images."""
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb

    sizes = {}
    for name, shape in (("constituents", (1, N_CONSTITUENTS, 4)), ("images", (1, 3, 224, 224))):
        request = pb.ModelInferRequest(model_name=MODEL_NAME, id="0" * 32)
        request.inputs.add(name=name, datatype="FP32", shape=list(shape))
        request.raw_input_contents.append(np.zeros(shape, np.float32).tobytes())
        sizes[name] = request.ByteSize()
    sizes["ratio"] = sizes["images"] / sizes["constituents"]
    return sizes


def paired_latency(url: str, backend: Backend, image: np.ndarray, rounds: int, seconds: float) -> dict:
    """Batch-1 latency through the server (one gRPC client) and in-process, in alternating slices.

    On a shared machine the model's own speed drifts by several percent within minutes, as much as
    the overhead being measured; alternating short slices exposes both sides to the same drift.
    """
    served: list[float] = []
    local: list[float] = []
    for _ in range(rounds):
        served += asyncio.run(closed_loop(url, 1, image, "images", seconds)).latencies
        local += timed_calls(backend, image, seconds)
    return {"served_ms": percentiles(served), "in_process_ms": percentiles(local), "rounds": rounds}


def plot(points: list[Point], ceiling: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (protocol, kind), group in _groups(points, batch=1).items():
        group.sort(key=lambda p: p.clients)
        ax.plot([p.clients for p in group], [p.rows_per_s for p in group], "o-", label=f"ours, {protocol}, {kind}")
    stock = [p for p in points if p.server == "stock"]
    if stock:
        ax.plot([p.clients for p in stock], [p.rows_per_s for p in stock], "s", color="k", label="stock KServe, gRPC")
    ax.axhline(
        ceiling["best_throughput"], color="grey", ls="--", label=f"in-process ceiling (batch {ceiling['best_batch']})"
    )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("simultaneous clients (batch 1 each)")
    ax.set_ylabel("jets / s")
    ax.set_title("Throughput vs simultaneous clients")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "throughput_vs_clients.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (protocol, kind), group in _groups(points, clients=1).items():
        group.sort(key=lambda p: p.batch)
        ax.plot([p.batch for p in group], [p.p50_ms for p in group], "o-", label=f"{protocol}, {kind}, p50")
        ax.plot([p.batch for p in group], [p.p99_ms for p in group], "x:", label=f"{protocol}, {kind}, p99")
    batches = sorted(ceiling["latency_ms"])
    ax.plot(batches, [ceiling["latency_ms"][b][0] for b in batches], "k--", label="in-process p50")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size (one client)")
    ax.set_ylabel("latency [ms]")
    ax.set_title("Latency vs batch size")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "latency_vs_batch.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def _groups(points: list[Point], **fixed: int) -> dict[tuple[str, str], list[Point]]:
    groups: dict[tuple[str, str], list[Point]] = {}
    for p in points:
        if p.server == "ours" and all(getattr(p, k) == v for k, v in fixed.items()):
            groups.setdefault((p.protocol, p.input), []).append(p)
    return groups


def summary_rows(
    points: list[Point], ceiling: dict, wire: dict, headline_clients: int, latency: dict | None = None
) -> list[tuple[str, str, str]]:
    rows = [
        (
            "in-process ceiling (best batch)",
            f"{ceiling['best_throughput']:.0f} jets/s at batch {ceiling['best_batch']}",
            "—",
        ),
    ]
    ours = next(
        (
            p
            for p in points
            if (p.server, p.protocol, p.input, p.clients, p.batch) == ("ours", "grpc", "images", headline_clients, 1)
        ),
        None,
    )
    stock = next((p for p in points if p.server == "stock"), None)
    if ours:
        rows.append(
            (
                f"ours, {headline_clients} gRPC clients, batch 1",
                f"{ours.rows_per_s:.0f} jets/s = "
                + bounded_ratio(ours.rows_per_s, ceiling["best_throughput"], "ceiling")
                + (f"; model busy {ours.device_busy:.0%} of the time" if ours.device_busy is not None else ""),
                "≥ 0.9× ceiling",
            )
        )
        # N closed-loop batch-1 clients never have more than N rows in flight, so no batch can
        # exceed N: the in-process rate at batch N bounds what they can get from any server.
        bound = ceiling["throughput"].get(headline_clients)
        if bound:
            rows.append(
                (
                    f"in-process at batch {headline_clients} (the largest batch {headline_clients} batch-1 clients "
                    "can form)",
                    f"{bound:.0f} jets/s = {bound / ceiling['best_throughput']:.2f}× ceiling; ours = "
                    f"{bounded_ratio(ours.rows_per_s, bound, 'this bound')}",
                    "—",
                )
            )
    if ours and stock and stock.rows_per_s > 0:
        rows.append(
            (
                f"stock KServe, {stock.clients} gRPC clients, batch 1",
                f"{stock.rows_per_s:.0f} jets/s; ours = {ours.rows_per_s / stock.rows_per_s:.2f}× stock",
                "ours ≥ 3× stock",
            )
        )
    if latency:
        (p50, _, p99), base = latency["served_ms"], latency["in_process_ms"][0]
        rows.append(
            (
                f"batch-1 latency, 1 gRPC client ({latency['rounds']} alternating slices with in-process)",
                f"p50 {p50:.2f} ms (+{p50 - base:.2f} ms over in-process {base:.2f} ms), "
                f"p99 {p99:.2f} ms = {p99 / p50:.2f}× p50",
                "overhead ≤ 2 ms; p99 ≤ 2× p50",
            )
        )
    rows.append(
        (
            "bytes per jet on the wire (gRPC)",
            f"constituents {wire['constituents']:,} B, 224×224×3 image "
            f"{wire['images']:,} B: {wire['ratio']:.0f}× smaller",
            "≥ 150×",
        )
    )
    return rows


def markdown(rows: list[tuple[str, str, str]], points: list[Point]) -> str:
    lines = ["| measurement | result | target |", "|---|---|---|", *[f"| {a} | {b} | {c} |" for a, b, c in rows], ""]
    lines += [
        "| server | protocol | input | clients | batch | jets/s | p50 ms | p90 ms | p99 ms | errors | model busy |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in points:
        busy = f"{p.device_busy:.0%}" if p.device_busy is not None else "—"
        lines.append(
            f"| {p.server} | {p.protocol} | {p.input} | {p.clients} | {p.batch} | {p.rows_per_s:.0f} | "
            f"{p.p50_ms:.2f} | {p.p90_ms:.2f} | {p.p99_ms:.2f} | {p.errors} | {busy} |"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict:
    from tqdm import tqdm

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    # First: a bad URI fails before any generation. The ceiling is this backend's, in-process.
    backend = load_backend(args.model_uri, args.backend, precision=args.precision)
    jets, images = sample_inputs(backend)
    ceiling_batches = sorted({1, *args.batch_sizes, args.headline_clients, 32, 64})
    ceiling = in_process_ceiling(backend, images, ceiling_batches, args.seconds)
    latency = None
    payloads = {"images": images, "constituents": jets}
    plan = [(c, 1) for c in args.clients] + [(1, b) for b in args.batch_sizes if b != 1]
    points: list[Point] = []
    server_options = ["--max-batch-size", str(args.max_batch_size), "--max-latency-ms", str(args.max_latency_ms)]
    # Exactly what the ceiling measured (auto resolved once, here), not a second auto choice in the server.
    server_options += ["--backend", backend.kind, "--precision", backend.precision]
    with running_server("serving", args.model_uri, server_options) as urls:
        combos = [(p, k, c, b) for p in args.protocols for k in args.inputs for c, b in plan]
        for protocol, kind, clients, batch in tqdm(combos, desc="serving sweep", unit="point"):
            payload = np.ascontiguousarray(np.resize(payloads[kind], (batch, *payloads[kind].shape[1:])))
            points.append(
                measure_point("ours", urls[protocol], protocol, kind, clients, payload, args.seconds, urls["rest"])
            )
        if "grpc" in args.protocols:
            latency = paired_latency(urls["grpc"], backend, images[:1], rounds=4, seconds=args.seconds / 4)
    if not args.no_stock:
        with running_server("benchmarks.stock_kserve", args.model_uri) as urls:
            points.append(
                measure_point("stock", urls["grpc"], "grpc", "images", args.headline_clients, images[:1], args.seconds)
            )
    wire = wire_bytes_per_jet()
    rows = summary_rows(points, ceiling, wire, args.headline_clients, latency)
    result = {
        "ceiling": ceiling,
        "latency": latency,
        "points": [asdict(p) for p in points],
        "wire_bytes": wire,
        "summary": rows,
        "machine": machine(),
        "model_uri": args.model_uri,
        "backend": backend.description,
    }
    (out / "serving_bench.json").write_text(json.dumps(result, indent=2, default=str))
    pngs = plot(points, ceiling, out)
    table = markdown(rows, points)
    (out / "serving_bench.md").write_text(table + "\n")
    print(table)
    if args.mlflow_run_id:
        import mlflow

        with mlflow.start_run(run_id=args.mlflow_run_id):
            for path in [out / "serving_bench.json", out / "serving_bench.md", *pngs]:
                mlflow.log_artifact(str(path), artifact_path="serving_bench")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    import logging

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serving", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-uri", required=True, help="model folder, s3:// or models:/ URI")
    parser.add_argument(
        "--clients", type=parse_list, default=None, help="simultaneous clients (default 1,2,4,...,64; --fleet: 1,16,64)"
    )
    parser.add_argument("--batch-sizes", type=parse_list, default=[1, 4, 16])
    parser.add_argument("--protocols", default="grpc,rest", type=lambda s: s.split(","))
    parser.add_argument("--inputs", default="images,constituents", type=lambda s: s.split(","))
    parser.add_argument("--seconds", type=float, default=4.0, help="measuring time per point")
    parser.add_argument("--backend", choices=list(BACKENDS), default="torch", help="our server's and the ceiling's")
    parser.add_argument(
        "--precision",
        choices=list(PRECISIONS),
        default="fp32",
        help="our server's and the ceiling's (auto: the fastest admitted)",
    )
    parser.add_argument("--max-batch-size", type=positive_int, default=16)
    parser.add_argument(
        "--max-latency-ms",
        type=float,
        default=20.0,
        help="server batching wait; 16 closed-loop clients on these 2 shared cores need ~10 ms to send again",
    )
    parser.add_argument("--headline-clients", type=positive_int, default=16, help="client count of the headline ratios")
    parser.add_argument("--no-stock", action="store_true", help="skip the stock-KServe peer")
    parser.add_argument(
        "--peers",
        action="store_true",
        help="instead of the sweep: every runtime in-process, our server on torch and on the fastest runtime, "
        "stock KServe and real Triton on that runtime, one table (benchmarks/peers.py; writes peers.md in --out)",
    )
    parser.add_argument(
        "--fleet",
        action="store_true",
        help="instead of the sweep: one replica direct and through a real Envoy, two replicas, a replica killed "
        "under load, admission at RepositoryIndex, added round trips (benchmarks/fleet.py; writes fleet.md in --out)",
    )
    fleet_arguments(parser)
    parser.add_argument(
        "--rounds", type=positive_int, default=3, help="--peers/--fleet: rounds of every column in turn (medians)"
    )
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/serving"))
    parser.add_argument("--mlflow-run-id", help="log the JSON, table and plots to this MLflow run")
    args = parser.parse_args(argv)
    for name in args.protocols:
        if name not in ("grpc", "rest"):
            parser.error(f"unknown protocol {name!r}; use grpc and/or rest")
    for name in args.inputs:
        if name not in ("images", "constituents"):
            parser.error(f"unknown input {name!r}; use images and/or constituents")
    if args.seconds <= 0:
        parser.error("--seconds must be > 0")
    if args.clients is None:
        args.clients = [1, 16, 64] if args.fleet else [1, 2, 4, 8, 16, 32, 64]
    if args.fleet:
        from benchmarks.fleet import run_fleet

        run_fleet(args)
    elif args.peers:
        from benchmarks.peers import run as run_peers

        run_peers(args.model_uri, args.seconds, args.max_batch_size, args.max_latency_ms, args.out, args.rounds)
    else:
        run(args)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
