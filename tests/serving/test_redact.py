"""Secrets never leave the process (serving.redact): the redaction itself, the log, the REST
middleware, and a real server with credentials in every URI it reads, called on every endpoint."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Iterator

import grpc
import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc

from serving import redact
from serving.process import free_port, start_local
from serving.triton.extensions import SERVICE
from serving.triton.protos import extensions_pb2
from tests.predictor import IMAGE_SIZE

TRACKING_PASSWORD = "SuperSecret123"
ENDPOINT_PASSWORD = "MinioPass999"
SECRET_KEY = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"  # '/' and '+': percent-encoded forms too
ACCESS_KEY = "TestAccessKeyId0042"
DB_PASSWORD = "DbPassw0rd!"
CONTROL_TOKEN = "ctl-Token-5f1e9a77"
MODEL_PASSWORD = "ModelUriPass42"
SIGNATURE = "SigSecret999"
CREDENTIAL = "CredSecret777"
SECRETS = [
    TRACKING_PASSWORD,
    ENDPOINT_PASSWORD,
    SECRET_KEY,
    ACCESS_KEY,
    DB_PASSWORD,
    CONTROL_TOKEN,
    MODEL_PASSWORD,
    SIGNATURE,
    CREDENTIAL,
]
ENV = {
    "MLFLOW_TRACKING_URI": f"http://mlflowuser:{TRACKING_PASSWORD}@127.0.0.1:1/",
    "AWS_ENDPOINT_URL": f"http://minio:{ENDPOINT_PASSWORD}@127.0.0.1:1",
    "AWS_ACCESS_KEY_ID": ACCESS_KEY,
    "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
    "DATABASE_PASSWORD": DB_PASSWORD,
    "CONTROL_TOKEN": CONTROL_TOKEN,
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
}
MODEL_URIS = {
    # MLflow's error names the tracking server, with its userinfo.
    "mlflow": "models:/top-tagger@champion",
    # A presigned-style S3 URI with userinfo: botocore's error repeats the bucket with the userinfo.
    "s3": f"s3://minio:{MODEL_PASSWORD}@bucket/top-tagger/champion?X-Amz-Signature={SIGNATURE}&X-Amz-Credential={CREDENTIAL}",
}


def leaked(text: str) -> list[str]:
    return [secret for secret in SECRETS if secret in text]


# --- the redaction ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("s3://user:pass@host/path?X-Amz-Signature=abc", "s3://host/path"),
        ("at http://u:p@h:1/api/2.0/x?y=1,2#frag then", "at http://h:1/api/2.0/x then"),
        ("'https://host/p?token=abc' and \"s3://b/k#f\"", "'https://host/p' and \"s3://b/k\""),
        ('{"error": "s3://a:b@bkt/k?sig=1\\" x"}', '{"error": "s3://bkt/k\\" x"}'),  # JSON escapes kept
        ("models:/top-tagger@champion and /mnt/models", "models:/top-tagger@champion and /mnt/models"),
        ("no URI at all", "no URI at all"),
    ],
)
def test_uris_lose_userinfo_query_and_fragment(text: str, expected: str) -> None:
    assert redact.redact_uris(text) == expected


def test_environment_and_registered_secrets_are_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOME_API_KEY", "k3y-value-123")
    monkeypatch.setenv("MY_DB_URL", "postgres://admin:pg-Pass-77@db/x")
    monkeypatch.setenv("SHORT_TOKEN", "abc")  # too short to be worth masking
    monkeypatch.setenv("PLAIN_SETTING", "k3y-value-1234")
    redact.refresh()  # the environment changed in place (a server's is fixed at start)
    text = "k3y-value-123 pg-Pass-77 admin:pg-Pass-77 abc pg-Pass%2D77"
    assert redact.redact(text) == "*** *** *** abc pg-Pass%2D77"  # '-' is never percent-encoded
    assert redact.redact("k3y-value-1234") == "***4"  # longest first; a value may contain another
    redact.add_uri_secrets("s3://u:Sup3r/Secret@bucket/x?X-Amz-Signature=sig%2Bnature")
    assert redact.redact('bucket "u:Sup3r/Secret@bucket" sig+nature sig%2Bnature') == 'bucket "***@bucket" *** ***'
    redact.add_secret(b"bytes-token-42\n")
    assert redact.redact("Bearer bytes-token-42") == "Bearer ***"


def test_log_records_are_redacted_whatever_the_logger(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOG_TEST_PASSWORD", "l0g-Secret-99")
    redact.refresh()  # the environment changed in place (a server's is fixed at start)
    redact.install_logging()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(name)s %(message)s"))
    logger = logging.getLogger("some.third.party")
    logger.addHandler(handler)
    try:
        logger.warning("connecting to %s with %s", "http://u:l0g-Secret-99@h/x?sig=1", "l0g-Secret-99")
        try:
            raise RuntimeError("failed at s3://k:l0g-Secret-99@b/o?X-Amz-Signature=zz")
        except RuntimeError:
            logger.exception("it failed: %r", {"password": "l0g-Secret-99"})
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert "l0g-Secret-99" not in text and "X-Amz-Signature" not in text and "sig=1" not in text
    assert "connecting to http://h/x with ***" in text and "s3://b/o" in text and "RuntimeError" in text


def test_rest_error_bodies_are_redacted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BODY_TEST_SECRET", "b0dy-Secret-7")
    redact.refresh()  # the environment changed in place (a server's is fixed at start)
    app = FastAPI()

    @app.get("/error")
    async def error() -> JSONResponse:
        return JSONResponse({"error": "cannot reach http://u:b0dy-Secret-7@h:1/p?t=x"}, status_code=503)

    @app.get("/text")
    async def text() -> PlainTextResponse:
        return PlainTextResponse("b0dy-Secret-7")

    @app.post("/v2/models/m/infer")
    async def infer() -> PlainTextResponse:
        return PlainTextResponse("b0dy-Secret-7")  # a successful inference answer goes through untouched

    app.add_middleware(redact.RedactAnswers)

    async def calls() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return [await client.get("/error"), await client.get("/text"), await client.post("/v2/models/m/infer")]

    error_answer, text_answer, infer_answer = asyncio.run(calls())
    assert error_answer.status_code == 503
    assert error_answer.json() == {"error": "cannot reach http://h:1/p"}
    assert int(error_answer.headers["content-length"]) == len(error_answer.content)
    assert text_answer.text == "***"
    assert infer_answer.text == "b0dy-Secret-7"


# --- a real server, every endpoint --------------------------------------------------------------
IMAGE = np.zeros((1, 1, IMAGE_SIZE, IMAGE_SIZE), np.float32)


def rest_calls(url: str) -> Iterator[httpx.Response]:
    get = ["/", "/metrics", "/v2", "/v2/models", "/v2/health/live", "/v2/health/ready"]
    get += ["/v2/models/top-tagger/ready", "/v2/models/top-tagger/versions/1/ready", "/v2/models/other/ready"]
    get += ["/v2/models/top-tagger", "/v2/models/top-tagger/versions/1", "/v2/models/top-tagger/versions/7"]
    get += ["/v2/models/top-tagger/config", "/v2/models/top-tagger/stats", "/v2/models/stats", "/v2/models/x/config"]
    get += ["/v1/models", "/v1/models/top-tagger", "/no/such/route"]
    with httpx.Client(base_url=url, timeout=60) as client:
        for path in get:
            yield client.get(path)
        for body in ({}, {"ready": True}):
            yield client.post("/v2/repository/index", json=body)
        yield client.post("/v2/repository/index", content=b"[1, 2")
        tensor = {"name": "images", "datatype": "FP32", "shape": list(IMAGE.shape), "data": IMAGE.ravel().tolist()}
        for path in ("/v2/models/top-tagger/infer", "/v2/models/top-tagger/versions/1/infer", "/v2/models/x/infer"):
            yield client.post(path, json={"inputs": [tensor]})
        infer = "/v2/models/top-tagger/infer"
        yield client.post(infer, content=b"{not json")
        yield client.post(infer, json={"inputs": [{**tensor, "shape": [1, 2]}]})
        yield client.post(infer, json={"inputs": "nope"})
        yield client.post(infer, content=b"\x00" * 10, headers={"inference-header-content-length": "5"})
        yield client.post("/v1/models/top-tagger:predict", json={"instances": [[1]]})
        for action in ("load", "unload", "load"):  # unload then load: the model fails to load again
            for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": f"Bearer {CONTROL_TOKEN}"}):
                yield client.post(f"/v2/repository/models/top-tagger/{action}", headers=headers)
        yield client.get("/v2/health/live")
        yield client.get("/v2/health/ready")


def grpc_calls(target: str) -> Iterator[str]:
    def text(call: object, request: object, **kwargs: object) -> str:
        try:
            return str(call(request, timeout=60, **kwargs))  # type: ignore[operator]
        except grpc.RpcError as exc:
            return f"{exc.code()} {exc.details()} {exc.trailing_metadata()}"

    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        yield text(stub.ServerLive, pb.ServerLiveRequest())
        yield text(stub.ServerReady, pb.ServerReadyRequest())
        yield text(stub.ServerMetadata, pb.ServerMetadataRequest())
        for name in ("top-tagger", "other"):
            yield text(stub.ModelReady, pb.ModelReadyRequest(name=name))
            yield text(stub.ModelMetadata, pb.ModelMetadataRequest(name=name))
        for method, request, response in (
            ("RepositoryIndex", extensions_pb2.RepositoryIndexRequest(), extensions_pb2.RepositoryIndexResponse),
            (
                "RepositoryIndex",
                extensions_pb2.RepositoryIndexRequest(ready=True),
                extensions_pb2.RepositoryIndexResponse,
            ),
            ("ModelConfig", extensions_pb2.ModelConfigRequest(name="top-tagger"), extensions_pb2.ModelConfigResponse),
            ("ModelConfig", extensions_pb2.ModelConfigRequest(name="x"), extensions_pb2.ModelConfigResponse),
            ("ModelStatistics", extensions_pb2.ModelStatisticsRequest(), extensions_pb2.ModelStatisticsResponse),
            (
                "ModelStatistics",
                extensions_pb2.ModelStatisticsRequest(name="x"),
                extensions_pb2.ModelStatisticsResponse,
            ),
        ):
            call = channel.unary_unary(
                f"/{SERVICE}/{method}",
                request_serializer=type(request).SerializeToString,
                response_deserializer=response.FromString,
            )
            yield text(call, request)
        good = pb.ModelInferRequest(model_name="top-tagger")
        good.inputs.add(name="images", datatype="FP32", shape=list(IMAGE.shape))
        good.raw_input_contents.append(IMAGE.tobytes())
        bad = pb.ModelInferRequest(model_name="top-tagger")
        bad.inputs.add(name="images", datatype="INT8", shape=[1])
        for request in (good, bad, pb.ModelInferRequest(model_name="other"), pb.ModelInferRequest()):
            yield text(stub.ModelInfer, request)
        for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", f"Bearer {CONTROL_TOKEN}"),)):
            yield text(
                stub.RepositoryModelUnload, pb.RepositoryModelUnloadRequest(model_name="top-tagger"), metadata=metadata
            )
            yield text(
                stub.RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name="top-tagger"), metadata=metadata
            )
        yield text(stub.ServerLive, pb.ServerLiveRequest())


@pytest.mark.parametrize("source", sorted(MODEL_URIS))
def test_no_secret_in_any_answer_or_log_line(source: str) -> None:
    server = start_local(
        MODEL_URIS[source],
        http_port=free_port(),
        grpc_port=free_port(),
        extra_args=["--threads", "1", "--log-level", "DEBUG", "--model-control", "explicit", "--metrics-port", "0"],
        env=ENV,
        timeout_s=180,
        wait_ready=False,
    )
    answers: list[str] = []
    try:
        ready = httpx.get(f"{server.url}/v2/health/ready", timeout=30).json()
        for response in rest_calls(server.url):
            request = f"{response.request.method} {response.request.url.path}"
            answers.append(f"{request} {response.status_code} {response.headers} {response.text}")
        answers += grpc_calls(server.grpc_target)
    finally:
        server.stop()
    log = server.log_text()
    # The answers are there, and say what went wrong without the secrets.
    assert not ready["ready"] and "cannot load model" in ready["reason"]
    where = "http://127.0.0.1:1" if source == "mlflow" else "s3://bucket/top-tagger/champion"
    assert where in ready["reason"], ready["reason"]
    assert any("401" in answer for answer in answers) and any("UNAUTHENTICATED" in answer for answer in answers)
    assert "cannot load model" in log
    for answer in answers:
        assert not leaked(answer), answer
    for line in log.splitlines():
        assert not leaked(line), line
