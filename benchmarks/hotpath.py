"""Per-request CPU cost of each stage of the server's gRPC hot path (issue 20, "Numbers").

    python -m benchmarks.hotpath [--image-size 40] [--channels 1 3] [--requests 4000] [--repeats 5]
                                 [--seconds 5] [--rounds 1] [--clients 16] [--no-server]
                                 [--variants as-is uvloop no-interceptor uvloop+no-interceptor bare-grpc-aio]
                                 [--out docs/benchmarks/serving/hotpath.md]

At over 1000 batch-1 requests/s on 2 cores, what the server spends per request (not the model)
decides how close 16 clients get to the in-process batch-16 rate. This measures it stage by stage,
calling the server's own code (never a copy of it), with a backend whose compute is free
(:class:`FreeComputeBackend`, a stand-in that exists only here), so that nothing but the serving
path is timed:

1. decode: the ModelInfer handler's request deserializer (``serving.client_errors.safe_decoding``
   around ``ModelInferRequest.FromString``) on the bytes :class:`serving.client.TaggerClient` sends;
2. routing: ``KServeErrorsInterceptor.intercept_service`` (runs per call), the ``safe_decoding``
   wrapper, and ``TaggerServicer._infer``'s checks before parsing (model, version, readiness,
   outputs, ``declared_size``, the request cap);
3. contract: ``off_loop`` + ``Contract.parse_grpc`` (numpy view, shape and finiteness checks);
4. bookkeeping: ``ModelInfer``'s drain enter/leave and metrics, ``Admission.admit``;
5. batcher: ``TopTagger.classify`` -> ``DynamicBatcher`` (queue, batch assembly, the hop to the
   device thread and back, result split), 16 requests at a time, with free compute;
6. response: building the ``ModelInferResponse`` in ``_infer``, and the handler's serializer;
7. the real server (``serving.__main__.main`` in a subprocess, with the stand-in backend) under 16
   closed-loop batch-1 gRPC clients in this process: its CPU time (utime + stime of every thread,
   ``/proc/<pid>/task/*/stat``, by thread) divided by the requests answered. What the stages above
   do not explain is the transport: grpc's C core, HTTP/2, the asyncio event loop and grpc.aio's
   per-call tasks.

``--variants`` measures changes proposed for ``serving/`` without editing it (:data:`VARIANTS`:
uvloop, no interceptor) and a bare grpc.aio server (the floor), each in its own process, all up at
once and timed in ``--rounds`` interleaved windows: this shared machine drifts by more than the
differences between them.

Stages 1-6 are CPU time of a loop of ``--requests`` calls, the median of ``--repeats`` loops.
Code that is inline in a method (``_infer``'s checks and response) is timed by difference: the
method run with a stub at one point minus the same with a stub earlier, each stub's own cost
measured and taken off (:func:`measure_stages` says which difference is which).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import machine, publish
from serving.backends import Backend
from toptagger.constants import IMAGE_SIZE, MODEL_NAME
from toptagger.images import ImageConfig

CLIENTS = 16
MAIN_THREAD = "main thread (event loop)"
MAX_BATCH = 16
MODEL_CHANNELS = 3  # the paper's ResNet-50 (TaggerConfig's default): 1- and 3-channel requests are both served
SERVE_SNIPPET = "import sys; from benchmarks.hotpath import serve_free; sys.exit(serve_free(sys.argv[1:]))"


class FreeComputeBackend(Backend):
    """Benchmark stand-in, never served: a :class:`~serving.backends.Backend` whose ``predict``
    costs nothing (zeros of the right shape), so that only the serving path is measured."""

    kind = "free-compute"
    precision = "fp32"

    def __init__(self, image_size: int = IMAGE_SIZE, channels: int = MODEL_CHANNELS) -> None:
        self.image_config = ImageConfig(image_size=image_size)
        self.channels = channels
        self.description = f"free compute (benchmark stand-in, {channels}x{image_size}x{image_size})"

    def predict(self, images: np.ndarray) -> np.ndarray:
        return np.zeros((len(images), 2), np.float32)


class _Stop(Exception):
    """Raised by a stub to end a call at a chosen point."""


def _stop(*_: object, **__: object) -> Any:
    raise _Stop


async def _stop_async(*_: object, **__: object) -> Any:
    raise _Stop


def run_inline(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine that never suspends, without an event loop (one loop turn would cost more
    than the code timed); a ``_Stop`` from a stub ends it quietly."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    except _Stop:
        return None
    coroutine.close()
    raise RuntimeError("the coroutine suspended: it is not on the inline path")


def cpu_us(call: Callable[[], object], iterations: int, repeats: int) -> float:
    """Median over ``repeats`` of this thread's CPU µs per ``call()``, over ``iterations`` calls."""
    call()  # warm: first-call caches (protobuf descriptors, cached properties)
    results = []
    for _ in range(repeats):
        start = time.thread_time_ns()
        for _ in range(iterations):
            call()
        results.append((time.thread_time_ns() - start) / iterations / 1e3)
    return statistics.median(results)


@dataclass
class Stage:
    name: str
    what: str
    us: float


@dataclass
class Shape:
    """One request shape's stages, and the server's end-to-end cost if measured."""

    channels: int
    image_size: int
    request_bytes: int
    stages: list[Stage] = field(default_factory=list)
    servers: dict[str, ServerRun] = field(default_factory=dict)  # by variant (VARIANTS)

    @property
    def server(self) -> ServerRun | None:
        """The server as it is, where measured."""
        return self.servers.get(AS_IS)

    @property
    def explained_us(self) -> float:
        return sum(stage.us for stage in self.stages)


@dataclass
class ServerRun:
    requests: int
    errors: int
    seconds: float
    cpu_us_per_request: float
    threads_us: dict[str, float]  # per-request CPU µs by thread name
    mean_batch: float | None
    clients_us: float | None = None  # the load generator's CPU µs per request (this process)

    @property
    def rate(self) -> float:
        return self.requests / self.seconds


def wire_request(channels: int, image_size: int, seed: int = 0) -> bytes:
    """A batch-1 image request as :class:`serving.client.TaggerClient` puts it on the wire."""
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb

    image = np.random.default_rng(seed).random((1, channels, image_size, image_size), dtype=np.float32)
    request = pb.ModelInferRequest(model_name=MODEL_NAME, id="0123456789abcdef0123456789abcdef")  # a uuid4 hex
    request.inputs.add(name="images", datatype="FP32", shape=list(image.shape))
    request.raw_input_contents.append(image.tobytes())
    return request.SerializeToString()


def free_model(image_size: int) -> Any:
    """A loaded :class:`~serving.predictor.TopTagger` (the server's defaults: batch 16, 5 ms,
    queue 256, admission at 1000 ms) on the stand-in backend, built by its own ``load()``."""
    from serving.predictor import BatchingOptions, TopTagger

    model = TopTagger("free-compute://stand-in", batching=BatchingOptions(MAX_BATCH, 5.0, 256, 1000.0))
    backend = FreeComputeBackend(image_size)
    model._build = lambda: (backend, {})  # instead of fetching a model folder: the stand-in
    if not model.load():
        raise RuntimeError(f"the stand-in model did not load: {model.not_ready_reason}")
    return model


class _Context:
    """What ``ModelInfer`` reads of a grpc context on the OK path: nothing but its presence."""

    def invocation_metadata(self) -> tuple:
        return ()


def _model_infer_handler(servicer: Any) -> tuple[Any, Any]:
    """(details, the generic handler's ModelInfer handler) as the server registers them."""
    from grpc._cython.cygrpc import _HandlerCallDetails
    from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc

    from serving.grpc_infer import MODEL_INFER

    class Capture:  # stands in for the grpc.aio server in add_..._to_server
        def add_generic_rpc_handlers(self, handlers: Sequence[Any]) -> None:
            self.generic = list(handlers)

        def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
            pass

    capture = Capture()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, capture)
    details = _HandlerCallDetails(MODEL_INFER, ())  # what grpc.aio hands its interceptors
    return details, capture.generic[0].service(details)


def measure_stages(channels: int, image_size: int, iterations: int, repeats: int, model: Any) -> Shape:
    """Stages 1-6 for one request shape, on ``model`` (from :func:`free_model`)."""
    import serving.grpc_infer as grpc_infer
    from serving.grpc_infer import KServeErrorsInterceptor, TaggerServicer
    from serving.limits import declared_size, off_loop

    def us(call: Callable[[], object]) -> float:
        return cpu_us(call, iterations, repeats)

    wire = wire_request(channels, image_size)
    servicer = TaggerServicer(None, None, model)
    context = _Context()
    details, original = _model_infer_handler(servicer)
    interceptor = KServeErrorsInterceptor()

    async def continuation(_: Any) -> Any:  # grpc's handler lookup, which is grpc's cost, not ours
        return original

    handler = run_inline(interceptor.intercept_service(continuation, details))
    request = handler.request_deserializer(wire)
    nbytes = declared_size([tensor.shape for tensor in request.inputs])[1]
    parsed = model.contract.parse_grpc(request)
    probabilities = np.zeros((1, 2), np.float32)
    admission = model.admission

    async def answer(*_: object, **__: object) -> Any:  # classify answering at once
        return probabilities

    with _patched(model, "classify", answer):
        response = run_inline(servicer._infer(request))  # the response _infer builds

    async def prebuilt(*_: object) -> Any:
        return response

    async def awaits(stub: Callable[..., Any]) -> Any:  # the harness: a coroutine awaiting a stub
        return await stub()

    def admit_raising() -> None:
        with admission.admit(1):
            raise _Stop

    def caught(call: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            with contextlib.suppress(_Stop):
                call()

        return run

    # Harness costs, taken off the stages that include them.
    h_return = us(lambda: run_inline(awaits(answer)))
    h_stop = us(lambda: run_inline(awaits(_stop_async)))
    h_continuation = us(lambda: run_inline(continuation(details)))
    raise_only = us(caught(_stop))
    admit_ok = us(lambda: _admit_once(admission))
    admit_exc = us(caught(admit_raising)) - raise_only  # admission's exit with an exception passing

    stages: list[Stage] = []
    decode = us(lambda: handler.request_deserializer(wire))
    stages.append(Stage("1. gRPC decode", "safe_decoding's deserializer: `ModelInferRequest.FromString`", decode))

    intercept = us(lambda: run_inline(interceptor.intercept_service(continuation, details))) - h_continuation
    # ModelInfer's own lines (drain, timing, metrics) with _infer answering at once; through the
    # handler (which holds the bound ModelInfer), the same plus safe_decoding's wrapper.
    with _patched(servicer, "_infer", prebuilt):
        model_infer = us(lambda: run_inline(servicer.ModelInfer(request, context))) - h_return
        wrapper = us(lambda: run_inline(handler.unary_unary(request, context))) - h_return - model_infer
    with _patched(grpc_infer, "off_loop", _stop_async):  # _infer up to the contract check
        before_parse = us(lambda: run_inline(servicer._infer(request))) - h_stop - admit_exc
    checks = max(before_parse, 0.0)
    stages.append(
        Stage(
            "2. routing and checks",
            f"`KServeErrorsInterceptor.intercept_service` {intercept:.2f}, `safe_decoding` wrapper "
            f"{wrapper:.2f}, `_infer` before parsing (model, version, ready, outputs, `declared_size`) {checks:.2f}",
            intercept + wrapper + checks,
        )
    )
    contract = us(lambda: run_inline(off_loop(nbytes, model.contract.parse_grpc, request)))
    stages.append(Stage("3. contract check", "`off_loop` + `Contract.parse_grpc` (inline below 256 kB)", contract))
    stages.append(
        Stage(
            "4. admission, drain, metrics",
            f"`ModelInfer`: drain enter/leave, 2 clock reads, `REQUESTS`/`LATENCY` {model_infer:.2f}; "
            f"`Admission.admit` + release {admit_ok:.2f}",
            model_infer + admit_ok,
        )
    )
    stages.append(Stage("5. batcher", _BATCHER_WHAT, batcher_us(model, parsed, iterations, repeats)))
    # _infer with classify answering at once, against _infer stopped in classify: the difference is
    # the response it builds (and the normal exit of admission against the raising one).
    with _patched(model, "classify", answer):
        whole = us(lambda: run_inline(servicer._infer(request))) - h_return
    with _patched(model, "classify", _stop_async):
        to_classify = us(lambda: run_inline(servicer._infer(request))) - h_stop
    build = max(whole - to_classify - admit_ok + admit_exc, 0.0)
    encode = us(lambda: handler.response_serializer(response))
    stages.append(
        Stage(
            "6. response",
            f"build in `_infer` (`ModelInferResponse`, output, `tobytes`) {build:.2f}; "
            f"handler's serializer `SerializeToString` {encode:.2f}",
            build + encode,
        )
    )
    return Shape(channels, image_size, len(wire), stages)


_BATCHER_WHAT = (
    "`TopTagger.classify` -> `DynamicBatcher.submit`, batch assembly, hop to the device thread and back, "
    "result split, statistics; 16 concurrent requests per batch, free compute"
)


def _admit_once(admission: Any) -> None:
    with admission.admit(1):
        pass


@contextlib.contextmanager
def _patched(owner: Any, name: str, value: Any) -> Iterator[None]:
    """``owner.name = value`` for the block (a module global, or an instance attribute over its method)."""
    had = name in vars(owner)
    old = vars(owner).get(name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        if had:
            setattr(owner, name, old)
        else:
            delattr(owner, name)


def batcher_us(model: Any, parsed: tuple[str, np.ndarray], iterations: int, repeats: int) -> float:
    """Process CPU µs per request through ``classify`` and the batcher, ``CLIENTS`` at a time.

    Process time, not the thread's: the device thread's share (``run_in_executor``'s hop, the stub
    backend) is part of the cost. The harness (gathering as many coroutines that return at once)
    is measured the same way and taken off.
    """
    name, rows = parsed
    rounds = max(1, iterations // CLIENTS)

    async def nothing() -> None:
        return None

    async def loop(make: Callable[[], Coroutine[Any, Any, Any]]) -> float:
        await asyncio.gather(*(make() for _ in range(CLIENTS)))  # warm: the worker task starts
        results = []
        for _ in range(repeats):
            start = time.process_time_ns()
            for _ in range(rounds):
                await asyncio.gather(*(make() for _ in range(CLIENTS)))
            results.append((time.process_time_ns() - start) / (rounds * CLIENTS) / 1e3)
        return statistics.median(results)

    async def both() -> tuple[float, float]:
        served = await loop(lambda: model.classify(name, rows, admitted=True))
        harness = await loop(nothing)
        return served, harness

    served, harness = asyncio.run(both())
    return max(served - harness, 0.0)


# --- the real server ----------------------------------------------------------------------------
def serve_free(argv: Sequence[str]) -> int:
    """``python -m serving`` with :class:`FreeComputeBackend` in place of the model (arguments: the
    image size, the variant (:data:`VARIANTS`), then the server's flags). Started by :func:`start_server`."""
    from serving import __main__ as serving_main
    from serving.predictor import TopTagger

    image_size, variant, *rest = argv
    if variant == BARE:
        return _serve_bare(rest)
    backend = FreeComputeBackend(int(image_size))
    TopTagger._build = lambda self: (backend, {})  # this process only: the stand-in instead of a model
    _apply_variant(variant)
    threading.Thread(target=_name_threads, name="thread-namer", daemon=True).start()
    return serving_main.main(rest)


# Experiments on the server process, measured against the server as it is (--variants): changes
# proposed for serving/, tried here without editing it.
AS_IS, UVLOOP, NO_INTERCEPTOR, BOTH = "as-is", "uvloop", "no-interceptor", "uvloop+no-interceptor"
BARE = "bare-grpc-aio"
VARIANTS = {
    AS_IS: "`python -m serving` as it is (asyncio's default event loop, `KServeErrorsInterceptor`)",
    UVLOOP: "the same on uvloop's event loop (`uvloop.install()` before `ModelServer.start`)",
    NO_INTERCEPTOR: "no server interceptor (an upper bound: what wrapping the handlers once at registration "
    "instead would save; ModelInfer loses its undecodable-bytes answer in this experiment)",
    BOTH: "both",
    BARE: "not our server: a bare `grpc.aio` server (no interceptor, asyncio's loop) whose ModelInfer answers "
    "a constant response at once; grpc.aio's own floor on this machine",
}


def _apply_variant(variant: str) -> None:
    if variant in (UVLOOP, BOTH):
        import uvloop

        uvloop.install()
        # KServe's setup_event_loop() asks for the current loop before asyncio.run() makes its own.
        asyncio.set_event_loop(asyncio.new_event_loop())
    if variant in (NO_INTERCEPTOR, BOTH):
        import serving.server

        server = serving.server.aio.server

        def without_interceptors(*args: Any, **kwargs: Any) -> Any:
            return server(*args, **{**kwargs, "interceptors": ()})

        serving.server.aio = _Namespace(serving.server.aio, server=without_interceptors)


def _serve_bare(flags: Sequence[str]) -> int:
    """The :data:`BARE` variant: grpc.aio and the generated stubs, nothing of ours; ``/v2/health/ready``
    on the HTTP port (a thread) so that the same launcher sees it ready."""
    import http.server

    from grpc import aio
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
    from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc

    options = dict(zip(flags[::2], flags[1::2], strict=False))
    answer = pb.ModelInferResponse(model_name=MODEL_NAME, model_version="1")
    answer.outputs.add(name="probabilities", datatype="FP32", shape=[1, 2])
    answer.raw_output_contents.append(np.zeros((1, 2), np.float32).tobytes())

    class Constant(pb_grpc.GRPCInferenceServiceServicer):
        async def ModelInfer(self, request: Any, context: Any) -> Any:
            response = pb.ModelInferResponse()
            response.CopyFrom(answer)
            response.id = request.id  # the client checks it
            return response

    class Ready(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    ready = http.server.ThreadingHTTPServer(("127.0.0.1", int(options["--http-port"])), Ready)
    threading.Thread(target=ready.serve_forever, name="ready", daemon=True).start()
    threading.Thread(target=_name_threads, name="thread-namer", daemon=True).start()

    async def serve() -> None:
        server = aio.server()
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(Constant(), server)
        server.add_insecure_port(f"127.0.0.1:{options['--grpc-port']}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(serve())
    return 0


class _Namespace:
    """A module seen through, with some attributes replaced (this process only)."""

    def __init__(self, module: Any, **replaced: Any) -> None:
        self._module, self._replaced = module, replaced

    def __getattr__(self, name: str) -> Any:
        return self._replaced[name] if name in self._replaced else getattr(self._module, name)


def _name_threads(every_s: float = 0.5) -> None:
    """Give this process's Python threads their Python names at the OS level (``comm``), where
    ``/proc`` shows them, so that the server's CPU time can be told apart by thread; every
    ``every_s`` seconds, as pools start their threads late. Linux only."""
    while True:
        for thread in threading.enumerate():
            if thread is threading.main_thread():  # threads started from it inherit its name: keep "python"
                continue
            comm = Path(f"/proc/self/task/{thread.native_id}/comm")
            with contextlib.suppress(OSError):
                if comm.read_text().strip() == "python":  # not named yet (grpc's C threads name themselves)
                    comm.write_text(thread.name[:15])
        time.sleep(every_s)


def _cpu_ticks(pid: int) -> dict[str, int]:
    """utime + stime (clock ticks) of each thread of ``pid``, summed by thread name."""
    by_name: dict[str, int] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            text = (task / "stat").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        name = text[text.index("(") + 1 : text.rindex(")")]
        name = MAIN_THREAD if task.name == str(pid) else _thread_label(name)
        fields = text[text.rindex(")") + 2 :].split()
        by_name[name] = by_name.get(name, 0) + int(fields[11]) + int(fields[12])  # utime, stime
    return by_name


def _thread_label(comm: str) -> str:
    """What a server thread is, from its name (grpc's C threads name themselves; :func:`_name_threads`
    gives the Python ones theirs; ``python``: started before the namer ran, or by C code)."""
    if comm.startswith("Thread-") and "(_poll" in comm:
        return "grpc.aio completion-queue poller"
    if comm == "event_engine":
        return "grpc C core (event_engine)"
    if comm.startswith("device"):
        return "device thread"
    return comm


def _mean_batch(url: str) -> float | None:
    try:
        with urllib.request.urlopen(f"{url}/metrics", timeout=5) as answer:
            text = answer.read().decode()
    except OSError:
        return None
    values = {}
    for line in text.splitlines():
        for key in ("toptagger_batch_size_sum", "toptagger_batch_size_count"):
            if line.startswith(key + " "):
                values[key] = float(line.split()[1])
    count = values.get("toptagger_batch_size_count")
    return values["toptagger_batch_size_sum"] / count if count else None


def start_server(image_size: int, variant: str = AS_IS) -> Any:
    """The real server (``serving.__main__.main``) in a subprocess on the stand-in backend, once ready."""
    from serving.process import free_port, launch, predictor_env

    http, grpc_port, metrics = free_port(), free_port(), free_port()
    flags = ["--model-uri", "free-compute://stand-in", "--http-port", str(http), "--grpc-port", str(grpc_port)]
    flags += ["--metrics-port", str(metrics), "--log-level", "WARNING"]
    command = [sys.executable, "-c", SERVE_SNIPPET, str(image_size), variant, *flags]
    return launch(command, predictor_env(), http, grpc_port, f"predictor (free compute, {variant})", timeout_s=180)


@dataclass
class _Window:
    """What one server did over timed windows: requests, errors, seconds, CPU ticks by thread."""

    requests: int = 0
    errors: int = 0
    seconds: float = 0.0
    ticks: dict[str, int] = field(default_factory=dict)
    client_ns: int = 0

    def run(self, server: Any, image: np.ndarray, seconds: float, clients: int) -> None:
        from benchmarks.measure import closed_loop

        marks: list[tuple[float, dict[str, int]]] = []
        client_cpu: list[int] = []  # this process's CPU time: the clients' side of the same requests

        def probe() -> float:  # closed_loop calls it at the start and the end of its timed window
            marks.append((time.perf_counter(), _cpu_ticks(server.pid)))
            client_cpu.append(time.process_time_ns())
            return 0.0

        load = asyncio.run(closed_loop(server.grpc_url, clients, image, "images", seconds, probe))
        (start, first), (end, last) = marks[0], marks[-1]
        self.requests += len(load.latencies) + load.errors
        self.errors += load.errors
        self.seconds += end - start
        for name, ticks in last.items():
            self.ticks[name] = self.ticks.get(name, 0) + ticks - first.get(name, 0)
        self.client_ns += client_cpu[-1] - client_cpu[0]

    def result(self, mean_batch: float | None) -> ServerRun:
        hz = os.sysconf("SC_CLK_TCK")
        per_thread = {name: ticks / hz / max(self.requests, 1) * 1e6 for name, ticks in self.ticks.items()}
        per_thread = {name: us for name, us in sorted(per_thread.items(), key=lambda kv: -kv[1]) if us > 0}
        requests = max(self.requests, 1)
        return ServerRun(
            self.requests,
            self.errors,
            self.seconds,
            sum(per_thread.values()),
            per_thread,
            mean_batch,
            self.client_ns / 1e3 / requests,
        )


def measure_server(
    channels: int,
    image_size: int,
    seconds: float,
    clients: int = CLIENTS,
    variants: Sequence[str] = (AS_IS,),
    rounds: int = 1,
) -> dict[str, ServerRun]:
    """Stage 7: each variant's server up at once, measured in ``rounds`` interleaved windows of
    ``seconds`` (this shared machine's speed drifts by more than the differences), by
    ``clients`` closed-loop batch-1 gRPC clients in this process."""
    image = np.random.default_rng(1).random((1, channels, image_size, image_size), dtype=np.float32)
    servers: dict[str, Any] = {}
    windows = {variant: _Window() for variant in variants}
    try:
        for variant in variants:
            servers[variant] = start_server(image_size, variant)
        for round_ in range(rounds):
            for variant in variants if round_ % 2 == 0 else variants[::-1]:
                windows[variant].run(servers[variant], image, seconds, clients)
        return {variant: windows[variant].result(_mean_batch(servers[variant].url)) for variant in variants}
    finally:
        for server in servers.values():
            server.stop()


# --- report -------------------------------------------------------------------------------------
def report(shapes: Sequence[Shape], command: str) -> str:
    lines = [
        "# Hot path of a batch-1 gRPC request: CPU µs per stage (issue 20)",
        "",
        f"Machine: {machine()}; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} at the end "
        "(other jobs share it). "
        f"Command: `{command}`.",
        "",
        "Free compute: the backend is `benchmarks.hotpath.FreeComputeBackend`, a stand-in whose `predict` returns",
        "zeros, so every number is the serving path's alone. Stages 1-6: this thread's CPU time over a loop of",
        "calls of the server's own functions, median of the repeats; `_infer`'s own lines (its checks, the",
        "response it builds) by difference of runs stubbed at two points (`benchmarks/hotpath.py`). Stage 5:",
        "the process's CPU time (the device thread included), 16 requests per batch. Stage 7: the server",
        "process's CPU time (all threads, `/proc/<pid>/task/*/stat`) per request answered, under closed-loop",
        "batch-1 gRPC clients in another process (this one), with the mean batch it served.",
        "",
    ]
    for shape in shapes:
        total = shape.server.cpu_us_per_request if shape.server else None
        lines += [
            f"## {shape.channels}x{shape.image_size}x{shape.image_size} FP32 image, batch 1 "
            f"({shape.request_bytes:,} bytes on the wire)",
            "",
            "| stage | µs per request | share | what runs |",
            "|---|---:|---:|---|",
        ]
        for stage in shape.stages:
            lines.append(f"| {stage.name} | {stage.us:.2f} | {_share(stage.us, total)} | {stage.what} |")
        explained = shape.explained_us
        lines.append(f"| **stages 1-6** | **{explained:.2f}** | {_share(explained, total)} | |")
        if shape.server is not None:
            run, rest = shape.server, shape.server.cpu_us_per_request - explained
            lines.append(
                f"| 7. transport and event loop (the rest) | {rest:.1f} | {_share(rest, total)} | "
                "grpc's C core, HTTP/2, asyncio, grpc.aio's per-call tasks |"
            )
            batch = f", mean batch {run.mean_batch:.1f}" if run.mean_batch else ""
            batch += f"; the clients' process: {run.clients_us:.0f} µs per request" if run.clients_us else ""
            lines.append(
                f"| **server, end to end** | **{run.cpu_us_per_request:.1f}** | 100% | {run.requests:,} requests "
                f"in {run.seconds:.1f} s ({run.rate:.0f}/s, {run.errors} errors){batch} |"
            )
            threads = ", ".join(f"{name} {value:.0f}" for name, value in run.threads_us.items())
            lines += ["", f"Server CPU µs per request by thread: {threads}."]
        if len(shape.servers) > 1 and shape.server is not None:
            lines += _variants_table(shape.servers, shape.server)
        lines.append("")
    return "\n".join(lines)


def _variants_table(runs: dict[str, ServerRun], as_is: ServerRun) -> list[str]:
    lines = [
        "",
        "Server variants, all up at once and measured in interleaved windows:",
        "",
        "| variant | server µs per request | vs as-is | main thread (event loop) µs | requests/s | errors |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for variant, run in runs.items():
        loop_us = run.threads_us.get(MAIN_THREAD, 0.0)
        change = run.cpu_us_per_request - as_is.cpu_us_per_request
        lines.append(
            f"| {variant}: {VARIANTS[variant]} | {run.cpu_us_per_request:.1f} | {change:+.1f} | {loop_us:.0f} | "
            f"{run.rate:.0f} | {run.errors} |"
        )
    return lines


NOTES_MARKER = "<!-- written by hand below this line; benchmarks.hotpath keeps it when it rewrites the tables -->"


def kept_notes(out: str | None) -> str:
    """What follows :data:`NOTES_MARKER` in the file ``out`` already holds (the analysis), marker included."""
    try:
        text = Path(out).read_text() if out else ""
    except OSError:
        return ""
    return "\n" + text[text.index(NOTES_MARKER) :] if NOTES_MARKER in text else ""


def _share(value: float, total: float | None) -> str:
    return f"{value / total:.1%}" if total else "—"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.hotpath",
        description="CPU microseconds per batch-1 gRPC request in each stage of the server's hot path "
        "(decode, routing, contract, bookkeeping, batcher, response) and end to end under 16 clients, "
        "with a free-compute stand-in backend.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--image-size", type=int, default=IMAGE_SIZE, help="image side (make demo's champion: 40)")
    parser.add_argument("--channels", type=int, nargs="+", default=[1, 3], choices=[1, 3], help="request channels")
    parser.add_argument("--requests", type=int, default=4000, help="calls per timed loop of stages 1-6")
    parser.add_argument("--repeats", type=int, default=5, help="timed loops per stage (the median is reported)")
    parser.add_argument("--seconds", type=float, default=5.0, help="timed window of the end-to-end server run")
    parser.add_argument("--clients", type=int, default=CLIENTS, help="closed-loop batch-1 clients of the server run")
    parser.add_argument("--no-server", action="store_true", help="stages 1-6 only (no server process)")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=[AS_IS],
        choices=list(VARIANTS),
        help="server experiments measured against the server as it is (always included), interleaved: "
        + "; ".join(f"{name}: {what}" for name, what in VARIANTS.items()),
    )
    parser.add_argument("--rounds", type=int, default=1, help="interleaved windows of --seconds per server variant")
    parser.add_argument("--out", default=None, help="write the markdown table here too")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if min(args.requests, args.repeats, args.clients, args.rounds) < 1 or args.seconds <= 0:
        print("error: --requests, --repeats, --clients, --rounds must be >= 1 and --seconds > 0", file=sys.stderr)
        return 2
    variants = [AS_IS, *(variant for variant in dict.fromkeys(args.variants) if variant != AS_IS)]
    from tqdm import tqdm

    model = free_model(args.image_size)
    shapes = []
    steps = len(args.channels) * (1 if args.no_server else 2)
    try:
        with tqdm(total=steps, desc="hot path", unit="step", file=sys.stderr) as progress:
            for channels in args.channels:
                progress.set_postfix_str(f"{channels}-channel stages")
                shape = measure_stages(channels, args.image_size, args.requests, args.repeats, model)
                progress.update()
                if not args.no_server:
                    progress.set_postfix_str(f"{channels}-channel server")
                    shape.servers = measure_server(
                        channels, args.image_size, args.seconds, args.clients, variants, args.rounds
                    )
                    progress.update()
                shapes.append(shape)
    finally:
        model.stop()
    command = "python -m benchmarks.hotpath " + " ".join(sys.argv[1:] if argv is None else argv)
    publish(report(shapes, command.strip()) + kept_notes(args.out), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
