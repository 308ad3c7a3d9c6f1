"""Drain on SIGTERM, with real server processes: nothing accepted is dropped, nothing new is taken.

What is in flight is made deterministic rather than timed: a REST request whose body is only half
sent is accepted (counted in flight) and cannot finish until the test sends the rest, so the
drain lasts exactly as long as the test needs; the server's own in-flight gauge says when the
requests sent before SIGTERM have all been accepted.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc

from serving.drain import Drain, Draining
from serving.process import REPO
from tests.predictor import IMAGE_SIZE, Server, parse_metrics, start_server, stop_server

INFER = "/v2/models/top-tagger/infer"
WAIT_S = 120  # how long a wait may last before the test gives up (never an assertion on speed)


def infer_request(rows: int) -> pb.ModelInferRequest:
    images = np.zeros((rows, 1, IMAGE_SIZE, IMAGE_SIZE), np.float32)
    request = pb.ModelInferRequest(model_name="top-tagger")
    request.inputs.add(name="images", datatype="FP32", shape=list(images.shape))
    request.raw_input_contents.append(images.tobytes())
    return request


class HeldRequest:
    """A REST inference whose body is sent in two halves: in flight until :meth:`finish`."""

    def __init__(self, server: Server) -> None:
        images = np.zeros((1, 1, IMAGE_SIZE, IMAGE_SIZE), np.float32)
        tensor = {"name": "images", "datatype": "FP32", "shape": list(images.shape), "data": images.ravel().tolist()}
        body = {"inputs": [tensor]}
        self.body = json.dumps(body).encode()
        self.sock = socket.create_connection((server.host, server.http_port), timeout=WAIT_S)
        head = f"POST {INFER} HTTP/1.1\r\nHost: {server.http_target}\r\nContent-Type: application/json\r\n"
        self.sock.sendall(f"{head}Content-Length: {len(self.body)}\r\n\r\n".encode() + self.body[:100])

    def finish(self) -> tuple[int, dict]:
        self.sock.sendall(self.body[100:])
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < _length(answer):
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            answer += chunk
        head, _, payload = answer.partition(b"\r\n\r\n")
        return int(head.split()[1]), json.loads(payload)

    def close(self) -> None:
        self.sock.close()


def _length(answer: bytes) -> int:
    for line in answer.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def in_flight(server: Server) -> float:
    """The server's own count of accepted, unanswered inference requests (HTTP port's /metrics)."""
    return parse_metrics(httpx.get(f"{server.url}/metrics", timeout=30).text)["toptagger_requests_in_flight"]


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


def test_sigterm_drains_answers_everything_accepted_and_refuses_the_rest(model_dir: Path) -> None:
    # --max-queue-ms high: the test queues more work than backpressure would admit on a slow machine.
    flags = ("--max-batch-size", "8", "--max-latency-ms", "0", "--max-queue-ms", "600000", "--drain-seconds", "120")
    server = start_server(model_dir, *flags)
    held = HeldRequest(server)
    channel = grpc.insecure_channel(server.grpc_target)
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    try:
        wait_for(lambda: in_flight(server) >= 1, "the half-sent request to be accepted")
        # Queued work at SIGTERM: 12 batches of 8 behind one another on the device.
        calls = [stub.ModelInfer.future(infer_request(8), timeout=WAIT_S) for _ in range(12)]

        def all_accepted() -> bool:
            done = sum(call.done() for call in calls)  # read before the server's count: never counted twice
            return done + in_flight(server) == 1 + len(calls)

        wait_for(all_accepted, "the gRPC requests to be accepted")
        server.process.send_signal(signal.SIGTERM)

        wait_for(lambda: httpx.get(f"{server.url}/v2/health/ready", timeout=30).status_code == 503, "not ready")
        # Still draining: the half-sent request holds it open until the test finishes it.
        assert server.process.poll() is None
        ready = httpx.get(f"{server.url}/v2/health/ready", timeout=30)
        assert "draining" in ready.json()["reason"]
        assert httpx.get(f"{server.url}/v2/models/top-tagger/ready", timeout=30).status_code == 503
        assert httpx.get(f"{server.url}/v2/health/live", timeout=30).status_code == 200
        # gRPC agrees with REST (KServe's ServerReady said true whatever the model did).
        assert stub.ServerReady(pb.ServerReadyRequest(), timeout=30).ready is False
        assert stub.ModelReady(pb.ModelReadyRequest(name="top-tagger"), timeout=30).ready is False
        assert stub.ServerLive(pb.ServerLiveRequest(), timeout=30).live is True
        # New work is refused with what a proxy retries on another replica.
        refused = httpx.post(f"{server.url}{INFER}", content=held.body, timeout=30)
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"
        assert "draining" in refused.json()["error"]
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(infer_request(1), timeout=30)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "draining" in (caught.value.details() or "")

        status, body = held.finish()
        assert status == 200 and body["outputs"][0]["shape"] == [1, 2]
        for call in calls:  # every request accepted before SIGTERM is answered
            answer = call.result()
            assert list(answer.outputs[0].shape) == [8, 2]
        assert server.process.wait(timeout=WAIT_S) == 0
        assert '"event": "drained"' in server.log_text()
    finally:
        held.close()
        channel.close()
        stop_server(server)


def test_drain_seconds_bounds_the_wait(model_dir: Path) -> None:
    """A request that never completes does not keep the replica alive past --drain-seconds."""
    server = start_server(model_dir, "--drain-seconds", "1")
    held = HeldRequest(server)
    try:
        wait_for(lambda: in_flight(server) >= 1, "the half-sent request to be accepted")
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=WAIT_S) == 0
        assert '"event": "drain cut short"' in server.log_text()
    finally:
        held.close()
        stop_server(server)


def run_predictor(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "serving", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=WAIT_S, cwd=REPO)


@pytest.mark.parametrize("flags", [["--drain-seconds", "-1"], ["--drain-seconds", "nan"], ["--metrics-port", "70000"]])
def test_bad_drain_and_metrics_flags_are_refused_by_name(model_dir: Path, flags: list[str]) -> None:
    result = run_predictor("--model-uri", str(model_dir), *flags)
    assert result.returncode == 2
    assert flags[0] in result.stderr and "Traceback" not in result.stderr


def test_a_taken_metrics_port_stops_the_start_up_with_its_reason(model_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_predictor("--model-uri", str(model_dir), "--metrics-port", str(port), "--threads", "1")
    assert result.returncode == 2
    assert f"cannot serve metrics on port {port}" in result.stderr and "--metrics-port" in result.stderr
    assert "Traceback" not in result.stderr


# --- the Drain itself ---------------------------------------------------------------------------


def test_drain_counts_in_and_out_and_refuses_once_draining() -> None:
    drain = Drain(seconds=5)
    drain.enter()
    drain.enter()
    drain.leave()
    drain.begin()
    with pytest.raises(Draining, match="draining"):
        drain.enter()
    assert drain.in_flight == 1
    with pytest.raises(ValueError, match="--drain-seconds"):
        Drain(seconds=-1)
