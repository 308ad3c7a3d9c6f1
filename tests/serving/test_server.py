"""The predictor as a real server process: agreement, batching, Triton clients, bad input, faults."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc

from serving.backends import TorchBackend
from serving.client import InferenceFailed, RetryPolicy, TaggerClient
from tests.predictor import IMAGE_SIZE, Server, scrape, start_server, stop_server
from tests.tolerances import gamma, tagger_probability_bound
from toptagger.jets.dataset import JetBatch

HERE = Path(__file__).resolve().parent
INFER = "/v2/models/top-tagger/infer"


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> TorchBackend:
    """The same model, in-process: the answers the server must reproduce."""
    torch.manual_seed(0)  # load_model builds the network (random initialisation) before loading the weights
    return TorchBackend(model_dir, threads=1)


def assert_as_in_process(answer: np.ndarray, expected: np.ndarray, tolerance: np.ndarray) -> None:
    """Served probabilities against the in-process ones, within ``tolerance``: the bound of
    tests/tolerances.py on two float32 evaluations of the network (other batches, other processes)."""
    error = np.abs(np.asarray(answer, dtype=np.float64) - expected)
    assert error.shape == expected.shape
    assert np.all(error <= tolerance), f"{float(np.max(error / tolerance)):.3g} times the rounding bound"


def rest_json(server: Server, body: object, path: str = INFER) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=30)


def as_json_input(name: str, array: np.ndarray) -> dict:
    return {"name": name, "datatype": "FP32", "shape": list(array.shape), "data": array.ravel().tolist()}


# --- agreement with in-process inference ------------------------------------------------------


def test_rest_json_and_binary_and_grpc_agree_with_in_process(
    server: Server, reference: TorchBackend, small_jets: JetBatch
) -> None:
    jets = small_jets.constituents[:6]
    images = reference.render(jets)
    expected = reference.predict(images)
    same_images = tagger_probability_bound(reference.model, images)
    rendered_there = tagger_probability_bound(reference.model, images, jets)  # the server renders them

    answer = rest_json(server, {"id": "json-1", "inputs": [as_json_input("images", images)]})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["id"] == "json-1" and body["outputs"][0]["name"] == "probabilities"
    assert_as_in_process(np.reshape(body["outputs"][0]["data"], (6, 2)), expected, same_images)

    async def clients() -> tuple[np.ndarray, np.ndarray]:
        async with TaggerClient(server.url) as rest, TaggerClient(server.grpc_url) as rpc:
            return await rest.infer(constituents=jets), await rpc.infer(constituents=jets)

    rest_binary, grpc_answer = asyncio.run(clients())
    assert_as_in_process(rest_binary, expected, rendered_there)
    assert_as_in_process(grpc_answer, expected, rendered_there)
    # float32 softmax: exp within 1 ulp (2u) in the numerator and in the sum's terms, the sum, the
    # reciprocal (or division) and the product, u each: |sum - 1| <= gamma(8) (sum taken in float64)
    assert np.all(np.abs(expected.sum(axis=1, dtype=np.float64) - 1.0) <= gamma(8))


def test_three_channel_images_as_cmssw_sends_them(
    server: Server, reference: TorchBackend, small_jets: JetBatch
) -> None:
    images = reference.render(small_jets.constituents[:3])
    rgb = np.ascontiguousarray(np.repeat(images, 3, axis=1))
    answer = rest_json(server, {"inputs": [as_json_input("images", rgb)]})
    assert answer.status_code == 200, answer.text
    assert_as_in_process(
        np.reshape(answer.json()["outputs"][0]["data"], (3, 2)),
        reference.predict(images),
        tagger_probability_bound(reference.model, images),
    )


def test_concurrent_callers_each_get_their_own_rows(
    server: Server, reference: TorchBackend, small_jets: JetBatch
) -> None:
    jets = small_jets.constituents[:48]
    images = reference.render(jets)
    expected = reference.predict(images)
    tolerance = tagger_probability_bound(reference.model, images, jets)

    async def scenario() -> list[np.ndarray]:
        async with TaggerClient(server.grpc_url) as rpc, TaggerClient(server.url) as rest:
            calls = []
            for i in range(0, 48, 2):  # 24 requests of 2 jets, alternating protocols
                client = rpc if (i // 2) % 2 else rest
                calls.append(client.infer(constituents=jets[i : i + 2]))
            return await asyncio.gather(*calls)

    answers = asyncio.run(scenario())
    assert_as_in_process(np.concatenate(answers), expected, tolerance)
    stats = httpx.get(f"{server.url}/metrics").text
    # merged batches happened: some batch held more than one request's 2 rows
    assert any(line.startswith("toptagger_batch_size_bucket") and 'le="2.0"' in line for line in stats.splitlines())
    counts = {
        line.split('le="')[1].split('"')[0]: float(line.split()[-1])
        for line in stats.splitlines()
        if line.startswith("toptagger_batch_size_bucket")
    }
    assert counts["+Inf"] > counts["2.0"], "some batches must have merged several requests"


# --- Triton / SONIC clients, unchanged ---------------------------------------------------------


def test_real_triton_clients(server: Server, reference: TorchBackend) -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(HERE / "triton_client_check.py"),
            server.http_target,
            server.grpc_target,
            str(IMAGE_SIZE),
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    config = answer["config"]
    assert config["name"] == "top-tagger" and config["max_batch_size"] == 8
    assert {i["name"]: i["dims"] for i in config["input"]} == {
        "images": ["3", str(IMAGE_SIZE), str(IMAGE_SIZE)],
        "constituents": ["200", "4"],
    }
    assert config["output"][0] == {"name": "probabilities", "data_type": "TYPE_FP32", "dims": ["2"]}
    assert [i["name"] for i in answer["metadata"]["inputs"]] == ["images", "constituents"]
    images = np.asarray(answer["images"], np.float32)
    expected = reference.predict(images)
    tolerance = tagger_probability_bound(reference.model, images)
    assert_as_in_process(answer["grpc_probabilities"], expected, tolerance)
    assert_as_in_process(answer["http_probabilities"], expected, tolerance)
    stats = answer["statistics"]["model_stats"][0]
    assert int(stats["inference_count"]) >= 3 and int(stats["execution_count"]) >= 1
    assert int(stats["inference_stats"]["compute_infer"]["ns"]) > 0
    assert int(stats["inference_stats"]["queue"]["count"]) >= 1
    assert "NOT_FOUND" in answer["unknown_model_config"]
    # The repository index (what CMSSW's TritonService asks first), and Triton's HTTP extensions.
    assert answer["grpc_index"]["models"] == [{"name": "top-tagger", "version": "1", "state": "READY"}]
    assert answer["http_index"] == [{"name": "top-tagger", "version": "1", "state": "READY"}]
    http_config = answer["http_config"]
    assert http_config["max_batch_size"] == 8 and http_config["input"][0]["dims"] == [3, IMAGE_SIZE, IMAGE_SIZE]
    assert http_config["input"][0]["data_type"] == "TYPE_FP32"
    http_stats = answer["http_statistics"]["model_stats"][0]
    assert http_stats["version"] == "1" and http_stats["inference_count"] >= int(stats["inference_count"])


# --- bad input: 4xx with a message, never 5xx, server keeps serving ----------------------------

IMAGE = np.zeros((1, 1, IMAGE_SIZE, IMAGE_SIZE), np.float32)
JET = np.zeros((1, 200, 4), np.float32)
JET[0, 0] = (100.0, 60.0, 0.0, 80.0)  # one massless constituent (E = |p|), the rest padding: a valid jet


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"inputs": [{**as_json_input("images", IMAGE), "name": "pixels"}]}, 400, "unknown input 'pixels'"),
        (
            {"inputs": [{"name": "images", "datatype": "INT32", "shape": [1, 1, 32, 32], "data": [0] * 1024}]},
            400,
            "must be FP32, got INT32",
        ),
        ({"inputs": [{**as_json_input("images", IMAGE), "shape": [1, 32, 32]}]}, 400, "must have shape"),
        ({"inputs": [{**as_json_input("images", IMAGE), "shape": [1, 1, 16, 64]}]}, 400, "must have shape"),
        (
            {"inputs": [{"name": "constituents", "datatype": "FP32", "shape": [9, 200, 4], "data": [0.0] * 7200}]},
            400,
            "exceeds the maximum batch size 8",
        ),
        ({"inputs": [{**as_json_input("images", IMAGE), "data": [0.0] * 100}]}, 400, "does not match shape"),
        ({"inputs": [{"name": "constituents", "datatype": "FP32", "shape": [0, 200, 4], "data": []}]}, 400, "empty"),
        ({"inputs": []}, 400, "exactly one input"),
        ({"inputs": [as_json_input("images", IMAGE), as_json_input("constituents", JET)]}, 400, "exactly one input"),
        ({"outputs": []}, 400, "malformed request"),
    ],
)
def test_bad_json_requests(server: Server, body: dict, status: int, message: str) -> None:
    answer = rest_json(server, body)
    assert answer.status_code == status, answer.text
    assert message in answer.json()["error"]


def _binary(header: dict, payload: bytes, declared: int | None = None) -> tuple[bytes, dict]:
    head = json.dumps(header).encode()
    return head + payload, {
        "Inference-Header-Content-Length": str(len(head) if declared is None else declared),
        "Content-Type": "application/octet-stream",
    }


def test_bad_binary_and_malformed_bodies(server: Server) -> None:
    data = JET.tobytes()
    good_header = {
        "inputs": [
            {"name": "constituents", "datatype": "FP32", "shape": [1, 200, 4], "parameters": {"binary_data_size": 3200}}
        ]
    }
    for bad in (np.nan, np.inf):  # JSON cannot carry NaN/Inf; the binary extension can
        poisoned = JET.copy()
        poisoned[0, 3, 1] = bad
        body, headers = _binary(good_header, poisoned.tobytes())
        answer = httpx.post(f"{server.url}{INFER}", content=body, headers=headers, timeout=30)
        assert answer.status_code == 400 and "NaN or Inf" in answer.json()["error"]
    cases = {
        "truncated payload": _binary(good_header, data[:1000]),
        "byte length does not match the shape": _binary(
            {"inputs": [{**good_header["inputs"][0], "parameters": {"binary_data_size": 3000}}]}, data[:3000]
        ),
        "header length beyond the body": _binary(good_header, data, declared=10**6),
    }
    for name, (body, headers) in cases.items():
        answer = httpx.post(f"{server.url}{INFER}", content=body, headers=headers, timeout=30)
        assert answer.status_code == 400, (name, answer.text)
        assert answer.json()["error"], name
    for raw in (b'{"inputs": [', b"not json at all", b"\xff\xfe\x00"):
        answer = httpx.post(f"{server.url}{INFER}", content=raw, headers={"Content-Type": "application/json"})
        assert answer.status_code == 400, answer.text
        assert "malformed" in answer.json()["error"] or "Unrecognized" in answer.json()["error"]


def test_unknown_model_and_oversized_body(server: Server) -> None:
    answer = rest_json(server, {"inputs": [as_json_input("images", IMAGE)]}, path="/v2/models/nope/infer")
    assert answer.status_code == 404 and "nope" in answer.json()["error"]  # HTTP's code for an unknown resource
    huge = b"0" * (65 * 1024 * 1024)
    answer = httpx.post(f"{server.url}{INFER}", content=huge, headers={"Content-Type": "application/json"})
    assert answer.status_code == 413 and "exceeds" in answer.json()["error"]  # HTTP's code for a body too large
    assert rest_json(server, {"inputs": [as_json_input("images", IMAGE)]}).status_code == 200, "still serving"


def test_bad_grpc_requests(server: Server) -> None:
    channel = grpc.insecure_channel(server.grpc_target)
    stub = pb_grpc.GRPCInferenceServiceStub(channel)

    def call(
        name: str,
        shape: list[int],
        raw: bytes,
        datatype: str = "FP32",
        model: str = "top-tagger",
        version: str = "",
        output: str = "",
        typed: list[float] | None = None,
    ) -> grpc.RpcError:
        request = pb.ModelInferRequest(model_name=model, model_version=version, id="bad-request-7")
        tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
        if typed is not None:
            tensor.contents.fp32_contents.extend(typed)
        if raw or typed is None:
            request.raw_input_contents.append(raw)
        if output:
            request.outputs.add(name=output)
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(request, timeout=30)
        return caught.value

    nan = np.full((1, 200, 4), np.nan, np.float32).tobytes()
    cases = [
        (call("pixels", [1, 200, 4], JET.tobytes()), grpc.StatusCode.INVALID_ARGUMENT, "unknown input"),
        (call("constituents", [1, 200, 4], JET.tobytes(), "FP64"), grpc.StatusCode.INVALID_ARGUMENT, "FP32"),
        (call("constituents", [1, 200, 3], JET.tobytes()), grpc.StatusCode.INVALID_ARGUMENT, "shape"),
        (call("constituents", [1, 200, 4], nan), grpc.StatusCode.INVALID_ARGUMENT, "NaN"),
        (call("constituents", [1, 200, 4], JET.tobytes()[:999]), grpc.StatusCode.INVALID_ARGUMENT, "999 bytes"),
        (call("constituents", [1, 200, 4], b"", typed=[1.0] * 7), grpc.StatusCode.INVALID_ARGUMENT, "7 fp32_contents"),
        (call("constituents", [1, 200, 4], JET.tobytes(), typed=[1.0]), grpc.StatusCode.INVALID_ARGUMENT, "once"),
        (call("constituents", [1, 200, 4], JET.tobytes(), output="logits"), grpc.StatusCode.INVALID_ARGUMENT, "logits"),
        (call("constituents", [1, 200, 4], JET.tobytes(), version="9"), grpc.StatusCode.NOT_FOUND, "version '9'"),
        (call("constituents", [20, 200, 4], JET.tobytes() * 20), grpc.StatusCode.INVALID_ARGUMENT, "maximum batch"),
        (call("constituents", [0, 200, 4], b""), grpc.StatusCode.INVALID_ARGUMENT, "empty"),
        (call("constituents", [1, 200, 4], JET.tobytes(), model="nope"), grpc.StatusCode.NOT_FOUND, "nope"),
    ]
    for error, code, message in cases:
        assert error.code() == code, error.details()
        assert message in (error.details() or "")
    good = pb.ModelInferRequest(model_name="top-tagger")
    good.inputs.add(name="constituents", datatype="FP32", shape=[1, 200, 4])
    good.raw_input_contents.append(JET.tobytes())
    assert stub.ModelInfer(good, timeout=30).outputs[0].name == "probabilities"
    channel.close()
    assert '"request_id": "bad-request-7"' in server.log_text(), "refusals are logged with the request id"


def test_grpc_typed_contents_agree_with_raw(server: Server, reference: TorchBackend, small_jets: JetBatch) -> None:
    """Clients that send ``contents.fp32_contents`` instead of raw bytes get the same answer."""
    jets = small_jets.constituents[:2]
    stub = pb_grpc.GRPCInferenceServiceStub(channel := grpc.insecure_channel(server.grpc_target))
    request = pb.ModelInferRequest(model_name="top-tagger", id="typed-1")
    request.inputs.add(name="constituents", datatype="FP32", shape=[2, 200, 4]).contents.fp32_contents.extend(
        jets.ravel().tolist()
    )
    answer = stub.ModelInfer(request, timeout=30)
    channel.close()
    assert answer.id == "typed-1" and answer.model_name == "top-tagger"
    assert answer.outputs[0].name == "probabilities" and list(answer.outputs[0].shape) == [2, 2]
    probabilities = np.frombuffer(answer.raw_output_contents[0], np.float32).reshape(2, 2)
    images = reference.render(jets)
    assert_as_in_process(
        probabilities, reference.predict(images), tagger_probability_bound(reference.model, images, jets)
    )


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    body=st.recursive(
        st.none()
        | st.booleans()
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.integers()
        | st.text(max_size=8),
        lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
        max_leaves=20,
    )
    | st.fixed_dictionaries(
        {
            "inputs": st.lists(
                st.fixed_dictionaries(
                    {
                        "name": st.sampled_from(["images", "constituents", "x", ""]),
                        "datatype": st.sampled_from(["FP32", "FP16", "INT8", "BYTES", "BOOL", "??"]),
                        "shape": st.lists(st.integers(-3, 300), max_size=5),
                        "data": st.lists(
                            st.floats(allow_nan=False, allow_infinity=False, width=32) | st.integers(), max_size=30
                        ),
                    }
                ),
                max_size=2,
            )
        }
    )
)
def test_fuzzed_rest_bodies_never_get_a_5xx(server: Server, body: object) -> None:
    answer = httpx.post(f"{server.url}{INFER}", json=body, timeout=30)
    assert answer.status_code < 500, answer.text


def test_metrics_and_request_ids(server: Server) -> None:
    answer = httpx.post(
        f"{server.url}{INFER}",
        json={"inputs": [as_json_input("images", IMAGE)]},
        headers={"x-request-id": "trace-me-42"},
    )
    assert answer.headers["x-request-id"] == "trace-me-42"
    assert answer.json()["id"] == "trace-me-42"
    text = httpx.get(f"{server.url}/metrics").text
    for name in (
        'toptagger_requests_total{protocol="rest",status="200"}',
        'toptagger_requests_total{protocol="grpc"',
        "toptagger_request_latency_seconds_bucket",
        "toptagger_batch_size_bucket",
        "toptagger_queue_depth 0.0",  # read from the batchers at the scrape: nothing waits now
        "toptagger_requests_in_flight 0.0",
        "toptagger_compute_seconds_bucket",
    ):
        assert name in text, name


def test_triton_metrics_port_counts_what_model_statistics_counts(server: Server) -> None:
    """``--metrics-port``: Triton's nv_inference_* families, the same counts as ModelStatistics (one owner)."""
    answer = httpx.post(f"{server.url}{INFER}", json={"inputs": [as_json_input("images", IMAGE)]}, timeout=30)
    assert answer.status_code == 200
    scraped = scrape(server)
    (entry,) = httpx.get(f"{server.url}/v2/models/top-tagger/stats", timeout=30).json()["model_stats"]
    labels = 'model="top-tagger",version="1"'
    stats = entry["inference_stats"]
    assert scraped[f"nv_inference_request_success{{{labels}}}"] == stats["success"]["count"] > 0
    assert scraped[f"nv_inference_count{{{labels}}}"] == entry["inference_count"]
    assert scraped[f"nv_inference_exec_count{{{labels}}}"] == entry["execution_count"]
    failures = sum(value for key, value in scraped.items() if key.startswith("nv_inference_request_failure{"))
    assert failures == stats["fail"]["count"]
    for family, part in (("request", "success"), ("queue", "queue"), ("compute_infer", "compute_infer")):
        name = f"nv_inference_{family}_duration_us"
        assert scraped[f"{name}{{{labels}}}"] == pytest.approx(stats[part]["ns"] / 1000, rel=1e-12)
    assert scraped[f"nv_inference_pending_request_count{{{labels}}}"] == 0


# --- faults ------------------------------------------------------------------------------------


def test_unloadable_model_leaves_server_up_but_not_ready(tmp_path: Path) -> None:
    bogus = tmp_path / "no-such-model"
    server = start_server(bogus, wait_ready=False)
    try:
        ready = httpx.get(f"{server.url}/v2/health/ready")
        assert ready.status_code == 503
        assert "no such file or folder" in ready.json()["reason"]
        assert httpx.get(f"{server.url}/v2/models/top-tagger/ready").status_code == 503
        assert httpx.get(f"{server.url}/v2/health/live").status_code == 200
        with grpc.insecure_channel(server.grpc_target) as channel:  # gRPC says what REST says
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            assert stub.ServerReady(pb.ServerReadyRequest(), timeout=30).ready is False
            assert stub.ServerLive(pb.ServerLiveRequest(), timeout=30).live is True
        # Triton's metrics are there at zero although the model never loaded.
        assert set(scrape(server).values()) == {0.0}
        infer = rest_json(server, {"inputs": [as_json_input("images", IMAGE)]})
        assert infer.status_code == 503
        assert "no such file or folder" in server.log_text()
        request = pb.ModelInferRequest(model_name="top-tagger")
        request.inputs.add(name="constituents", datatype="FP32", shape=[1, 200, 4])
        request.raw_input_contents.append(JET.tobytes())
        with grpc.insecure_channel(server.grpc_target) as channel, pytest.raises(grpc.RpcError) as caught:
            pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "no such file or folder" in (caught.value.details() or "")
        # The repository lists the model as unavailable, with the reason; asked for ready models only, none.
        index = httpx.post(f"{server.url}/v2/repository/index", json={}).json()
        assert [(m["name"], m["state"]) for m in index] == [("top-tagger", "UNAVAILABLE")]
        assert "no such file or folder" in index[0]["reason"]
        assert httpx.post(f"{server.url}/v2/repository/index", json={"ready": True}).json() == []
        assert httpx.post(f"{server.url}/v2/repository/index", content=b"[1, 2").status_code == 400
        assert httpx.get(f"{server.url}/v2/models/other/config").status_code == 404
        assert httpx.get(f"{server.url}/v2/models/top-tagger/versions/2/stats").status_code == 400  # as Triton
    finally:
        stop_server(server)


def test_full_queue_answers_503_and_resource_exhausted(model_dir: Path, tmp_path: Path, small_jets: JetBatch) -> None:
    server = start_server(model_dir, "--max-batch-size", "1", "--max-queue", "1")
    jets = small_jets.constituents[:1]

    async def flood(url: str) -> list[str]:
        async with TaggerClient(url, retry=RetryPolicy(attempts=1)) as client:

            async def one() -> str:
                try:
                    await client.infer(constituents=jets)
                    return "ok"
                except InferenceFailed as exc:
                    return str(exc)

            return await asyncio.gather(*(one() for _ in range(40)))

    try:
        for url, marker in ((server.url, "queue is full"), (server.grpc_url, "RESOURCE_EXHAUSTED")):
            outcomes = asyncio.run(flood(url))
            assert "ok" in outcomes
            refused = [o for o in outcomes if o != "ok"]
            assert refused, "a queue of 1 cannot hold 40 simultaneous requests"
            assert all(marker in o or "queue is full" in o for o in refused), refused[:3]
        assert asyncio.run(flood(server.grpc_url)).count("ok") >= 1, "still serving afterwards"
    finally:
        stop_server(server)


def test_client_retries_until_the_server_is_up(model_dir: Path, reference: TorchBackend) -> None:
    from serving.process import free_port

    port = free_port()
    images = np.ones((1, 1, IMAGE_SIZE, IMAGE_SIZE), np.float32)

    async def scenario() -> np.ndarray:
        client = TaggerClient(f"grpc://127.0.0.1:{port}", deadline_s=90, retry=RetryPolicy(attempts=200, backoff_s=0.2))
        try:
            task = asyncio.create_task(client.infer(images=images))
            await asyncio.sleep(0.5)
            process = await asyncio.to_thread(start_server_on, model_dir, port)
            try:
                return await task
            finally:
                await asyncio.to_thread(stop_server, process)
        finally:
            await client.close()

    assert_as_in_process(
        asyncio.run(scenario()), reference.predict(images), tagger_probability_bound(reference.model, images)
    )


def start_server_on(model_dir: Path, grpc_port: int) -> Server:
    """A server whose gRPC port was chosen by the test (the client already dials it)."""
    return start_server(model_dir, grpc_port=grpc_port)


def test_client_falls_back_or_fails_cleanly_when_nothing_listens(reference: TorchBackend) -> None:
    from serving.process import free_port

    images = np.ones((2, 1, IMAGE_SIZE, IMAGE_SIZE), np.float32)
    url = f"grpc://127.0.0.1:{free_port()}"

    def in_process(name: str, array: np.ndarray) -> np.ndarray:
        return reference.predict(array)

    async def scenario() -> tuple[np.ndarray, str, int]:
        async with TaggerClient(url, deadline_s=2, fallback=in_process) as client:
            answer = await client.infer(images=images)
            fallbacks = client.fallbacks
        async with TaggerClient(url, deadline_s=1) as plain:
            try:
                await plain.infer(images=images)
                failure = "answered"
            except InferenceFailed as exc:
                failure = str(exc)
        return answer, failure, fallbacks

    answer, failure, fallbacks = asyncio.run(scenario())
    # the fallback is reference.predict itself on the same images: identical, not merely close
    np.testing.assert_array_equal(answer, reference.predict(images))
    assert fallbacks == 1
    assert "UNAVAILABLE" in failure


def test_killing_the_server_mid_benchmark(
    model_dir: Path, tmp_path: Path, reference: TorchBackend, small_jets: JetBatch
) -> None:
    """Clients fail over to in-process inference or fail within their deadline; no answer is misassigned."""
    server = start_server(model_dir)
    jets = small_jets.constituents[:64]
    images = reference.render(jets)
    expected = reference.predict(images)
    tolerance = tagger_probability_bound(reference.model, images, jets)  # served or fallback: one jet at a time

    def in_process(name: str, array: np.ndarray) -> np.ndarray:
        return reference.predict(reference.render(array))

    async def client_loop(index: int, fallback: bool, outcomes: list) -> None:
        async with TaggerClient(
            server.grpc_url, deadline_s=3, retry=RetryPolicy(attempts=3), fallback=in_process if fallback else None
        ) as client:
            for step in range(30):
                row = (index * 7 + step) % len(jets)
                try:
                    answer = await client.infer(constituents=jets[row : row + 1])
                    outcomes.append((row, answer))
                except InferenceFailed:
                    outcomes.append((row, None))

    async def scenario() -> list:
        outcomes: list = []
        tasks = [asyncio.create_task(client_loop(i, i % 2 == 0, outcomes)) for i in range(8)]
        await asyncio.sleep(1.0)
        server.process.kill()
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=120)
        return outcomes

    try:
        outcomes = asyncio.run(scenario())
    finally:
        stop_server(server)
    answered = [(row, a) for row, a in outcomes if a is not None]
    assert len(outcomes) == 8 * 30
    assert len(answered) > len(outcomes) / 2, "fallback clients keep answering after the kill"
    for row, answer in answered:
        assert_as_in_process(answer, expected[row : row + 1], tolerance[row : row + 1])
