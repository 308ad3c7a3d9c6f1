"""The model control plane (serving.control) against real server processes: off by default, and
with ``--model-control explicit`` only for the bearer token, unload -> not live, load -> back."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc

from serving.control import NOT_ALLOWED, ModelControl
from serving.predictor import TopTagger
from tests.predictor import IMAGE_SIZE, Server, start_server, stop_server
from toptagger.errors import ConfigError

REPOSITORY = "/v2/repository/models"
TOKEN = "s3cr3t-control-token-0123456789"
IMAGE = np.random.default_rng(7).random((1, 1, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
REPO = Path(__file__).resolve().parents[2]


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def rest_infer(server: Server) -> httpx.Response:
    body = {
        "inputs": [{"name": "images", "datatype": "FP32", "shape": list(IMAGE.shape), "data": IMAGE.ravel().tolist()}]
    }
    return httpx.post(server.infer_url, json=body, timeout=60)


def grpc_infer(stub: pb_grpc.GRPCInferenceServiceStub) -> pb.ModelInferResponse:
    request = pb.ModelInferRequest(model_name="top-tagger")
    request.inputs.add(name="images", datatype="FP32", shape=list(IMAGE.shape))
    request.raw_input_contents.append(IMAGE.tobytes())
    return stub.ModelInfer(request, timeout=60)


def grpc_code(call: object, *args: object, **kwargs: object) -> tuple[grpc.StatusCode, str]:
    try:
        call(*args, **kwargs)  # type: ignore[operator]
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def load_request(name: str = "top-tagger") -> pb.RepositoryModelLoadRequest:
    return pb.RepositoryModelLoadRequest(model_name=name)


def unload_request(name: str = "top-tagger") -> pb.RepositoryModelUnloadRequest:
    return pb.RepositoryModelUnloadRequest(model_name=name)


def control_calls(stub: pb_grpc.GRPCInferenceServiceStub) -> list[tuple[object, object]]:
    return [(stub.RepositoryModelLoad, load_request()), (stub.RepositoryModelUnload, unload_request())]


# --- settings -----------------------------------------------------------------------------------
def test_settings_from_flags_file_and_environment(tmp_path: Path) -> None:
    assert not ModelControl.from_options(None, environ={}).enabled
    assert not ModelControl.from_options("none", environ={"CONTROL_TOKEN": TOKEN}).enabled
    from_env = ModelControl.from_options("explicit", environ={"CONTROL_TOKEN": f" {TOKEN}\n"})
    assert from_env.enabled and TOKEN not in repr(from_env)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    from_file = ModelControl.from_options("EXPLICIT", str(token_file), environ={"CONTROL_TOKEN": "other-token"})
    assert from_file.authorized(f"Bearer {TOKEN}") and from_file.authorized(f"bearer  {TOKEN} ")
    for wrong in (None, "", TOKEN, f"Basic {TOKEN}", f"Bearer {TOKEN}x", "Bearer other-token", "Bearer "):
        assert not from_file.authorized(wrong), wrong
    with pytest.raises(ConfigError, match="needs a bearer token"):
        ModelControl.from_options("explicit", environ={})
    with pytest.raises(ConfigError, match="empty"):
        (tmp_path / "empty").write_text("\n")
        ModelControl.from_options("explicit", str(tmp_path / "empty"), environ={})
    with pytest.raises(ConfigError, match="cannot read"):
        ModelControl.from_options("explicit", str(tmp_path / "missing"), environ={"CONTROL_TOKEN": TOKEN})
    with pytest.raises(ConfigError, match="must be one of"):
        ModelControl.from_options("poll", environ={})


def test_explicit_without_a_token_is_refused_at_start_up(tmp_path: Path) -> None:
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("CONTROL_TOKEN", "CONTROL_TOKEN_FILE")}
    run = subprocess.run(
        [sys.executable, "-m", "serving", "--model-uri", str(tmp_path), "--model-control", "explicit"],
        cwd=REPO,
        env={**env, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2
    assert "--model-control explicit needs a bearer token" in run.stderr
    assert "--control-token-file" in run.stderr


def test_reopen_after_stop_builds_a_fresh_backend(model_dir: Path, one_torch_thread: None) -> None:
    """TopTagger.reopen(): what the control plane's load runs after an unload; nothing else may."""
    model = TopTagger(str(model_dir), backend="torch")
    model.reopen()  # not stopped: nothing to undo
    assert model.load()
    first_backend, first_thread = model.backend, model.device_thread
    model.stop()
    assert not model.load()  # KServe's load retries keep refusing a stopped model
    model.reopen()
    assert model.not_ready_reason == "not loaded yet" and not model.stopped
    assert model.load() and model.ready
    assert model.backend is not first_backend and model.device_thread is not first_thread
    rows = asyncio.run(model.classify("images", IMAGE))
    assert rows.shape == (1, 2)
    model.stop()


def test_every_upstream_load_and_unload_entry_is_shadowed() -> None:
    """KServe 0.21's REST routes and gRPC methods that load or unload are the ones serving.control
    answers first; a new one upstream would reopen the hole, so this fails when one appears."""
    from fastapi import FastAPI
    from kserve.protocol.grpc.servicer import InferenceServicer
    from kserve.protocol.rest.v1_endpoints import register_v1_endpoints
    from kserve.protocol.rest.v2_endpoints import register_v2_endpoints

    from serving.control import REPOSITORY
    from serving.grpc_infer import TaggerServicer

    routers: list = []

    class Recorder(FastAPI):  # keeps the routers upstream includes, whatever FastAPI makes of them
        def include_router(self, router: object, **kwargs: object) -> None:
            routers.append(router)

    app = Recorder()
    register_v1_endpoints(app, None, None)
    register_v2_endpoints(app, None, None)
    paths = {route.path for router in routers for route in router.routes}
    assert "/v2/health/live" in paths and "/v1/models" in paths
    upstream = {path for path in paths if "load" in path}
    assert upstream == {f"{REPOSITORY}/load", f"{REPOSITORY}/unload"}
    methods = {name for name in dir(InferenceServicer) if "Load" in name or "Unload" in name}
    assert methods == {"RepositoryModelLoad", "RepositoryModelUnload"}
    assert all(getattr(TaggerServicer, name) is not getattr(InferenceServicer, name) for name in methods)


# --- off by default -----------------------------------------------------------------------------
def test_load_and_unload_are_not_supported_by_default(server: Server) -> None:
    for action in ("load", "unload"):
        for headers in ({}, bearer(TOKEN)):
            answer = httpx.post(f"{server.url}{REPOSITORY}/top-tagger/{action}", headers=headers, timeout=30)
            assert answer.status_code == 404, answer.text
            assert answer.json() == {"error": NOT_ALLOWED}
            assert NOT_ALLOWED.startswith("explicit model load / unload is not allowed")  # Triton's words
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for call, request in (
            (stub.RepositoryModelLoad, load_request()),
            (stub.RepositoryModelUnload, unload_request()),
        ):
            for metadata in ((), (("authorization", f"Bearer {TOKEN}"),)):
                code, details = grpc_code(call, request, metadata=metadata, timeout=30)
                assert code == grpc.StatusCode.UNIMPLEMENTED
                assert details == NOT_ALLOWED
        assert stub.ServerLive(pb.ServerLiveRequest(), timeout=30).live
        assert stub.ModelReady(pb.ModelReadyRequest(name="top-tagger"), timeout=30).ready
        assert len(grpc_infer(stub).raw_output_contents) == 1
    assert httpx.get(f"{server.url}/v2/health/live").json() == {"live": True}
    assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200
    assert rest_infer(server).status_code == 200


# --- explicit, with a token ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def controlled(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    token_file = tmp_path_factory.mktemp("secret") / "token"
    token_file.write_text(TOKEN + "\n")
    running = start_server(model_dir, "--model-control", "explicit", "--control-token-file", str(token_file))
    yield running
    stop_server(running)


def assert_serving(server: Server, stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    assert httpx.get(f"{server.url}/v2/health/live").status_code == 200
    assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200
    assert stub.ServerLive(pb.ServerLiveRequest(), timeout=30).live
    assert stub.ServerReady(pb.ServerReadyRequest(), timeout=30).ready
    assert stub.ModelReady(pb.ModelReadyRequest(name="top-tagger"), timeout=30).ready
    rest = rest_infer(server)
    assert rest.status_code == 200, rest.text
    assert np.asarray(rest.json()["outputs"][0]["data"]).size == 2
    answer = np.frombuffer(grpc_infer(stub).raw_output_contents[0], np.float32)
    assert answer.shape == (2,) and abs(float(answer.sum()) - 1) < 1e-4


def assert_unloaded(server: Server, stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    live = httpx.get(f"{server.url}/v2/health/live")
    assert live.status_code == 503 and not live.json()["live"]
    assert "unloaded through the model control API" in live.json()["reason"]
    assert not stub.ServerLive(pb.ServerLiveRequest(), timeout=30).live
    ready = httpx.get(f"{server.url}/v2/health/ready")
    assert ready.status_code == 503 and "unloaded" in ready.json()["reason"]
    assert httpx.get(f"{server.url}/v2/models/top-tagger/ready").status_code == 503
    assert not stub.ModelReady(pb.ModelReadyRequest(name="top-tagger"), timeout=30).ready
    assert rest_infer(server).status_code == 503
    code, details = grpc_code(grpc_infer, stub)
    assert code == grpc.StatusCode.UNAVAILABLE and "unloaded" in details
    index = httpx.post(f"{server.url}/v2/repository/index", json={}).json()
    assert [(m["name"], m["state"]) for m in index] == [("top-tagger", "UNAVAILABLE")]


def test_explicit_control_needs_the_token(controlled: Server) -> None:
    with grpc.insecure_channel(controlled.grpc_target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for action in ("load", "unload"):
            url = f"{controlled.url}{REPOSITORY}/top-tagger/{action}"
            for headers in ({}, bearer("wrong"), {"authorization": TOKEN}, bearer(TOKEN + "x")):
                answer = httpx.post(url, headers=headers, timeout=30)
                assert answer.status_code == 401, (headers, answer.text)
                assert answer.headers["www-authenticate"] == "Bearer"
            other = httpx.post(f"{controlled.url}{REPOSITORY}/other/{action}", headers=bearer(TOKEN), timeout=30)
            assert other.status_code == 404
        for call, request in (
            (stub.RepositoryModelLoad, load_request()),
            (stub.RepositoryModelUnload, unload_request()),
        ):
            for metadata in ((), (("authorization", "Bearer wrong"),)):
                code, _ = grpc_code(call, request, metadata=metadata, timeout=30)
                assert code == grpc.StatusCode.UNAUTHENTICATED
        code, _ = grpc_code(stub.RepositoryModelUnload, unload_request("other"), metadata=bearer(TOKEN).items())
        assert code == grpc.StatusCode.NOT_FOUND
        assert_serving(controlled, stub)  # nothing refused changed anything
    assert TOKEN not in controlled.log_text()


def test_unload_makes_the_server_not_live_and_load_brings_it_back(controlled: Server) -> None:
    metadata = tuple(bearer(TOKEN).items())
    with grpc.insecure_channel(controlled.grpc_target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        # A loaded model loads nothing again.
        assert httpx.post(f"{controlled.url}{REPOSITORY}/top-tagger/load", headers=bearer(TOKEN)).status_code == 200
        assert_serving(controlled, stub)
        # REST unload, gRPC load.
        answer = httpx.post(f"{controlled.url}{REPOSITORY}/top-tagger/unload", headers=bearer(TOKEN), timeout=60)
        assert answer.status_code == 200 and answer.json() == {"name": "top-tagger", "unload": True}
        assert_unloaded(controlled, stub)
        loaded = stub.RepositoryModelLoad(load_request(), metadata=metadata, timeout=120)
        assert loaded.isLoaded and loaded.model_name == "top-tagger"
        assert_serving(controlled, stub)
        # gRPC unload (twice: the second does nothing more), REST load.
        for _ in range(2):
            unloaded = stub.RepositoryModelUnload(unload_request(), metadata=metadata, timeout=60)
            assert unloaded.isUnloaded
        assert_unloaded(controlled, stub)
        answer = httpx.post(f"{controlled.url}{REPOSITORY}/top-tagger/load", headers=bearer(TOKEN), timeout=120)
        assert answer.status_code == 200 and answer.json() == {"name": "top-tagger", "load": True}
        assert_serving(controlled, stub)
    log = controlled.log_text()
    assert TOKEN not in log
    assert "unloaded through the model control API" in log
