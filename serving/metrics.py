"""Prometheus metrics of the predictor, served by KServe's ``/metrics`` on the HTTP port.

Request counts and latencies are measured at the transport (a REST middleware and the gRPC
``ModelInfer`` handler), so that they include decoding and encoding and carry the protocol as a
label.
Batch sizes, queue wait and compute time come from the dynamic batcher; the queue depth is read
from the batchers at each scrape (:func:`watch_queue`), so it is right whenever it is read.
Triton's own metrics (``nv_inference_*``, on their own port) are in :mod:`serving.triton.metrics`.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)

REQUESTS = Counter("toptagger_requests", "Inference requests by protocol and outcome", ["protocol", "status"])
REQUEST_LATENCY = Histogram(
    "toptagger_request_latency_seconds",
    "End-to-end request latency in the server",
    ["protocol"],
    buckets=LATENCY_BUCKETS,
)
BATCH_SIZE = Histogram("toptagger_batch_size", "Rows per executed batch", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
QUEUE_DEPTH = Gauge("toptagger_queue_depth", "Requests accepted and waiting for the model (read at scrape time)")
IN_FLIGHT = Gauge(
    "toptagger_requests_in_flight",
    "Inference requests accepted and not yet answered, both protocols: what a drain waits for (read at scrape time)",
)
# Refused REST uploads (serving.discard): what clients sent after their answer, and how often
# the server slowed such a client down; a steady rise names a client looping requests it is refused.
DISCARDED_BYTES = Counter("toptagger_rest_discarded_bytes", "Bytes of refused REST uploads read and dropped")
DISCARD_PAUSES = Counter(
    "toptagger_rest_discard_pauses", "Times reading a refused REST upload paused to hold its rate to the bound"
)
QUEUE_WAIT = Histogram("toptagger_queue_wait_seconds", "Mean wait in the queue per batch", buckets=LATENCY_BUCKETS)
COMPUTE = Histogram("toptagger_compute_seconds", "Model compute time per batch", buckets=LATENCY_BUCKETS)


def observe_batch(size: int, compute_s: float, queue_wait_s: float) -> None:
    BATCH_SIZE.observe(size)
    COMPUTE.observe(compute_s)
    QUEUE_WAIT.observe(queue_wait_s)


def watch(pending: Callable[[], int], in_flight: Callable[[], int]) -> None:
    """Read the queue depth and the requests in flight at each scrape (a gauge set per request goes stale)."""
    QUEUE_DEPTH.set_function(pending)
    IN_FLIGHT.set_function(in_flight)
