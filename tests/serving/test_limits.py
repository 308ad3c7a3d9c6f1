"""Request-size caps and time-based admission (serving.limits): refused before the payload is read.

No timed assertions: what is checked is *what* answers (status, code, header), and that it comes
from the declared size alone (a body never sent, contents that could not even be decoded). The
socket timeouts are deadlock guards, far above any answer time.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from kserve.model_repository import ModelRepository
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc

from serving.errors import ServerOverloaded
from serving.grpc_infer import TaggerServicer
from serving.limits import Admission, Limits, QueueTooLong, declared_size, retry_after_header
from serving.predictor import BatchingOptions, TopTagger
from serving.rest_infer import _decode_binary
from serving.server import TaggerDataPlane, install_rest_extensions
from tests.predictor import IMAGE_SIZE, Server, read_http_answer, start_server, stop_server
from toptagger.constants import MODEL_NAME

INFER = f"/v2/models/{MODEL_NAME}/infer"
MB = 1024 * 1024
GUARD_S = 60  # a deadlock guard, not a measurement


# --- Admission, alone ---------------------------------------------------------------------------


def test_admission_refuses_only_work_beyond_the_limit_and_never_an_idle_server() -> None:
    admission = Admission(max_queue_ms=1000, rows_per_s=10.0)
    admission.try_admit(50)  # nothing in flight: admitted, however long it takes
    with pytest.raises(QueueTooLong) as refused:
        admission.try_admit(1)
    assert isinstance(refused.value, ServerOverloaded)  # answered 503 / RESOURCE_EXHAUSTED
    assert "--max-queue-ms 1000" in refused.value.reason
    assert refused.value.retry_after_s == pytest.approx(50 / 10 - 1 + 1 / 10)
    assert retry_after_header(refused.value) == "5"
    admission.release(50)
    assert admission.in_flight == 0
    admission.try_admit(5)  # 0.5 s of work ahead of nothing: fine
    admission.try_admit(5)  # 1.0 s: exactly the limit, fine
    with pytest.raises(QueueTooLong):
        admission.try_admit(1)
    assert admission.refused == 2


def test_admission_rate_is_a_weighted_average_of_batches_and_unseeded_admits_all() -> None:
    admission = Admission(max_queue_ms=1)
    for _ in range(100):
        admission.try_admit(16)  # no rate yet: nothing to refuse on
    admission.observe(16, 0.5)
    assert admission.rows_per_s == 32
    admission.observe(16, 0.1)
    assert admission.rows_per_s == pytest.approx(0.2 * 160 + 0.8 * 32)
    admission.observe(0, 0.1)  # an empty or instant batch says nothing
    admission.observe(4, 0.0)
    assert admission.rows_per_s == pytest.approx(0.2 * 160 + 0.8 * 32)
    with pytest.raises(QueueTooLong):  # now measured: 1600 rows are far beyond 1 ms
        admission.try_admit(3)
    for _ in range(100):
        admission.release(16)
    with admission.admit(3):
        assert admission.in_flight == 3
    assert admission.in_flight == 0
    assert Admission(None, rows_per_s=1.0).queued_seconds() == 0.0


def test_declared_size_reads_only_the_shape() -> None:
    assert declared_size([[16, 3, 224, 224]]) == (16, 16 * 3 * 224 * 224 * 4)
    assert declared_size([]) == (0, 0)
    assert declared_size([[1], [2]]) == (0, 0)  # two inputs: the contract says why
    assert declared_size([[0, 3]]) == (0, 0)
    assert declared_size([["a", 3]]) == (0, 0)


def test_limits_default_fits_a_full_scale_batch() -> None:
    limits = Limits()
    full_scale = 16 * 3 * 224 * 224 * 4  # 9.6 MB
    assert limits.max_request_bytes >= 4 * full_scale and limits.max_message_bytes >= 4 * full_scale
    assert dict(limits.grpc_options())["grpc.max_receive_message_length"] == limits.max_message_bytes
    with pytest.raises(ValueError, match="must be > 0"):
        Limits.from_mb(0, 64)


def test_binary_tensors_are_viewed_not_copied(model_dir: Path) -> None:
    from serving.contract import Contract

    contract = Contract(3, IMAGE_SIZE, 8)
    images = np.random.default_rng(0).random((2, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    spec = {"name": "images", "datatype": "FP32", "shape": list(images.shape)}
    header = {"inputs": [{**spec, "parameters": {"binary_data_size": images.nbytes}}]}
    head = json.dumps(header).encode()
    body = head + images.tobytes()
    _, name, array = _decode_binary(header, body, len(head), contract, MODEL_NAME)
    assert name == "images"
    np.testing.assert_array_equal(array, images)
    assert np.shares_memory(array, np.frombuffer(body, np.uint8)), "decoded through Python lists, not frombuffer"


# --- refused before decoding, in process --------------------------------------------------------


@pytest.fixture(scope="module")
def busy_tagger(model_dir: Path, one_torch_thread: None) -> Iterator[TopTagger]:
    """A loaded tagger whose admission holds one row in flight at 1 row/s against a 1 ms limit."""
    model = TopTagger(str(model_dir), backend="torch", batching=BatchingOptions(max_batch_size=8, max_queue_ms=1))
    assert model.load(), model.not_ready_reason
    assert model.admission.rows_per_s, "seeded by the warm-up batch"
    model.admission.rows_per_s = 1.0
    model.admission.try_admit(1)
    yield model
    model.admission.release(1)
    model.stop()


class _Context:
    code: grpc.StatusCode | None = None

    def invocation_metadata(self) -> tuple:
        return ()

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details


def test_grpc_is_refused_on_the_shape_before_its_contents_are_read(busy_tagger: TopTagger) -> None:
    servicer = TaggerServicer(None, None, busy_tagger, max_request_bytes=MB)
    request = pb.ModelInferRequest(model_name=MODEL_NAME)
    request.inputs.add(name="images", datatype="FP32", shape=[1, 3, IMAGE_SIZE, IMAGE_SIZE])
    request.raw_input_contents.append(b"not even a float32 array")  # would be INVALID_ARGUMENT if read
    context = _Context()
    asyncio.run(servicer.ModelInfer(request, context))  # type: ignore[arg-type]  # a status, no exception
    assert context.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-queue-ms" in context.details
    # and a shape declaring more than the request cap, with no contents at all
    small = TaggerServicer(None, None, busy_tagger, max_request_bytes=1000)
    context = _Context()
    asyncio.run(small.ModelInfer(request, context))  # type: ignore[arg-type]
    assert context.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "request cap of 1000" in context.details
    assert busy_tagger.admission.in_flight == 1, "a refused request leaves nothing counted"


def test_rest_binary_is_refused_on_its_json_header_with_retry_after(busy_tagger: TopTagger) -> None:
    from fastapi import FastAPI

    app = FastAPI()
    repository = ModelRepository()
    repository.update(busy_tagger)
    install_rest_extensions(app, busy_tagger, MB, TaggerDataPlane(model_registry=repository))
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "images",
                    "datatype": "FP32",
                    "shape": [1, 3, IMAGE_SIZE, IMAGE_SIZE],
                    "parameters": {"binary_data_size": 7},
                }
            ]
        }
    ).encode()
    headers = {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"}

    async def post() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post(INFER, content=head + b"garbage", headers=headers)

    answer = asyncio.run(post())
    assert answer.status_code == 503, answer.text  # not 400: the 7 garbage bytes were never decoded
    assert int(answer.headers["retry-after"]) >= 1
    assert "--max-queue-ms" in answer.json()["error"]


# --- a real server: caps answered from the declared size alone ----------------------------------


@pytest.fixture(scope="module")
def capped(model_dir: Path) -> Iterator[Server]:
    running = start_server(model_dir, "--max-batch-size", "8", "--max-request-mb", "1", "--max-message-mb", "12")
    yield running
    stop_server(running)


def test_rest_body_over_the_cap_is_413_before_it_is_sent(capped: Server) -> None:
    with socket.create_connection((capped.host, capped.http_port), timeout=GUARD_S) as sock:
        sock.sendall(
            f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
            f"Inference-Header-Content-Length: 100\r\nContent-Length: {64 * MB}\r\n\r\n".encode()
        )  # and not one byte of the body: the answer cannot depend on it
        answer = b""
        while b"exceeds" not in answer:  # the headers and the body may come in separate segments
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    answer = answer.decode("latin-1")
    assert answer.startswith("HTTP/1.1 413"), answer
    assert "exceeds" in answer


def test_rest_binary_refused_by_its_header_is_answered_before_the_tensor_arrives(capped: Server) -> None:
    """Over the batch limit (8) but under the body cap: the JSON header alone decides.

    The tensor bytes are withheld until the answer is in, so the answer cannot have waited for
    them; they are sent afterwards and the same connection then serves a valid request (the
    server discarded the refused upload rather than reading it as a new request).
    """
    rows = 9
    tensor = bytes(4 * rows * 3 * IMAGE_SIZE * IMAGE_SIZE)
    shape = [rows, 3, IMAGE_SIZE, IMAGE_SIZE]
    spec = {"name": "images", "datatype": "FP32", "shape": shape, "parameters": {"binary_data_size": len(tensor)}}
    head = json.dumps({"inputs": [spec]}).encode()
    assert len(head) + len(tensor) < MB  # under the 1 MB cap: refused for its rows, not its size
    request_head = (
        f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
        f"Inference-Header-Content-Length: {len(head)}\r\nContent-Length: {len(head) + len(tensor)}\r\n\r\n"
    ).encode()
    with socket.create_connection((capped.host, capped.http_port), timeout=GUARD_S) as sock:
        sock.sendall(request_head + head)
        answer = read_http_answer(sock)
        assert answer.startswith("HTTP/1.1 400"), answer
        assert "exceeds the maximum batch size 8" in answer
        sock.sendall(tensor)  # the rest of the refused upload, which the server drops

        image = np.zeros((1, 3, IMAGE_SIZE, IMAGE_SIZE), np.float32).tobytes()
        spec = {
            "name": "images",
            "datatype": "FP32",
            "shape": [1, 3, IMAGE_SIZE, IMAGE_SIZE],
            "parameters": {"binary_data_size": len(image)},
        }
        head = json.dumps({"inputs": [spec]}).encode()
        sock.sendall(
            f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
            f"Inference-Header-Content-Length: {len(head)}\r\nContent-Length: {len(head) + len(image)}\r\n\r\n".encode()
            + head
            + image
        )
        answer = read_http_answer(sock)
        assert answer.startswith("HTTP/1.1 200"), answer
        assert '"probabilities"' in answer


def test_old_flag_and_env_names_still_set_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    from serving.__main__ import build_parser

    assert build_parser().parse_args([]).max_request_mb == 64
    assert build_parser().parse_args([]).max_message_mb == 64
    assert build_parser().parse_args([]).max_queue_ms == 1000
    assert build_parser().parse_args(["--max-body-mb", "3"]).max_request_mb == 3
    assert build_parser().parse_args(["--max-request-mb", "5"]).max_request_mb == 5
    monkeypatch.setenv("MAX_BODY_MB", "7")
    assert build_parser().parse_args([]).max_request_mb == 7
    monkeypatch.setenv("MAX_REQUEST_MB", "9")
    assert build_parser().parse_args([]).max_request_mb == 9


def _stub(server: Server) -> pb_grpc.GRPCInferenceServiceStub:
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    return pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(server.grpc_target, options=options))


def _declared(rows: int, payload: bytes, size: int = IMAGE_SIZE) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=MODEL_NAME)
    request.inputs.add(name="images", datatype="FP32", shape=[rows, 3, size, size])
    request.raw_input_contents.append(payload)
    return request


def test_grpc_over_the_caps_is_resource_exhausted(capped: Server) -> None:
    stub = _stub(capped)
    # a shape declaring 9.6 MB (over --max-request-mb 1) in a message under --max-message-mb 12
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(_declared(16, bytes(16 * 3 * 224 * 224 * 4), size=224), timeout=GUARD_S)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "request cap" in caught.value.details()
    # a message over --max-message-mb: the transport refuses it before it is parsed
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(_declared(1, bytes(13 * MB)), timeout=GUARD_S)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    good = np.zeros((1, 3, IMAGE_SIZE, IMAGE_SIZE), np.float32)
    assert stub.ModelInfer(_declared(1, good.tobytes()), timeout=GUARD_S).outputs[0].name == "probabilities"


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RSS from /proc")
def test_refusing_big_grpc_requests_keeps_memory_flat(capped: Server) -> None:
    """300 refusals of 9.6 MB messages (2.9 GB in all): the server's RSS grows by far less."""
    stub = _stub(capped)
    request = _declared(16, bytes(16 * 3 * 224 * 224 * 4), size=224)

    def refuse(n: int) -> None:
        for _ in range(n):
            with pytest.raises(grpc.RpcError) as caught:
                stub.ModelInfer(request, timeout=GUARD_S)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    refuse(30)  # allocator and channel warmed up
    before = _rss_mb(capped.process.pid)
    refuse(300)
    grown = _rss_mb(capped.process.pid) - before
    assert grown < 150, f"RSS grew by {grown:.0f} MB over 300 refusals"
