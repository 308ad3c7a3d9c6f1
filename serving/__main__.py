"""Start the top-tagger predictor.

    python -m serving --model-uri URI [--backend torch|opencl] [--http-port 8080] [--grpc-port 8081]
                      [--max-batch-size 16] [--max-latency-ms 5] [--max-queue 256]

Every option also reads an environment variable (upper case, e.g. ``MODEL_URI``, ``MAX_BATCH_SIZE``)
so that a Kubernetes manifest can set it; a flag on the command line wins.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

from serving.backends import BACKENDS
from toptagger.cli import positive_int
from toptagger.constants import CHAMPION_URI, GRPC_PORT, HTTP_PORT

SERVING_LOGGERS = ("serving",)


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m serving",
        description="Serve the ResNet-50 top tagger over the Open Inference Protocol v2 (REST + gRPC) "
        "with dynamic batching and Triton/SONIC-compatible gRPC.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--model-uri",
        default=_env("MODEL_URI", "/mnt/models"),
        help=f"model folder, s3://bucket/prefix, or {CHAMPION_URI} (env MODEL_URI)",
    )
    parser.add_argument(
        "--backend",
        choices=list(BACKENDS),
        default=_env("BACKEND", "torch"),
        help="execution backend (env BACKEND)",
    )
    parser.add_argument(
        "--fallback",
        choices=list(BACKENDS),
        default=os.environ.get("FALLBACK") or None,
        help="backend to use when the chosen one has no usable device (env FALLBACK)",
    )
    parser.add_argument("--http-port", type=int, default=int(_env("HTTP_PORT", str(HTTP_PORT))), help="REST port")
    parser.add_argument("--grpc-port", type=int, default=int(_env("GRPC_PORT", str(GRPC_PORT))), help="gRPC port (h2c)")
    parser.add_argument(
        "--max-batch-size",
        type=positive_int,
        default=int(_env("MAX_BATCH_SIZE", "16")),
        help="most rows merged into one batch (env MAX_BATCH_SIZE)",
    )
    parser.add_argument(
        "--max-latency-ms",
        type=float,
        default=float(_env("MAX_LATENCY_MS", "5")),
        help="longest wait for a batch to fill once the device is free (env MAX_LATENCY_MS)",
    )
    parser.add_argument(
        "--max-queue",
        type=positive_int,
        default=int(_env("MAX_QUEUE", "256")),
        help="requests allowed to wait; beyond it answer 503 / RESOURCE_EXHAUSTED (env MAX_QUEUE)",
    )
    parser.add_argument(
        "--max-body-mb", type=float, default=float(_env("MAX_BODY_MB", "64")), help="largest REST body accepted"
    )
    parser.add_argument(
        "--threads", type=positive_int, default=None, help="torch intra-op threads (default: torch's choice)"
    )
    parser.add_argument("--log-level", default=_env("LOG_LEVEL", "INFO"), help="DEBUG logs every request")
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
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
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
    configure_logging(args.log_level)
    # Imported late: KServe parses sys.argv at import time and we want --help to be instant.
    sys.argv = sys.argv[:1]
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from serving.predictor import BatchingOptions, TopTagger
    from serving.server import TaggerModelServer

    model = TopTagger(
        args.model_uri,
        backend=args.backend,
        fallback=args.fallback,
        batching=BatchingOptions(args.max_batch_size, args.max_latency_ms, args.max_queue),
    )
    model.load()
    server = TaggerModelServer(
        model, max_body=int(args.max_body_mb * 1024 * 1024), http_port=args.http_port, grpc_port=args.grpc_port
    )
    server.start()
    return 0


if __name__ == "__main__":
    sys.exit(main())
