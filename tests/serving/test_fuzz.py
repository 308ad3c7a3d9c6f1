"""Malformed requests, generated: never a 5xx, UNKNOWN or INTERNAL, and the server stays ready.

A seeded, bounded generator mutates valid REST bodies (JSON and the binary tensor extension,
FP32 and BYTES tensors), binary-extension headers, Triton's REST extensions and raw protobuf
``ModelInferRequest``\\ s (garbage ``raw_input_contents``, wrong byte counts, negative, huge and zero
dims, wrong datatypes, missing fields, unknown parameters, nesting) and sends them to one real
server process. Every answer must be a client error (4xx / a gRPC code other than UNKNOWN and
INTERNAL) with a message, or a success; readiness is asked after every case. The server's log must
stay quiet: no ERROR, no traceback, and client errors at most once per (endpoint, reason).
"""

from __future__ import annotations

import json
import os
import random
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb

from tests.predictor import IMAGE_SIZE, Server, start_server, stop_server
from toptagger.jets.dataset import JetBatch

SEED = int(os.environ.get("FUZZ_SEED", "22"))  # another seed explores further; the suite keeps 22
REST_CASES = 240
GRPC_CASES = 140
MODEL = "top-tagger"
GRPC_SERVICE = "/inference.GRPCInferenceService/"
BAD_GRPC_CODES = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}


@pytest.fixture(scope="module")
def fuzz_server(model_dir: Path) -> Iterator[Server]:
    """One predictor process for every case of this module."""
    running = start_server(model_dir, "--max-batch-size", "4")
    yield running
    stop_server(running)


def _deep(depth: int, kind: str) -> str:
    return "[" * depth + "]" * depth if kind == "list" else '{"a":' * depth + "1" + "}" * depth


class RestFuzz:
    """One malformed (or valid) REST request per call: (method, path, body bytes, headers)."""

    def __init__(self, rng: random.Random, jets: np.ndarray) -> None:
        self.rng, self.jets = rng, jets

    def pick(self, *options: Any) -> Any:
        return options[self.rng.randrange(len(options))]

    def infer_path(self) -> str:
        version = self.pick(*[""] * 6, *["/versions/1"] * 4, "/versions/2", "/versions/%ff", "/versions/" + "9" * 40)
        return f"/v2/models/{self.pick(*[MODEL] * 12, 'nope', '')}{version}/infer"

    def shape(self, good: list[int]) -> Any:
        r = self.rng
        return self.pick(
            good,
            good,
            [-1, *good[1:]],
            [0, *good[1:]],
            [2**40, *good[1:]],
            [2**63, *good[1:]],
            [-(2**63), *good[1:]],
            [good[0], -4, *good[2:]],
            good[:-1],
            [*good, 1],
            [],
            [1.5, *good[1:]],
            ["1", *good[1:]],
            [[1], *good[1:]],
            [True, *good[1:]],
            None,
            "1,200,4",
            [r.randint(-5, 300) for _ in range(r.randint(0, 6))],
        )

    def datatype(self) -> Any:
        return self.pick(
            "FP32", "FP32", "FP32", "FP64", "FP16", "INT32", "BYTES", "BOOL", "", "fp32", "x" * 300, 5, None
        )

    def data(self, count: int) -> Any:
        r = self.rng
        base = self.jets[:1].ravel().tolist()
        return self.pick(
            (base * (count // len(base) + 1))[:count],
            base[: r.randint(0, 50)],
            [r.uniform(-1e3, 1e3) for _ in range(r.randint(0, 20))],
            ["a"] * 10,
            [[1.0, 2.0], [3.0]],
            [None] * 5,
            [True, False],
            [10**400],
            "1.0 2.0",
            {"a": 1},
            None,
            [0.0] * count,  # an all-zero jet: not a jet
            [-1.0] * count,  # negative energies
        )

    def json_body(self) -> bytes:
        r = self.rng
        tensor: dict[str, Any] = {
            "name": self.pick("constituents", "constituents", "images", "", "x", 7, None),
            "datatype": self.datatype(),
            "shape": self.shape([1, 200, 4]),
        }
        tensor["data"] = self.data(800)
        if r.random() < 0.3:
            tensor["parameters"] = self.pick({"binary_data_size": -5}, {"unknown": [1, {"x": None}]}, [], "p", None)
        if r.random() < 0.2:
            del tensor[self.pick("name", "datatype", "shape", "data")]
        body: Any = {"inputs": self.pick([tensor], [tensor], [tensor, tensor], [], tensor, "inputs", None)}
        if r.random() < 0.2:
            body["outputs"] = self.pick([{"name": "logits"}], [{}], ["probabilities"], {"name": 1}, [{"name": None}])
        if r.random() < 0.15:
            body["parameters"] = self.pick({"binary_data_output": "yes"}, {"x": {"y": [1]}}, 5, [])
        if r.random() < 0.15:
            body["id"] = self.pick(5, ["a"], {"x": 1}, "a" * 1000)
        text = json.dumps(body)
        if r.random() < 0.1:
            text = self.pick([], "x", 1.5, None, True, '"a"')
            text = json.dumps(text)
        return text.encode()

    def binary_body(self) -> tuple[bytes, dict[str, str]]:
        r = self.rng
        datatype = self.pick("FP32", "FP32", "BYTES", "BYTES", "INT8", "FP64")
        shape = self.shape([1, 200, 4] if datatype != "BYTES" else [1])
        if datatype == "BYTES":
            element = self.pick(b"abc", b"\xff\xfe\xfa", b"\xc3\x28", b"")
            declared = self.pick(len(element), len(element) + 7, 2**31, 2**32 - 1, 0)
            payload = struct.pack("<I", declared) + element
            payload = self.pick(payload, payload[:2], payload * 3, b"\x01")
        else:
            payload = self.jets[:1].tobytes()
            payload = self.pick(
                payload, payload[:-1], payload[:1000], payload + b"\x00", b"", r.randbytes(r.randint(1, 64))
            )
            if r.random() < 0.2:
                payload = np.full((1, 200, 4), self.pick(np.nan, np.inf, -1.0, 0.0, 1e20), np.float32).tobytes()
        size = self.pick(len(payload), len(payload), len(payload) - 1, len(payload) + 8, -1, 2**63, "12", None, 0)
        tensor = {"name": self.pick("constituents", "images", "x"), "datatype": datatype, "shape": shape}
        tensor["parameters"] = {"binary_data_size": size} if size is not None else {}
        header = json.dumps({"inputs": [tensor]}).encode()
        if r.random() < 0.15:
            header = self.pick(b"{", b"\xff\xfe", _deep(5000, "list").encode(), b"[]", b"null")
        length: Any = self.pick(
            len(header), len(header), len(header) + 1, len(header) - 1, 0, -3, 2**70, "abc", "", "12abc", "1e3"
        )
        headers = {"Inference-Header-Content-Length": str(length), "Content-Type": "application/octet-stream"}
        return header + payload, headers

    def case(self) -> tuple[str, str, bytes, dict[str, str]]:
        r = self.rng
        kind = r.random()
        json_headers = {"Content-Type": "application/json"}
        if kind < 0.35:
            return "POST", self.infer_path(), self.json_body(), json_headers
        if kind < 0.6:
            return "POST", self.infer_path(), *self.binary_body()
        if kind < 0.7:  # not JSON, or nested past any parser's recursion limit
            body = self.pick(
                _deep(r.choice([200, 2000, 50000]), self.pick("list", "dict")).encode(),
                b'{"inputs": [',
                b"\xff\xfe\x00",
                r.randbytes(r.randint(0, 200)),
                b'{"inputs": [' + _deep(3000, "list").encode() + b"]}",
                b"NaN",
            )
            # any endpoint that reads a body: ours, Triton's, KServe's v1 and control routes
            where = self.pick(
                self.infer_path(),
                "/v2/repository/index",
                f"/v1/models/{MODEL}:predict",
                f"/v1/models/{MODEL}:explain",
                f"/v2/repository/models/{MODEL}/load",
                "/v2/repository/models/nope/unload",
            )
            return "POST", where, body, json_headers
        if kind < 0.82:  # Triton's repository index
            body = self.pick(
                b"",
                b"{}",
                b'{"ready": true}',
                b'{"ready": "yes"}',
                b"[]",
                b"5",
                b"null",
                b"{",
                _deep(r.choice([100, 5000, 100000]), self.pick("list", "dict")).encode(),
                b'{"ready": ' + _deep(10000, "list").encode() + b"}",
                r.randbytes(32),
            )
            return "POST", "/v2/repository/index", body, json_headers
        # model routes, versioned or not
        if r.random() < 0.2:  # KServe's other routes
            path = self.pick("/v2", "/v2/models", f"/v1/models/{MODEL}", "/v1/models", "/v2/health/live", "/metrics")
            return "GET", path, b"", {}
        name = self.pick(MODEL, MODEL, "nope", "%00", "a" * 500)
        version = self.pick("", "", "/versions/1", "/versions/2", "/versions/0", "/versions/-1", "/versions/x y")
        suffix = self.pick("", "/ready", "/config", "/stats", "/infer")
        method = "GET" if suffix != "/infer" or r.random() < 0.5 else "POST"
        return method, f"/v2/models/{name}{version}{suffix}", b"", {}


def _deep_groups(depth: int) -> bytes:
    """Protobuf bytes nesting ``depth`` unknown groups (field 99): past the parser's recursion limit."""
    start, end = (99 << 3) | 3, (99 << 3) | 4
    return _varint(start) * depth + _varint(end) * depth


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


class GrpcFuzz:
    """One gRPC call per case: (method, serialized request)."""

    def __init__(self, rng: random.Random, jets: np.ndarray) -> None:
        self.rng, self.jets = rng, jets

    def pick(self, *options: Any) -> Any:
        return options[self.rng.randrange(len(options))]

    def infer(self) -> bytes:
        r = self.rng
        request = pb.ModelInferRequest(
            model_name=self.pick(*[MODEL] * 12, "", "nope"),
            model_version=self.pick(*[""] * 6, *["1"] * 4, "2", "-1"),
            id=self.pick("", "fuzz", "x" * 1000),
        )
        for _ in range(self.pick(1, 1, 1, 0, 2)):
            tensor = request.inputs.add(
                name=self.pick("constituents", "constituents", "images", "", "x"),
                datatype=self.pick("FP32", "FP32", "FP32", "FP64", "BYTES", "INT64", "", "BOOL"),
            )
            good = [1, 200, 4] if tensor.name != "images" else [1, 1, IMAGE_SIZE, IMAGE_SIZE]
            tensor.shape.extend(
                self.pick(
                    good,
                    good,
                    [-1, *good[1:]],
                    [0, *good[1:]],
                    [2**62, *good[1:]],
                    [-(2**63), *good[1:]],
                    [1, 2**31, 2**31],
                    good[:-1],
                    [],
                    [*good, 1],
                    [r.randint(-3, 300) for _ in range(r.randint(0, 8))],
                )
            )
            if r.random() < 0.25:
                parameter = tensor.parameters[self.pick("binary_data_size", "unknown", "")]
                self.parameter(parameter)
            if r.random() < 0.3:
                self.contents(tensor)
        count = 800 if not request.inputs or request.inputs[0].name != "images" else IMAGE_SIZE * IMAGE_SIZE
        raw = self.jets[:1].tobytes() if count == 800 else np.zeros(count, np.float32).tobytes()
        for _ in range(self.pick(1, 1, 1, 0, 2)):
            request.raw_input_contents.append(
                self.pick(
                    raw,
                    raw,
                    raw[:-1],
                    raw + b"\x00\x00\x00\x00",
                    b"",
                    r.randbytes(r.randint(1, 4000)),
                    r.randbytes(len(raw)),  # garbage of the right length: NaN, huge, negative energies...
                    np.zeros(200 * 4, np.float32).tobytes(),
                    np.full(200 * 4, -1.0, np.float32).tobytes(),
                )
            )
        if r.random() < 0.3:
            self.parameter(request.parameters[self.pick("binary_data_output", "unknown", "sequence_id", "x" * 300)])
        if r.random() < 0.2:
            for _ in range(r.randint(1, 3)):
                output = request.outputs.add(name=self.pick("probabilities", "logits", ""))
                if r.random() < 0.5:
                    self.parameter(output.parameters["binary_data"])
        data = request.SerializeToString()
        if r.random() < 0.1:  # bytes no protobuf parser accepts as this message
            data = self.pick(data[: r.randint(0, len(data))], data + r.randbytes(9), _deep_groups(5000) + data)
        return data

    def parameter(self, parameter: pb.InferParameter) -> None:
        r = self.rng
        which = r.randrange(4)
        if which == 0:
            parameter.int64_param = self.pick(-1, 2**62, 0)
        elif which == 1:
            parameter.bool_param = True
        elif which == 2:
            parameter.string_param = self.pick("", "yes", "\u2603" * 50)
        # else: a parameter with no value set at all

    def contents(self, tensor: pb.ModelInferRequest.InferInputTensor) -> None:
        r = self.rng
        which = r.randrange(5)
        if which == 0:
            tensor.contents.fp32_contents.extend(self.jets[:1].ravel().tolist()[: self.pick(800, 7, 0, 799)])
        elif which == 1:
            tensor.contents.int_contents.extend([1, 2, 3])
        elif which == 2:
            tensor.contents.bytes_contents.extend([b"\xff\xfe", b"abc"])
        elif which == 3:
            tensor.contents.fp64_contents.extend([1.0] * 800)
        else:
            tensor.contents.fp32_contents.extend([float("nan")] * 800)

    def case(self) -> tuple[str, bytes]:
        r = self.rng
        kind = r.random()
        if kind < 0.7:
            return "ModelInfer", self.infer()
        method = self.pick(
            "ModelMetadata", "ModelReady", "ModelConfig", "ModelStatistics", "RepositoryIndex", "ServerMetadata"
        )
        if r.random() < 0.3:
            return method, self.pick(r.randbytes(r.randint(1, 64)), _deep_groups(5000), b"\x0a\xff\xff\xff\xff\x0f")
        # name = field 1, version = field 2 in all of these requests
        name = self.pick(MODEL, MODEL, "", "nope", "\u2603")
        version = self.pick("", "1", "2", "-1")
        data = b""
        for number, value in ((1, name), (2, version)):
            encoded = value.encode()
            data += _varint(number << 3 | 2) + _varint(len(encoded)) + encoded
        if method == "RepositoryIndex":  # repository_name = 1, ready = 2 (bool)
            data = self.pick(b"", b"\x10\x01", b"\x10\x02", _varint(1 << 3 | 2) + b"\x01x")
        return method, data


def test_versioned_routes_answer_for_the_served_version_only(fuzz_server: Server, small_jets: JetBatch) -> None:
    url = f"{fuzz_server.url}/v2/models/{MODEL}"
    jets = small_jets.constituents[:1]
    body = {
        "inputs": [{"name": "constituents", "datatype": "FP32", "shape": [1, 200, 4], "data": jets.ravel().tolist()}]
    }
    for version, status in (("1", 200), ("2", 404), ("0", 404), ("latest", 404)):
        answers = {
            "infer": httpx.post(f"{url}/versions/{version}/infer", json=body, timeout=30),
            "ready": httpx.get(f"{url}/versions/{version}/ready", timeout=30),
            "metadata": httpx.get(f"{url}/versions/{version}", timeout=30),
            "config": httpx.get(f"{url}/versions/{version}/config", timeout=30),
        }
        for route, answer in answers.items():
            assert answer.status_code == status, (version, route, answer.text)
            if status != 200:
                assert f"unknown version '{version}'" in answer.json()["error"], (route, answer.text)
    assert httpx.get(f"{url}/versions/1/stats", timeout=30).json()["model_stats"][0]["version"] == "1"
    # Triton answers an unknown model or version on statistics with 400 (not 404): so do we
    assert httpx.get(f"{url}/versions/2/stats", timeout=30).status_code == 400
    channel = grpc.insecure_channel(fuzz_server.grpc_target)
    stub = channel.unary_unary(
        GRPC_SERVICE + "ModelReady",
        request_serializer=pb.ModelReadyRequest.SerializeToString,
        response_deserializer=pb.ModelReadyResponse.FromString,
    )
    assert stub(pb.ModelReadyRequest(name=MODEL, version="1"), timeout=30).ready
    with pytest.raises(grpc.RpcError) as caught:
        stub(pb.ModelReadyRequest(name=MODEL, version="2"), timeout=30)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND and "unknown version '2'" in caught.value.details()
    channel.close()


def test_impossible_jets_get_400_and_invalid_argument_naming_the_jet(fuzz_server: Server, small_jets: JetBatch) -> None:
    jets = np.array(small_jets.constituents[:3])
    jets[1] = 0  # not a jet
    body = {
        "inputs": [{"name": "constituents", "datatype": "FP32", "shape": [3, 200, 4], "data": jets.ravel().tolist()}]
    }
    answer = httpx.post(fuzz_server.infer_url, json=body, timeout=30)
    assert answer.status_code == 400 and "jet 1 has no constituent" in answer.json()["error"], answer.text
    jets = np.array(small_jets.constituents[:2])
    jets[1, 7, 0] = -jets[1, 7, 0]  # a negative energy
    request = pb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="constituents", datatype="FP32", shape=[2, 200, 4])
    request.raw_input_contents.append(jets.tobytes())
    channel = grpc.insecure_channel(fuzz_server.grpc_target)
    infer = channel.unary_unary(
        GRPC_SERVICE + "ModelInfer",
        request_serializer=pb.ModelInferRequest.SerializeToString,
        response_deserializer=pb.ModelInferResponse.FromString,
    )
    with pytest.raises(grpc.RpcError) as caught:
        infer(request, timeout=30)
    channel.close()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "jet 1, constituent 7, has negative energy" in (caught.value.details() or "")


def test_the_audits_500s_are_400s_naming_the_field(fuzz_server: Server, small_jets: JetBatch) -> None:
    """The requests the audit of issue 22 saw answered 500 or 501, each now a 4xx that says where."""
    jet = small_jets.constituents[:1].tobytes()

    def binary(tensor: dict, payload: bytes) -> httpx.Response:
        header = json.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": len(payload)}}]}).encode()
        headers = {"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"}
        return httpx.post(fuzz_server.infer_url, content=header + payload, headers=headers, timeout=30)

    cases = {
        "a -1 in a binary tensor's shape": (
            binary({"name": "constituents", "datatype": "FP32", "shape": [-1, 200, 4]}, jet),
            "batch dimension -1 in shape [-1, 200, 4]",
        ),
        "BYTES with a length prefix past the payload": (
            binary({"name": "constituents", "datatype": "BYTES", "shape": [1]}, struct.pack("<I", 2**31) + b"ab"),
            "must be FP32, got BYTES",
        ),
        "BYTES that are not UTF-8": (
            binary({"name": "constituents", "datatype": "BYTES", "shape": [1]}, struct.pack("<I", 2) + b"\xc3\x28"),
            "must be FP32, got BYTES",
        ),
        "a deeply nested repository index body": (
            httpx.post(f"{fuzz_server.url}/v2/repository/index", content=_deep(100000, "list"), timeout=30),
            "must be a JSON object",
        ),
    }
    for what, (answer, message) in cases.items():
        assert answer.status_code == 400, (what, answer.text)
        assert message in answer.json()["error"], (what, answer.text)


def _ready(url: str) -> bool:
    """Asked on a fresh connection: the server may close one after refusing a body unread."""
    return httpx.get(f"{url}/v2/health/ready", timeout=30).status_code == 200


def test_fuzzed_requests_get_client_errors_and_the_server_stays_ready(
    fuzz_server: Server, small_jets: JetBatch
) -> None:
    rng = random.Random(SEED)
    jets = np.ascontiguousarray(small_jets.constituents[:2])
    failures: list[str] = []
    statuses: dict[int, int] = {}
    client = httpx.Client(base_url=fuzz_server.url, timeout=30)
    try:
        rest = RestFuzz(rng, jets)
        for i in range(REST_CASES):
            method, path, body, headers = rest.case()
            try:
                answer = client.request(method, path, content=body, headers=headers)
            except httpx.TransportError as exc:  # a connection closed on a refused body; readiness tells more
                client.close()
                client = httpx.Client(base_url=fuzz_server.url, timeout=30)
                statuses[-1] = statuses.get(-1, 0) + 1
                if not _ready(fuzz_server.url):
                    failures.append(f"REST case {i}: {method} {path} {body[:120]!r} -> {exc!r}, then not ready")
                    break
                continue
            statuses[answer.status_code] = statuses.get(answer.status_code, 0) + 1
            what = (
                f"REST case {i}: {method} {path} {body[:120]!r} {headers} -> {answer.status_code} {answer.text[:300]}"
            )
            if answer.status_code >= 500:
                failures.append(what)
            elif answer.status_code >= 400:
                error = answer.json().get("error") if answer.headers.get("content-type") == "application/json" else None
                if not error:
                    failures.append(f"no error message: {what}")
            if not _ready(fuzz_server.url):
                failures.append(f"not ready after {what}")
                break
        assert len(statuses) >= 3, statuses  # the generator reaches several different answers

        codes: dict[str, int] = {}
        channel = grpc.insecure_channel(fuzz_server.grpc_target)
        fuzz = GrpcFuzz(rng, jets)
        for i in range(GRPC_CASES):
            method, data = fuzz.case()
            call = channel.unary_unary(GRPC_SERVICE + method)  # raw bytes in, raw bytes out
            try:
                call(data, timeout=30)
                code, details = grpc.StatusCode.OK, ""
            except grpc.RpcError as error:
                code, details = error.code(), error.details() or ""
            codes[code.name] = codes.get(code.name, 0) + 1
            what = f"gRPC case {i}: {method} {data[:120]!r} -> {code.name} {details[:300]}"
            if code in BAD_GRPC_CODES:
                failures.append(what)
            elif code != grpc.StatusCode.OK and not details:
                failures.append(f"no message: {what}")
            if not _ready(fuzz_server.url):
                failures.append(f"not ready after {what}")
                break
        channel.close()
        assert len(codes) > 2, codes
    finally:
        client.close()
    print(f"REST answers {sorted(statuses.items())}, gRPC codes {sorted(codes.items())}")
    assert not failures, "\n".join(failures[:30])
    log = fuzz_server.log_text()
    assert "Traceback" not in log and '"level": "ERROR"' not in log, log[-5000:]
    lines = [json.loads(line) for line in log.splitlines() if '"client_error"' in line]
    assert lines, "client errors are logged (once per endpoint and reason a minute)"
    keys = [(line["endpoint"], line["client_error"]) for line in lines]
    assert len(keys) == len(set(keys)), "a client error was logged twice within a minute"
    assert len(lines) < (REST_CASES + GRPC_CASES) / 2, "client errors are not rate-limited"
