"""The KServe predictor: ``TopTagger``, a :class:`kserve.Model` served as ``top-tagger``.

Lifecycle (KServe's hooks):
- ``load()`` resolves the model URI, builds the backend (torch or OpenCL) and the batchers. If
  anything fails, the model stays registered but not ready, and the reason is kept for the
  readiness answer and the log; the server itself stays up. KServe's data plane calls ``load()``
  again on every request to a model that is not ready, so a load may be retried many times: all
  of them use the one device thread of the object's life, and a loaded model loads nothing again.
- ``predict()`` (KServe's REST path) validates the request against the
  :class:`~serving.contract.Contract`; ``classify()``, shared with the gRPC fast path, waits for
  its rows from the :class:`~serving.batching.DynamicBatcher` of its input kind. Batches of
  constituents are rendered with the training-time image configuration.
- ``stop()`` (KServe's unload hook: ``ModelRepository.unload``, which the server's shutdown calls
  for every model) closes the batchers and ends the device thread, so no thread is left. Waiting
  and later requests get :class:`~kserve.errors.ModelNotReady` (HTTP 503) at once, and a stopped
  model does not load again, except through ``reopen()``: the explicit control plane's load after
  an unload (:mod:`serving.control`), which builds a fresh backend, batchers and device thread.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from kserve import Model
from kserve.errors import InvalidInput, ModelNotReady
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse

from serving import metrics
from serving.backends import Backend, load_backend
from serving.batching import BatcherClosed, DynamicBatcher, QueueFull
from serving.contract import Contract
from serving.drain import Drain
from serving.errors import NOT_LOADED, ServerOverloaded
from serving.limits import Admission
from serving.redact import redact
from serving.triton.checksum import model_checksums
from toptagger.constants import MODEL_NAME
from toptagger.errors import TaggerError
from toptagger.model_uri import fetch_model_dir
from toptagger.signature import CONSTITUENTS, DATATYPE, IMAGES, PROBABILITIES

log = logging.getLogger("serving.predictor")


@dataclass(frozen=True)
class BatchingOptions:
    max_batch_size: int = 16
    max_latency_ms: float = 5.0
    max_queue: int = 256
    # Refuse when the admitted rows would take longer than this at the measured rate
    # (serving.limits.Admission); None: only max_queue limits the queue.
    max_queue_ms: float | None = None


class TopTagger(Model):
    """ResNet-50 top tagger behind the Open Inference Protocol v2, with dynamic batching."""

    def __init__(
        self,
        model_uri: str,
        backend: str = "torch",
        batching: BatchingOptions | None = None,
        fallback: str | None = None,
        name: str = MODEL_NAME,
        precision: str = "fp32",
        drain: Drain | None = None,
    ) -> None:
        super().__init__(name)
        self.model_uri = model_uri
        self.backend_name = backend
        self.fallback = fallback
        self.precision = precision
        self.batching = batching or BatchingOptions()
        self.admission = Admission(self.batching.max_queue_ms)  # backpressure in seconds of work
        self.drain = drain or Drain()  # requests in flight; none taken once the server is told to stop
        self.backend: Backend | None = None
        # One queue per input kind, both feeding the one device thread: constituents are rendered
        # per merged batch, on that thread, rather than once per request.
        self.batchers: dict[str, DynamicBatcher] = {}
        self.contract: Contract | None = None
        # Triton's checksum agent's MD5 of every file served, answered in ModelConfig (serving.triton.checksum).
        self.checksums: dict[str, str] = {}
        self.not_ready_reason: str | None = NOT_LOADED
        # The backend is built and run on one dedicated thread: torch's OpenMP pool belongs to the
        # thread that first used it, and a second thread's pool competes with it (measured: 13 ms
        # -> 24 ms per batch-1 ResNet-50 call at 64x64 on 2 cores). One for the object's life:
        # started by the first load(), reused by every retry, ended by stop().
        self.device_thread: ThreadPoolExecutor | None = None
        self.stopped = False
        # load() runs at start-up and on KServe's event loop (a retry per request); stop() in a
        # signal handler. One at a time, so that a retry never builds a second backend. Reentrant:
        # the signal handler may run stop() on the thread that is inside load().
        self._lifecycle = threading.RLock()

    # --- lifecycle ------------------------------------------------------------------------------
    def load(self) -> bool:
        """Build the backend and the batchers; False (not ready, with the reason) where that fails.

        Loading a loaded model does nothing; a failed load may be retried; a stopped model refuses.
        """
        with self._lifecycle:
            if self.stopped:
                log.error("model %s: load() after stop() refused (%s)", redact(self.model_uri), self.not_ready_reason)
                return False
            if self.drain.draining:  # KServe retries load() on requests to a model that is not ready
                return False
            if self.ready:
                return True  # loaded already: the backend and its batchers stay as they are
            if self.device_thread is None:
                self.device_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="device")
            try:
                backend, checksums = self.device_thread.submit(self._build).result()
            except TaggerError as exc:
                if not self.stopped:  # else stop() ran in a signal handler meanwhile and said why
                    # Redacted: the reason goes to clients (readiness, index, errors) and the log.
                    self.not_ready_reason = redact(
                        f"cannot load model {self.model_uri!r} with backend {self.backend_name}: {exc}"
                    )
                    log.error(self.not_ready_reason)
                return False
            if self.stopped:
                return False
            self.backend, self.checksums = backend, checksums
            self._start_batchers(backend, self.device_thread)
        return True

    def _build(self) -> tuple[Backend, dict[str, str]]:
        """On the device thread: the backend, and the checksums of the very folder it was built from
        (fetched once: an alias fetched twice could move in between)."""
        model_dir = fetch_model_dir(self.model_uri)
        backend = load_backend(str(model_dir), self.backend_name, self.fallback, self.precision)
        return backend, model_checksums(model_dir)

    def _start_batchers(self, backend: Backend, device_thread: ThreadPoolExecutor) -> None:
        max_batch = min(self.batching.max_batch_size, backend.max_batch_size or self.batching.max_batch_size)
        self.contract = Contract(backend.channels, backend.image_size, max_batch)
        # Constituents are rendered into images per merged batch: Triton's compute_input.
        prepare = {IMAGES: None, CONSTITUENTS: backend.render}
        self.batchers = {
            kind: DynamicBatcher(
                backend.predict,
                max_batch_size=max_batch,
                max_latency_ms=self.batching.max_latency_ms,
                max_queue=self.batching.max_queue,
                on_batch=self._on_batch,
                executor=device_thread,
                prepare=render,
            )
            for kind, render in prepare.items()
        }
        if self.batching.max_queue_ms is not None:
            self._seed_admission(backend, max_batch, device_thread)
        self.ready = True
        self.not_ready_reason = None
        log.info(
            "model %s ready: backend %s, input [N, %d, %d, %d], max batch %d",
            redact(self.model_uri),
            backend.description,
            backend.channels,
            backend.image_size,
            backend.image_size,
            max_batch,
        )

    def _on_batch(self, size: int, compute_s: float, queue_wait_s: float) -> None:
        metrics.observe_batch(size, compute_s, queue_wait_s)
        self.admission.observe(size, compute_s)

    def _seed_admission(self, backend: Backend, max_batch: int, device_thread: ThreadPoolExecutor) -> None:
        """Seed the admission rate with a full batch of zeros, timed on its second run (the first
        one pays for lazy compilation and allocation), before any request arrives."""
        zeros = np.zeros((max_batch, backend.channels, backend.image_size, backend.image_size), np.float32)
        try:
            for _ in range(2):
                start = time.perf_counter()
                device_thread.submit(backend.predict, zeros).result()
                elapsed = time.perf_counter() - start
        except Exception as exc:  # the first real batches measure it instead
            log.warning("warm-up batch failed (%s); the admission rate is measured from the first batches", exc)
            return
        self.admission.seed(max_batch, elapsed)
        log.info("admission seeded at %.0f rows/s (warm-up batch of %d)", self.admission.rows_per_s, max_batch)

    @property
    def pending_requests(self) -> int:
        """Requests accepted and not yet executing, over both queues (read at each scrape)."""
        return sum(batcher.pending_count for batcher in list(self.batchers.values()))

    def begin_drain(self) -> None:
        """Not ready from now on, and no new inference (:mod:`serving.drain`); what was accepted runs on."""
        with self._lifecycle:
            self.drain.begin()
            self.ready = False
            if not self.stopped:
                self.not_ready_reason = self.drain.reason
        log.info("model %s draining: %d request(s) in flight", redact(self.model_uri), self.drain.in_flight)

    def stop(self) -> None:
        """End serving for good: fail waiting requests, close the batchers, end the device thread.

        Returns once the device thread has ended (after the batch it may be running). From any
        thread; a second call does nothing.
        """
        with self._lifecycle:
            if self.stopped:
                return
            self.stopped = True
            self.ready = False
            self.not_ready_reason = "stopped: the server is shutting down, or the model was unloaded"
            for batcher in self.batchers.values():
                batcher.shutdown(f"model '{self.name}' {self.not_ready_reason}")
            if self.device_thread is not None:
                self.device_thread.shutdown(wait=True, cancel_futures=True)
            log.info("model %s stopped", redact(self.model_uri))

    def reopen(self) -> None:
        """Undo :meth:`stop` so that the next :meth:`load` builds a fresh backend, batchers and device
        thread: the control plane's load after an explicit unload (:mod:`serving.control`), never
        KServe's load retries, which keep refusing a stopped model. Does nothing unless stopped.
        """
        with self._lifecycle:
            if not self.stopped:
                return
            self.stopped = False
            self.backend, self.contract, self.batchers, self.device_thread = None, None, {}, None
            self.not_ready_reason = NOT_LOADED

    # --- metadata -------------------------------------------------------------------------------
    @property
    def serving(self) -> dict[str, str] | None:
        """Backend, precision and selection of what serves (:meth:`Backend.serving`); None while not ready."""
        backend = self.backend
        return backend.serving() if backend is not None and self.ready else None

    def get_input_types(self) -> list[dict]:
        return [spec.as_v2() for spec in self.contract.inputs] if self.contract else []

    def get_output_types(self) -> list[dict]:
        return [spec.as_v2() for spec in self.contract.outputs] if self.contract else []

    # --- inference ------------------------------------------------------------------------------
    async def predict(self, payload: InferRequest, headers: dict[str, str] | None = None) -> InferResponse:
        if not isinstance(payload, InferRequest):
            raise InvalidInput("the top tagger speaks the v2 (Open Inference) protocol only")
        if self.contract is None or self.stopped:
            raise ModelNotReady(self.name, self.not_ready_reason)
        probabilities = await self.classify(*self.contract.parse(payload))
        output = InferOutput(PROBABILITIES, list(probabilities.shape), DATATYPE)
        # KServe re-encodes outputs on the way out: binary (the binary tensor extension) when the
        # client asked for it per output or with binary_data_output, JSON otherwise.
        output.set_data_from_numpy(probabilities, binary_data=False)
        return InferResponse(
            response_id=payload.id or (headers or {}).get("x-request-id") or str(uuid.uuid4()),
            model_name=self.name,
            infer_outputs=[output],
            use_binary_outputs=payload.use_binary_outputs,
            requested_outputs=payload.request_outputs,
        )

    async def classify(self, input_name: str, rows: np.ndarray, admitted: bool = False) -> np.ndarray:
        """Validated rows of one input kind -> probabilities float32 [N, 2], through the batcher.

        Shared by both transports: KServe's REST path (``predict``) and the gRPC fast path
        (:mod:`serving.grpc_infer`). ``admitted``: the caller holds ``self.admission`` for these
        rows already (it checked the size before decoding them); else they are admitted here.
        """
        if not admitted:
            with self.admission.admit(len(rows)):
                return await self.classify(input_name, rows, admitted=True)
        batcher = None if self.stopped else self.batchers.get(input_name)
        if batcher is None:  # stopped, or never loaded: say why rather than wait for a batcher
            raise ModelNotReady(self.name, self.not_ready_reason)
        try:
            probabilities = await batcher.submit(rows)
        except QueueFull as exc:
            raise ServerOverloaded(str(exc)) from None
        except BatcherClosed:  # stopped while this request waited
            raise ModelNotReady(self.name, self.not_ready_reason) from None
        return np.ascontiguousarray(probabilities, dtype=np.float32)
