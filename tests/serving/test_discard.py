"""A refused REST upload is discarded at a bounded rate (serving.discard), and the connection stays usable.

No timed assertions: the protocol is driven with a fake transport (what it pauses, resumes and
passes on), and the real server is checked for *what* it answers and counts.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from serving import discard
from tests.predictor import IMAGE_SIZE, Server, parse_metrics, read_http_answer, start_server, stop_server
from toptagger.constants import MODEL_NAME

INFER = f"/v2/models/{MODEL_NAME}/infer"
MB = 1024 * 1024
GUARD_S = 60  # a deadlock guard, not a measurement


class FakeFlow:
    def __init__(self) -> None:
        self.paused = 0
        self.resumed = 0

    def pause_reading(self) -> None:
        self.paused += 1

    def resume_reading(self) -> None:
        self.resumed += 1


class FakeTransport:
    def __init__(self, protocol: object) -> None:
        self.protocol, self.closing = protocol, False

    def get_protocol(self) -> object:
        return self.protocol

    def set_protocol(self, protocol: object) -> None:
        self.protocol = protocol

    def is_closing(self) -> bool:
        return self.closing


class Upstream:
    """uvicorn's protocol, as far as the throttle sees it: it gets every byte, and the connection's end."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.lost: list[Exception | None] = []

    def data_received(self, data: bytes) -> None:
        self.data += data

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.append(exc)

    def eof_received(self) -> bool:
        return True


class Cycle:
    """uvicorn's RequestResponseCycle: the receive callable is its bound method."""

    def __init__(self, transport: FakeTransport, flow: FakeFlow, buffered: bytes = b"") -> None:
        self.transport, self.flow, self.body = transport, flow, bytearray(buffered)

    async def receive(self) -> dict:
        return {"type": "http.request", "body": b"", "more_body": True}


def _throttled(unread: int, buffered: bytes = b"", **options: float) -> tuple[FakeTransport, FakeFlow, Upstream]:
    upstream, flow = Upstream(), FakeFlow()
    transport = FakeTransport(upstream)
    assert discard.throttle(Cycle(transport, flow, buffered).receive, unread, **options)
    return transport, flow, upstream


def test_the_free_part_is_read_at_full_speed_and_the_rest_pauses_until_the_budget_refills() -> None:
    async def run() -> None:
        transport, flow, upstream = _throttled(10 * MB, rate=1e7, free=2 * MB)
        transport.protocol.data_received(bytes(MB))
        transport.protocol.data_received(bytes(MB))
        assert flow.paused == 0  # within the free allowance
        transport.protocol.data_received(bytes(MB))
        assert flow.paused == 1  # over it: reading pauses ...
        await asyncio.sleep(0.5)  # ... until the budget refills (~1 MB short at 10 MB/s: ~0.1 s)
        assert flow.resumed == 1
        assert len(upstream.data) == 3 * MB  # every byte went on to the server's protocol

    asyncio.run(run())


def test_after_the_declared_body_the_protocol_is_uvicorns_again_and_the_next_request_passes() -> None:
    async def run() -> None:
        transport, flow, upstream = _throttled(3 * MB + 100, buffered=bytes(100), rate=1.0, free=MB)
        transport.protocol.data_received(bytes(2 * MB))
        assert flow.paused == 1
        transport.protocol.data_received(bytes(MB) + b"POST /next")  # the body's end, then a new request
        assert transport.protocol is upstream  # detached: no more counting or pausing
        assert flow.resumed == 1  # the pending pause was lifted, not left for its timer
        assert upstream.data.endswith(b"POST /next")

    asyncio.run(run())


def test_connection_end_reaches_uvicorn_and_nothing_is_left_scheduled() -> None:
    async def run() -> None:
        transport, flow, upstream = _throttled(10 * MB, rate=1.0, free=0)
        transport.protocol.data_received(bytes(1000))
        assert flow.paused == 1
        assert transport.protocol.eof_received() is True  # forwarded
        transport.protocol.connection_lost(None)
        await asyncio.sleep(0.01)
        assert upstream.lost == [None] and flow.resumed == 0

    asyncio.run(run())


def test_a_server_that_is_not_uvicorn_is_left_alone() -> None:
    async def receive() -> dict:
        return {}

    assert discard.throttle(receive, 100 * MB) is False


# --- against the real server --------------------------------------------------------------------
@pytest.fixture(scope="module")
def roomy(model_dir: Path) -> Iterator[Server]:
    running = start_server(model_dir, "--max-batch-size", "8", "--max-request-mb", "40")
    yield running
    stop_server(running)


def _binary_request(rows: int, tensor: bytes) -> bytes:
    shape = [rows, 3, IMAGE_SIZE, IMAGE_SIZE]
    spec = {"name": "images", "datatype": "FP32", "shape": shape, "parameters": {"binary_data_size": len(tensor)}}
    head = json.dumps({"inputs": [spec]}).encode()
    return (
        (
            f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
            f"Inference-Header-Content-Length: {len(head)}\r\nContent-Length: {len(head) + len(tensor)}\r\n\r\n"
        ).encode()
        + head
        + tensor
    )


def test_a_big_refused_upload_is_counted_slowed_and_the_connection_then_serves(roomy: Server) -> None:
    """32 MB declared as 9 rows (over the batch limit of 8): answered 400 from its header; the rest
    is read at the bounded rate (the pause counter rises), every byte of it is counted as
    discarded, and the same connection then answers a valid request."""
    url = f"http://{roomy.host}:{roomy.http_port}/metrics"
    before = parse_metrics(httpx.get(url).text)
    payload = 32 * MB
    request = _binary_request(9, bytes(payload))
    with socket.create_connection((roomy.host, roomy.http_port), timeout=GUARD_S) as sock:
        sock.sendall(request)  # returns once the server has read all but the socket buffers' worth
        assert read_http_answer(sock).startswith("HTTP/1.1 400")
        image = np.zeros((1, 3, IMAGE_SIZE, IMAGE_SIZE), np.float32).tobytes()
        sock.sendall(_binary_request(1, image))
        answer = read_http_answer(sock)
        assert answer.startswith("HTTP/1.1 200"), answer
        assert '"probabilities"' in answer
    after = parse_metrics(httpx.get(url).text)
    discarded = after["toptagger_rest_discarded_bytes_total"] - before.get("toptagger_rest_discarded_bytes_total", 0)
    assert payload - MB < discarded <= payload  # all but what uvicorn had buffered before the answer
    assert after["toptagger_rest_discard_pauses_total"] > before.get("toptagger_rest_discard_pauses_total", 0)
    assert httpx.get(f"http://{roomy.host}:{roomy.http_port}/v2/health/ready").status_code == 200
