"""Prometheus metrics of the predictor, served by KServe's ``/metrics`` on the HTTP port.

Request counts and latencies are measured at the transport (a REST middleware and the gRPC
``ModelInfer`` handler), so that they include decoding and encoding and carry the protocol as a
label.
Batch sizes, queue depth, queue wait and compute time come from the dynamic batcher.
"""

from __future__ import annotations

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
QUEUE_DEPTH = Gauge("toptagger_queue_depth", "Requests waiting in the batching queue")
QUEUE_WAIT = Histogram("toptagger_queue_wait_seconds", "Mean wait in the queue per batch", buckets=LATENCY_BUCKETS)
COMPUTE = Histogram("toptagger_compute_seconds", "Model compute time per batch", buckets=LATENCY_BUCKETS)


def observe_batch(size: int, compute_s: float, queue_wait_s: float) -> None:
    BATCH_SIZE.observe(size)
    COMPUTE.observe(compute_s)
    QUEUE_WAIT.observe(queue_wait_s)
