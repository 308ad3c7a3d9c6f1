"""The KServe behaviour serving/server.py builds on, pinned so that an upgrade cannot break it silently.

``TaggerModelServer`` runs upstream's ``ModelServer.start`` unchanged, after registering the model
itself and adding its own gRPC server to ``self.servers`` (see its docstring); ``TaggerGRPCServer``
replaces ``GRPCServer``, whose ``start`` offers no hook. If a test here fails after a KServe
upgrade, read the named upstream method again, check the notes in serving/server.py against it,
and only then update the digest.
"""

from __future__ import annotations

import hashlib
import inspect

import pytest
from kserve import Model, ModelServer
from kserve.errors import NoModelReady
from kserve.protocol.grpc.server import GRPCServer

# sha256 (first 16 hex digits) of the source of each upstream method, as read for kserve 0.21.0.
UPSTREAM = {
    "ModelServer.start": (ModelServer.start, "efa96502018b04e9"),
    "ModelServer._register_and_check_atleast_one_model_is_ready": (
        ModelServer._register_and_check_atleast_one_model_is_ready,
        "ea1c6e647744e3fd",
    ),
    "ModelServer.stop": (ModelServer.stop, "c87cc006e46d8397"),
    "ModelServer._serve": (ModelServer._serve, "ff3ff3ccb85e49d3"),
    "GRPCServer.start": (GRPCServer.start, "f4ea7b4eb6f0d9f7"),
}


@pytest.mark.parametrize("name", sorted(UPSTREAM))
def test_upstream_method_is_the_one_serving_server_was_written_against(name: str) -> None:
    method, digest = UPSTREAM[name]
    got = hashlib.sha256(inspect.getsource(method).encode()).hexdigest()[:16]
    assert got == digest, f"KServe's {name} changed: re-read it against serving/server.py before updating {digest}"


def test_upstream_refuses_a_model_that_is_not_ready_but_accepts_no_models() -> None:
    """Why the model is registered by hand: upstream's start() would refuse a model that failed to load."""
    server = ModelServer(enable_grpc=False)
    not_ready = Model("not-ready")
    with pytest.raises(NoModelReady):
        server._register_and_check_atleast_one_model_is_ready([not_ready])
    server._register_and_check_atleast_one_model_is_ready([])  # what TaggerModelServer.start passes
    server.register_model(not_ready)  # the public call it uses instead
    assert server.registered_models.get_model("not-ready") is not_ready


def test_upstream_stop_stops_the_grpc_server_it_finds_on_the_instance() -> None:
    source = inspect.getsource(ModelServer.stop)
    assert "self._grpc_server" in source and ".stop(sig)" in source
    assert "self.servers" in inspect.getsource(ModelServer._serve)


def test_the_drain_can_take_the_signals_from_upstream_and_uvicorn() -> None:
    """serving.server's drain overrides ``register_signal_handler``, which upstream's start() calls after it
    built its REST server and before the event loop runs, and switches off uvicorn's own capture
    (``Server.capture_signals``, looked up on the instance in ``serve``)."""
    import uvicorn
    from kserve.protocol.rest.server import RESTServer

    start = inspect.getsource(ModelServer.start)
    built, registered, run = (start.index(s) for s in ("RESTServer(", "self.register_signal_handler()", "asyncio.run("))
    assert built < registered < run
    assert "self._server = " in inspect.getsource(RESTServer.__init__)
    assert "with self.capture_signals():" in inspect.getsource(uvicorn.Server.serve)
    assert "self.should_exit" in inspect.getsource(uvicorn.Server.main_loop) + inspect.getsource(uvicorn.Server.on_tick)
