"""Start the top-tagger predictor.

    python -m serving --model-uri URI [--backend torch|opencl] [--http-port 8080] [--grpc-port 8081]
                      [--max-batch-size 16] [--max-latency-ms 5] [--max-queue 256] [--max-queue-ms 1000]
                      [--max-request-mb 64] [--max-message-mb 64]
                      [--model-control none|explicit] [--control-token-file PATH]
                      [--metrics-port 8002] [--drain-seconds 30]

Every option also reads an environment variable (upper case, e.g. ``MODEL_URI``, ``MAX_BATCH_SIZE``)
so that a Kubernetes manifest can set it; a flag on the command line wins.

Limits (serving.limits): ``--max-request-mb`` (64) caps an inference request on both protocols
before it is read: a REST body over it is answered 413 from its ``Content-Length`` alone, a gRPC
input whose shape declares more bytes RESOURCE_EXHAUSTED (``--max-body-mb`` / ``MAX_BODY_MB``, its
old name, still work). ``--max-message-mb`` (64) is gRPC's send and receive message limit (a gRPC
request is bounded by the smaller of the two; 64 MB holds a 16-image 224x224x3 FP32 batch, 9.6 MB,
six times). ``--max-queue-ms`` (1000) is backpressure in time: a request is refused at once (503
with ``Retry-After`` / RESOURCE_EXHAUSTED) when the rows in flight plus its own would take longer
than that at the measured rows/s (seeded by a warm-up batch at load); ``--max-queue`` (256
requests) stays as a cap on the batcher's queue. Both are checked on the declared shape, before
the tensor is decoded.

Model control (serving.control): ``--model-control none`` (the default) answers the repository
extension's load/unload with 404 / UNIMPLEMENTED. ``--model-control explicit`` allows them to
callers with a bearer token, read from ``--control-token-file`` (a mounted Secret) or from the
environment variable ``CONTROL_TOKEN`` (a Secret's secretKeyRef); there is no flag for the token
itself. Explicit without a token is refused at start-up. After an explicit unload the server
reports not live until a load brings the model back.

Fleet (serving.triton.metrics, serving.drain): ``--metrics-port`` (8002, Triton's) serves Triton's
``nv_inference_*`` metrics at ``GET /metrics`` in Prometheus text format, at zero from start-up; 0
turns it off, and a port that is taken stops the start-up. On SIGTERM the server drains: not ready
at once (REST 503, gRPC ServerReady/ModelReady false), new inference refused (503 + Retry-After /
UNAVAILABLE), every accepted request answered, then exit 0, after ``--drain-seconds`` (30) at most.

No message that reaches a client or the log carries a credential (serving.redact): URIs lose their
userinfo and query, and credential-like environment values are masked.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

from serving import redact
from serving.backends import BACKENDS, PRECISIONS
from toptagger.cli import positive_int
from toptagger.constants import CHAMPION_URI, GRPC_PORT, HTTP_PORT
from toptagger.errors import ConfigError

SERVING_LOGGERS = ("serving",)


def _from_env(parser: argparse.ArgumentParser, flag: str, default: object, help: str, **options: object) -> None:
    """``--flag`` whose default comes from the environment variable of the same name (``--max-queue``:
    ``MAX_QUEUE``). argparse converts a string default with the option's type, so a bad value in
    the environment is refused as a bad flag would be."""
    env = flag.removeprefix("--").upper().replace("-", "_")
    value = os.environ.get(env) or default
    parser.add_argument(flag, default=value if value is None else str(value), help=f"{help} (env {env})", **options)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m serving",
        description="Serve the ResNet-50 top tagger over the Open Inference Protocol v2 (REST + gRPC) "
        "with dynamic batching and Triton/SONIC-compatible gRPC.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _from_env(parser, "--model-uri", "/mnt/models", f"model folder, s3://bucket/prefix, or {CHAMPION_URI}")
    _from_env(
        parser,
        "--backend",
        "torch",
        "execution backend; auto: the fastest of openvino and onnxruntime on this CPU, measured at load",
        choices=list(BACKENDS),
    )
    _from_env(
        parser, "--fallback", None, "backend to use when the chosen one has no usable device", choices=list(BACKENDS)
    )
    _from_env(
        parser,
        "--precision",
        "fp32",
        "arithmetic of the backend: fp16/bf16 for torch (the GPU pool), fp16 for an OpenCL package exported so; "
        "fp32/bf16/int8 for openvino, fp32/int8 for onnxruntime where the version admitted them; auto: the "
        "fastest admitted one on this CPU, measured at load",
        choices=list(PRECISIONS),
    )
    _from_env(parser, "--http-port", HTTP_PORT, "REST port", type=int)
    _from_env(parser, "--grpc-port", GRPC_PORT, "gRPC port (h2c)", type=int)
    _from_env(
        parser,
        "--metrics-port",
        8002,
        "port of Triton's nv_inference_* metrics (GET /metrics, Prometheus text); 0: off",
        type=int,
    )
    _from_env(
        parser,
        "--drain-seconds",
        30,
        "on SIGTERM: longest wait for accepted requests before exiting (not ready and refusing new ones meanwhile)",
        type=float,
    )
    _from_env(parser, "--max-batch-size", 16, "most rows merged into one batch", type=positive_int)
    _from_env(parser, "--max-latency-ms", 5, "longest wait for a batch to fill once the device is free", type=float)
    _from_env(
        parser,
        "--max-queue",
        256,
        "requests allowed to wait; beyond it answer 503 / RESOURCE_EXHAUSTED",
        type=positive_int,
    )
    _from_env(
        parser,
        "--max-queue-ms",
        1000,
        "refuse (503 + Retry-After / RESOURCE_EXHAUSTED) when the queued rows would take longer than this "
        "at the measured rows/s",
        type=float,
    )
    _from_env(
        parser,
        "--max-request-mb",
        os.environ.get("MAX_BODY_MB") or 64,  # MAX_BODY_MB: its old name
        "largest inference request (REST body: 413; gRPC input tensor: RESOURCE_EXHAUSTED), checked before it is read",
        type=float,
    )
    parser.add_argument(
        "--max-body-mb", dest="max_request_mb", type=float, default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )
    _from_env(parser, "--max-message-mb", 64, "gRPC send and receive message limit", type=float)
    _from_env(parser, "--log-level", "INFO", "DEBUG logs every request")
    _from_env(
        parser,
        "--model-control",
        "none",
        "model load/unload over REST and gRPC: none refuses them (404 / UNIMPLEMENTED); explicit allows them "
        "with a bearer token (--control-token-file or env CONTROL_TOKEN)",
        choices=["none", "explicit"],
    )
    _from_env(
        parser,
        "--control-token-file",
        None,
        "file holding the bearer token of --model-control explicit (a mounted Secret); else env CONTROL_TOKEN",
    )
    parser.add_argument(
        "--threads", type=positive_int, default=None, help="torch intra-op threads (default: torch's choice)"
    )
    return parser


class JsonFormatter(logging.Formatter):
    """One JSON object per line: what log collectors in a cluster parse without configuration."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        entry: dict = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name}
        try:
            parsed = json.loads(message)
            entry.update(parsed if isinstance(parsed, dict) else {"message": message})
        except ValueError:
            entry["message"] = message
        if record.exc_info or record.exc_text:  # exc_text: already formatted and redacted (serving.redact)
            entry["error"] = record.exc_text or self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    for name in SERVING_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.setLevel(level.upper())
        logger.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_latency_ms < 0:
        print("error: --max-latency-ms must be >= 0", file=sys.stderr)
        return 2
    if min(args.max_queue_ms, args.max_request_mb, args.max_message_mb) <= 0:
        print("error: --max-queue-ms, --max-request-mb and --max-message-mb must be > 0", file=sys.stderr)
        return 2
    if not 0 <= args.metrics_port <= 65535 or not 0 <= args.drain_seconds < float("inf"):
        print("error: --metrics-port must be 0..65535 (0: off) and --drain-seconds a number >= 0", file=sys.stderr)
        return 2
    configure_logging(args.log_level)
    # Before anything can log: no record, answer or traceback carries a credential (serving.redact).
    redact.add_uri_secrets(args.model_uri)
    redact.install_logging()
    from serving.control import ModelControl  # imports fastapi and grpc: after --help

    try:
        control = ModelControl.from_options(args.model_control, args.control_token_file)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # Imported late: KServe parses sys.argv at import time and we want --help to be instant.
    sys.argv = sys.argv[:1]
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from serving.limits import Limits, return_big_buffers_to_the_system

    return_big_buffers_to_the_system()  # memory stays flat under big (refused) requests
    from serving.drain import Drain
    from serving.predictor import BatchingOptions, TopTagger
    from serving.server import TaggerModelServer

    model = TopTagger(
        args.model_uri,
        backend=args.backend,
        fallback=args.fallback,
        precision=args.precision,
        batching=BatchingOptions(args.max_batch_size, args.max_latency_ms, args.max_queue, args.max_queue_ms),
        drain=Drain(args.drain_seconds),
    )
    metrics_server = None
    if args.metrics_port:  # before the model loads: the counters exist at zero from start-up, as Triton's
        from serving.triton.metrics import MetricsServer

        try:
            metrics_server = MetricsServer(model, args.metrics_port)
        except OSError as exc:
            print(f"error: cannot serve metrics on port {args.metrics_port} ({exc.strerror}); "
                  "choose another with --metrics-port, or 0 to turn them off", file=sys.stderr)  # fmt: skip
            return 2
    model.load()
    server = TaggerModelServer(
        model,
        limits=Limits.from_mb(args.max_request_mb, args.max_message_mb),
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        control=control,
        metrics_server=metrics_server,
    )
    redact.attach_filters()  # on the handlers KServe's logging configuration just made
    server.start()
    return 0


if __name__ == "__main__":
    sys.exit(main())
