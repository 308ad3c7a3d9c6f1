"""Triton's Prometheus metrics (``nv_inference_*``) on a port of their own, as ``tritonserver`` serves them.

SuperSONIC's dashboards, its KEDA scaling metric and its Envoy admission filter read Triton's names
(``nv_inference_queue_duration_us`` over ``nv_inference_exec_count``), per model and version, from
port 8002 (reference §11). The filter fails on a missing value, so every family exists at zero from
start-up, before the model has loaded, as Triton's do.

One owner per count: :class:`TritonMetrics` reads the batchers' :class:`~serving.batching.BatchStatistics`
(and the admission's refusals) at scrape time, the same numbers ``ModelStatistics`` answers
with, so the two can never disagree and the request path does no metrics work at all. The
server is a small threaded WSGI server on its own thread: a scrape never runs on the event loop
that serves inference. The text is written here, in Prometheus text format 0.0.4 as Triton
writes it: ``prometheus_client`` would name each counter's ``# TYPE`` line ``*_total`` (and
switch to OpenMetrics on a scraper's ``Accept`` header), which Triton's names are not.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from serving.batching import FAILURE_REASONS, BatchStatistics
from toptagger.constants import MODEL_VERSION

if TYPE_CHECKING:
    from serving.predictor import TopTagger

DEFAULT_METRICS_PORT = 8002  # Triton's, and SuperSONIC's ``metrics`` port
METRICS_PATH = "/metrics"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # Prometheus text format, as Triton's

# Counter name -> (Triton 2.51's help text, the BatchStatistics field it reads; ns fields are written in µs).
COUNTERS: dict[str, tuple[str, str]] = {
    "nv_inference_request_success": ("Number of successful inference requests, all batch sizes", "success_count"),
    "nv_inference_count": ("Number of inferences performed (does not include cached requests)", "inference_count"),
    "nv_inference_exec_count": (
        "Number of model executions performed (does not include cached requests)",
        "execution_count",
    ),
    "nv_inference_request_duration_us": (
        "Cumulative inference request duration in microseconds (includes cached requests)",
        "request_ns",
    ),
    "nv_inference_queue_duration_us": (
        "Cumulative inference queuing duration in microseconds (includes cached requests)",
        "queue_ns",
    ),
    "nv_inference_compute_input_duration_us": (
        "Cumulative compute input duration in microseconds (does not include cached requests)",
        "compute_input_ns",
    ),
    "nv_inference_compute_infer_duration_us": (
        "Cumulative compute inference duration in microseconds (does not include cached requests)",
        "compute_infer_ns",
    ),
    "nv_inference_compute_output_duration_us": (
        "Cumulative inference compute output duration in microseconds (does not include cached requests)",
        "compute_output_ns",
    ),
}
FAILURE = "nv_inference_request_failure"
FAILURE_HELP = "Number of failed inference requests, all batch sizes"
PENDING = "nv_inference_pending_request_count"
PENDING_HELP = "Instantaneous number of pending requests awaiting execution per-model."
# Every family and its type: what a scrape of ours and of real Triton must both show.
FAMILIES: dict[str, str] = {**dict.fromkeys(COUNTERS, "counter"), FAILURE: "counter", PENDING: "gauge"}


@dataclass(frozen=True)
class Family:
    """One metric family: name, Prometheus type, help text, and its (labels, value) samples."""

    name: str
    kind: str
    help: str
    samples: list[tuple[dict[str, str], float]]

    def text(self) -> str:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]
        for labels, value in self.samples:
            rendered = ",".join(f'{key}="{_escape(label)}"' for key, label in labels.items())
            lines.append(f"{self.name}{{{rendered}}} {_number(value)}")
        return "\n".join(lines) + "\n"


class TritonMetrics:
    """The ``nv_inference_*`` families of one model, computed from its statistics at each scrape."""

    def __init__(self, model: TopTagger) -> None:
        self.model = model

    def collect(self) -> Iterator[Family]:
        model = self.model
        # list(): the event loop may replace the batchers (a control-plane load) while we read.
        stats = BatchStatistics.combined(b.stats for b in list(model.batchers.values()))
        labels = {"model": model.name, "version": MODEL_VERSION}
        for name, (help_text, field) in COUNTERS.items():
            value = getattr(stats, field)
            yield Family(name, "counter", help_text, [(labels, value / 1000 if field.endswith("_ns") else value)])
        failures = dict(stats.failures)
        # Refused by --max-queue-ms before reaching a batcher: Triton's REJECTED (a full queue).
        failures["REJECTED"] = failures.get("REJECTED", 0) + model.admission.refused
        rows = [({**labels, "reason": reason}, float(failures.get(reason, 0))) for reason in FAILURE_REASONS]
        yield Family(FAILURE, "counter", FAILURE_HELP, rows)
        yield Family(PENDING, "gauge", PENDING_HELP, [(labels, float(model.pending_requests))])

    def text(self) -> str:
        return "".join(family.text() for family in self.collect())


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    # Whole numbers as Triton writes them (0, not 0.0); microseconds keep their fraction.
    return str(int(value)) if float(value).is_integer() else repr(float(value))


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # a scrape every few seconds is not worth a log line


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


def metrics_app(metrics: TritonMetrics) -> Callable[..., list[bytes]]:
    """WSGI: ``GET /metrics`` in Prometheus text format; any other path 404, other methods 405."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        path, method = environ.get("PATH_INFO", ""), environ.get("REQUEST_METHOD", "GET")
        if path.rstrip("/") != METRICS_PATH:
            return _plain(start_response, "404 Not Found", f"no such path {path!r}; metrics are at {METRICS_PATH}\n")
        if method not in ("GET", "HEAD"):
            return _plain(start_response, "405 Method Not Allowed", f"{method} is not allowed; use GET\n")
        body = metrics.text().encode()
        start_response("200 OK", [("Content-Type", CONTENT_TYPE), ("Content-Length", str(len(body)))])
        return [b"" if method == "HEAD" else body]

    return app


def _plain(start_response: Callable[..., Any], status: str, text: str) -> list[bytes]:
    body = text.encode()
    start_response(status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))])
    return [body]


class MetricsServer:
    """``GET /metrics`` on ``port`` in a daemon thread; :meth:`close` stops it."""

    def __init__(self, model: TopTagger, port: int, host: str = "0.0.0.0") -> None:
        # Raises OSError when the port is taken: the caller turns it into a start-up error.
        self._httpd = make_server(host, port, metrics_app(TritonMetrics(model)), _ThreadingServer, _QuietHandler)
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="metrics", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
