"""Big REST bodies against gRPC clients, and memory and latency while refusing (serving.limits).

    python -m benchmarks.limits [--model-uri DIR | --image-size 64] [--parts stall,refusals]
                                [--seconds 8] [--rounds 2] [--refuse-seconds 60]
                                [--server-repo PATH] [--out docs/benchmarks/serving/limits.md]

``stall``: 16 closed-loop gRPC clients send batch-1 images; each round measures them alone, then
while one more client sends a REST body in a loop: the largest the cap allows (a binary request
whose JSON header declares as many images as fit under ``--max-request-mb``: the contract
refuses it, but only once it is decoded), and the largest *valid* request (a full batch of
images, binary). The gRPC clients' rows/s and p99 with the big client, over their values without
it (medians of the rounds), are the result: the target is >= 0.8x and < 2x. A control row sends
the cap body to a sink (a process that only reads and drops it) instead of the server: with
every process on the same cores, that is what the big client's upload costs whatever the server
does, the bound for the other rows. The CPU that the server, the big client and the sink use
during each measurement is reported beside it.

``refusals``: 16 closed-loop gRPC clients (in a process of their own, backing off 50 ms when
refused) keep the server busy with batch-1 requests, while ``--probes`` clients send a full batch
every ``--probe-interval`` s, which ``--max-queue-ms 150`` refuses whenever work is queued; for
``--refuse-seconds`` the server's RSS is sampled every second, and the latency of each refusal
(RESOURCE_EXHAUSTED) is recorded: the target is a flat RSS (within 50 MB) and a refusal p99 of
10 ms or less.

``--server-repo`` runs another checkout's ``python -m serving`` (e.g. ``git archive HEAD``
unpacked) to measure before and after on the same machine. Without ``--model-uri`` a random-
weight tagger of ``--image-size`` is saved to a temporary folder (the sizes and the serving path
are what matter here, not the weights). The load generator shares the machine's cores with the
server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import machine, publish
from benchmarks.measure import percentiles
from serving.errors import NOT_LOADED
from serving.process import REPO, free_port, readiness
from toptagger.cli import positive_int, run_cli
from toptagger.constants import MODEL_NAME
from toptagger.errors import ConfigError

MB = 1024 * 1024


@contextmanager
def server(repo: Path, model_uri: str, extra: Sequence[str]) -> Iterator[tuple[str, str, int]]:
    """``python -m serving`` of ``repo`` on free ports; yields (REST URL, gRPC target, pid)."""
    http, grpc_port = free_port(), free_port()
    command = [sys.executable, "-m", "serving", "--model-uri", model_uri, "--http-port", str(http)]
    command += ["--grpc-port", str(grpc_port), *extra]
    if "--metrics-port" in (repo / "serving" / "__main__.py").read_text():  # older checkouts lack it
        command += ["--metrics-port", str(free_port())]  # the default, 8002, may be another server's
    env = {**os.environ, "PROTOCOL": "v2", "PYTHONPATH": str(repo)}
    log = tempfile.NamedTemporaryFile(prefix="limits-server-", suffix=".log", delete=False)  # noqa: SIM115
    process = subprocess.Popen(command, cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{http}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if process.poll() is not None:
                raise ConfigError(f"the server exited ({process.returncode}); log {log.name}")
            ready, why = readiness(url)
            if ready:
                break
            if why and why != NOT_LOADED:  # up, and will not load: no point waiting
                raise ConfigError(f"the server is up but not ready: {why}; log {log.name}")
            if time.monotonic() > deadline:
                raise ConfigError(f"the server was not ready in 300 s; log {log.name}")
            time.sleep(0.25)
        yield url, f"127.0.0.1:{grpc_port}", process.pid
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def infer_message(images: np.ndarray) -> bytes:
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb

    request = pb.ModelInferRequest(model_name=MODEL_NAME)
    request.inputs.add(name="images", datatype="FP32", shape=list(images.shape))
    request.raw_input_contents.append(images.tobytes())
    return request.SerializeToString()


def _raw_infer_calls(target: str, clients: int) -> tuple[list[Any], list[Any]]:
    """One channel per client (no message-size limit) and its raw ``ModelInfer`` call (bytes in, bytes out)."""
    from grpc import aio

    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    channels = [aio.insecure_channel(target, options=options) for _ in range(clients)]
    method = "/inference.GRPCInferenceService/ModelInfer"
    return channels, [c.unary_unary(method, request_serializer=None, response_deserializer=None) for c in channels]


async def grpc_clients(
    target: str, message: bytes, clients: int, seconds: float, backoff_s: float = 0.0
) -> tuple[list[float], list[float], int]:
    """Closed-loop clients on their own channels: (answered latencies, refused latencies, errors).

    A refused client waits ``backoff_s`` before it sends again, as a client told to retry later does.
    """
    import grpc

    ok: list[float] = []
    refused: list[float] = []
    errors = 0
    channels, calls = _raw_infer_calls(target, clients)
    stop_at = time.perf_counter() + seconds

    async def client(call: object) -> None:
        nonlocal errors
        while time.perf_counter() < stop_at:
            start = time.perf_counter()
            try:
                await call(message, timeout=60)  # type: ignore[operator]
                ok.append(time.perf_counter() - start)
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    refused.append(time.perf_counter() - start)
                    await asyncio.sleep(backoff_s)
                else:
                    errors += 1

    try:
        # warm-up, not timed (refusals included)
        await asyncio.gather(*(call(message, timeout=60) for call in calls), return_exceptions=True)
        await asyncio.gather(*(client(call) for call in calls))
    finally:
        await asyncio.gather(*(c.close() for c in channels))
    return ok, refused, errors


def _post_loop(url: str, shape: list[int], payload_bytes: int, stop: Any, statuses: Any) -> None:
    """In a process of its own (not this one's GIL): post one binary body in a loop until ``stop``."""
    import httpx

    body, headers = binary_body(shape, payload_bytes)
    counts: dict[int, int] = {}
    with httpx.Client(timeout=120) as client:
        while not stop.is_set():
            status = client.post(url, content=body, headers=headers).status_code
            counts[status] = counts.get(status, 0) + 1
    statuses.put(counts)


def _load_loop(target: str, message: bytes, clients: int, seconds: float, results: Any) -> None:
    """In a process of its own: closed-loop gRPC clients; puts (answered, refused, errors) counts."""
    ok, refused, errors = asyncio.run(grpc_clients(target, message, clients, seconds, backoff_s=0.05))
    results.put((len(ok), len(refused), errors))


def binary_body(images_shape: list[int], payload_bytes: int) -> tuple[bytes, dict[str, str]]:
    header = {
        "inputs": [
            {
                "name": "images",
                "datatype": "FP32",
                "shape": images_shape,
                "parameters": {"binary_data_size": payload_bytes},
            }
        ]
    }
    head = json.dumps(header).encode()
    body = head + np.random.default_rng(0).random(payload_bytes // 4, dtype=np.float32).tobytes()
    return body, {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"}


def _sink(port: int, ready: Any) -> None:
    """In a process of its own: an HTTP/1.1 server that reads each body and drops it, answering 400.

    The floor for any server: what a client looping big bodies costs the machine (its own
    CPU and the loopback copies) when the server does nothing but read.
    """
    import socket

    answer = b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
    buffer = bytearray(1 << 20)
    with socket.create_server(("127.0.0.1", port)) as listener:
        ready.set()
        while True:
            connection, _ = listener.accept()
            with connection:
                pending = b""
                while True:
                    while b"\r\n\r\n" not in pending:
                        chunk = connection.recv(65536)
                        if not chunk:
                            break
                        pending += chunk
                    if b"\r\n\r\n" not in pending:
                        break
                    head, _, pending = pending.partition(b"\r\n\r\n")
                    lengths = [line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")]
                    left = (int(lengths[0].split(b":")[1]) if lengths else 0) - len(pending)
                    pending = b""
                    while left > 0:
                        got = connection.recv_into(buffer, min(left, len(buffer)))
                        if not got:
                            break
                        left -= got
                    connection.sendall(answer)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (its threads included) from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stall(args: argparse.Namespace, model_uri: str) -> list[str]:
    size, batch = args.image_size, args.max_batch_size
    image = np.random.default_rng(1).random((1, 3, size, size), dtype=np.float32)
    message = infer_message(image)
    per_image = 3 * size * size * 4
    cap_rows = (int(args.max_request_mb * MB) - 4096) // per_image
    cap = f"cap: {cap_rows} images declared ({cap_rows * per_image / 1e6:.1f} MB, over the batch limit)"
    # name -> (shape, payload bytes, sent to the sink instead of the server)
    loads = {
        "alone": ([], 0, False),
        cap: ([cap_rows, 3, size, size], cap_rows * per_image, False),
        f"largest valid: {batch} images ({batch * per_image / 1e6:.2f} MB)": (
            [batch, 3, size, size],
            batch * per_image,
            False,
        ),
        "cap, sent to a sink instead (reads and drops it: the client's own cost)": (
            [cap_rows, 3, size, size],
            cap_rows * per_image,
            True,
        ),
    }
    spawn = multiprocessing.get_context("spawn")
    sink_port, sink_ready = free_port(), spawn.Event()
    sink = spawn.Process(target=_sink, args=(sink_port, sink_ready), daemon=True)
    sink.start()
    sink_ready.wait(60)
    # --max-body-mb: the cap's old name, which servers before --max-request-mb read too
    extra = ["--max-batch-size", str(batch), "--max-body-mb", str(args.max_request_mb), *args.server_args]
    results: dict[str, list[tuple[float, float, float, float]]] = {}
    statuses: dict[str, dict[int, int]] = {}
    try:
        with server(args.server_repo, model_uri, extra) as (url, target, server_pid):
            for _ in range(args.rounds):
                for name, (shape, payload_bytes, to_sink) in loads.items():
                    big = None
                    if payload_bytes:
                        base = f"http://127.0.0.1:{sink_port}" if to_sink else url
                        infer_url = f"{base}/v2/models/{MODEL_NAME}/infer"
                        stop, answers = spawn.Event(), spawn.Queue()
                        big = spawn.Process(target=_post_loop, args=(infer_url, shape, payload_bytes, stop, answers))
                        big.start()
                        time.sleep(3)  # started, its body built and on the wire
                    receiver = sink.pid if to_sink else server_pid
                    watched = [receiver] + ([big.pid] if big is not None else [])
                    before, start = [cpu_seconds(pid) for pid in watched], time.perf_counter()
                    ok, _, errors = asyncio.run(grpc_clients(target, message, args.clients, args.seconds))
                    wall = time.perf_counter() - start
                    used = [(cpu_seconds(pid) - b) / wall for pid, b in zip(watched, before, strict=True)]
                    if big is not None:
                        stop.set()
                        for status, count in answers.get(timeout=300).items():
                            statuses.setdefault(name, {})[status] = statuses.get(name, {}).get(status, 0) + count
                        big.join()
                    client_cores = used[1] if len(used) > 1 else 0.0
                    results.setdefault(name, []).append(
                        (len(ok) / args.seconds, percentiles(ok)[2], used[0], client_cores)
                    )
                    if errors:
                        print(f"warning: {errors} gRPC errors during '{name}'", file=sys.stderr)
    finally:
        sink.kill()
    median = {name: np.median(np.array(rounds), axis=0) for name, rounds in results.items()}
    base_rate, base_p99 = float(median["alone"][0]), float(median["alone"][1])
    rows = []
    for name, (rate, p99, receiver, client) in median.items():
        label = f"{args.clients} gRPC batch-1 clients alone" if name == "alone" else f"+ 1 REST client looping a {name}"
        answered = ", ".join(f"{n}× {s}" for s, n in sorted(statuses.get(name, {}).items())) or "—"
        big_cores = f"{client:.2f}" if name != "alone" else "—"
        sink_cores = f"{receiver:.2f}" if loads[name][2] else "—"
        server_cores = f"{receiver:.2f}" if not loads[name][2] else "—"
        rows.append(
            f"| {label} | {rate:.0f} | {rate / base_rate:.2f}× | {p99:.1f} | {p99 / base_p99:.2f}× | {answered} "
            f"| {server_cores} | {big_cores} | {sink_cores} |"
        )
    head = [
        f"gRPC clients' rows/s and p99 (ms), medians of {args.rounds} rounds of {args.seconds:g} s; "
        f"images {size}x{size}x3, --max-request-mb {args.max_request_mb:g}, server `{args.server_repo}`; "
        "CPU in cores (CPU seconds per second) of the server, the big client and the sink",
        "",
        "| load | gRPC rows/s | vs alone | gRPC p99 ms | vs alone | big client's answers "
        "| server CPU | big client CPU | sink CPU |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    return head + rows


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def paced_clients(
    target: str, message: bytes, clients: int, interval: float, seconds: float
) -> tuple[list[float], list[float], int]:
    """Clients that each send ``message`` every ``interval`` s (not closed-loop): (answered, refused, errors)."""
    import grpc

    ok: list[float] = []
    refused: list[float] = []
    errors = 0
    channels, calls = _raw_infer_calls(target, clients)
    stop_at = time.perf_counter() + seconds

    async def client(call: Any, offset: float) -> None:
        nonlocal errors
        await asyncio.sleep(offset)
        while (start := time.perf_counter()) < stop_at:
            try:
                await call(message, timeout=60)
                ok.append(time.perf_counter() - start)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    errors += 1
                else:
                    refused.append(time.perf_counter() - start)
            await asyncio.sleep(max(0.0, start + interval - time.perf_counter()))

    try:
        await asyncio.gather(*(client(c, i * interval / clients) for i, c in enumerate(calls)))
    finally:
        await asyncio.gather(*(c.close() for c in channels))
    return ok, refused, errors


def refusals(args: argparse.Namespace, model_uri: str) -> list[str]:
    size, batch = args.image_size, args.max_batch_size
    rng = np.random.default_rng(2)
    one = infer_message(rng.random((1, 3, size, size), dtype=np.float32))
    full = infer_message(rng.random((batch, 3, size, size), dtype=np.float32))
    extra = ["--max-batch-size", str(batch), *args.refuse_flags, *args.server_args]
    samples: list[float] = []
    spawn = multiprocessing.get_context("spawn")
    with server(args.server_repo, model_uri, extra) as (_, target, pid):
        results = spawn.Queue()
        load = spawn.Process(target=_load_loop, args=(target, one, args.clients, args.refuse_seconds + 10, results))
        load.start()
        time.sleep(5)  # the load running
        asyncio.run(paced_clients(target, full, args.probes, args.probe_interval, 3))  # warm-up
        done = threading.Event()

        def sample() -> None:
            while not done.wait(1.0):
                samples.append(rss_mb(pid))

        start_rss = rss_mb(pid)
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        ok, refused, errors = asyncio.run(
            paced_clients(target, full, args.probes, args.probe_interval, args.refuse_seconds)
        )
        done.set()
        sampler.join()
        end_rss = rss_mb(pid)
        load_ok, load_refused, load_errors = results.get(timeout=300)
        load.join()
    peak = max([start_rss, *samples])
    every = max(1, len(samples) // 6)
    series = ", ".join(f"{i + 1} s: {mb:.0f}" for i, mb in enumerate(samples) if (i + 1) % every == 0)
    p50, _, p99 = percentiles(refused)
    return [
        f"{args.probes} gRPC clients each sending a batch of {batch} images {size}x{size}x3 "
        f"({len(full) / 1e6:.2f} MB) every {args.probe_interval * 1e3:g} ms for {args.refuse_seconds:g} s, while "
        f"{args.clients} closed-loop batch-1 clients keep the server busy (they got {load_ok} answers, "
        f"{load_refused} refusals, {load_errors} errors); server flags `{' '.join(args.refuse_flags)}`; "
        f"server `{args.server_repo}`",
        "",
        "| big requests answered | refused (RESOURCE_EXHAUSTED) | other errors | refusal p50 ms | refusal p99 ms | "
        "RSS start MB | RSS end MB | RSS peak MB | growth MB |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {len(ok)} | {len(refused)} | {errors} | {p50:.2f} | {p99:.2f} | {start_rss:.0f} | {end_rss:.0f} | "
        f"{peak:.0f} | {end_rss - start_rss:+.0f} |",
        "",
        f"RSS (MB) during the run: {series}",
    ]


def tiny_model(image_size: int) -> str:
    import torch

    from toptagger.images import ImageConfig
    from toptagger.model import TaggerConfig, build_model, save_model

    torch.manual_seed(0)
    folder = Path(tempfile.mkdtemp(prefix="limits-model-")) / "tagger"
    return str(save_model(build_model(TaggerConfig(image=ImageConfig(image_size=image_size))).eval(), folder))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.limits",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model-uri", help="a saved tagger (default: a random-weight one of --image-size)")
    parser.add_argument("--image-size", type=positive_int, default=64, help="the model's image size")
    parser.add_argument("--parts", default="stall,refusals", type=lambda s: s.split(","))
    parser.add_argument("--clients", type=positive_int, default=16)
    parser.add_argument("--max-batch-size", type=positive_int, default=16)
    parser.add_argument("--max-request-mb", type=float, default=64.0)
    parser.add_argument("--seconds", type=float, default=8.0, help="per stall measurement")
    parser.add_argument("--rounds", type=positive_int, default=2)
    parser.add_argument("--refuse-seconds", type=float, default=60.0)
    parser.add_argument("--probes", type=positive_int, default=4, help="clients sending the refused batches")
    parser.add_argument("--probe-interval", type=float, default=0.02, help="seconds between a probe's requests")
    parser.add_argument("--refuse-flags", default="--max-queue-ms 150", type=str.split, help="how refusals are made")
    parser.add_argument("--server-repo", type=Path, default=REPO, help="the checkout whose python -m serving runs")
    parser.add_argument("--server-args", default="--threads 1", type=str.split, help="more server flags")
    parser.add_argument("--out", type=Path, help="write the Markdown report here")
    args = parser.parse_args(argv)
    model_uri = args.model_uri or tiny_model(args.image_size)
    lines = [f"Machine: {machine()}", ""]
    if "stall" in args.parts:
        lines += ["### A big REST body against gRPC clients", "", *stall(args, model_uri), ""]
    if "refusals" in args.parts:
        lines += ["### Refusing for a while: memory and refusal latency", "", *refusals(args, model_uri), ""]
    publish("\n".join(lines), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
