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

from serving.backends import BACKENDS, TORCH_DTYPES
from toptagger.cli import positive_int
from toptagger.constants import CHAMPION_URI, GRPC_PORT, HTTP_PORT

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
    _from_env(parser, "--backend", "torch", "execution backend", choices=list(BACKENDS))
    _from_env(
        parser, "--fallback", None, "backend to use when the chosen one has no usable device", choices=list(BACKENDS)
    )
    _from_env(
        parser,
        "--precision",
        "fp32",
        "arithmetic of the backend: fp16/bf16 for torch (the GPU pool), fp16 for an OpenCL package exported so",
        choices=list(TORCH_DTYPES),
    )
    _from_env(parser, "--http-port", HTTP_PORT, "REST port", type=int)
    _from_env(parser, "--grpc-port", GRPC_PORT, "gRPC port (h2c)", type=int)
    _from_env(parser, "--max-batch-size", 16, "most rows merged into one batch", type=positive_int)
    _from_env(parser, "--max-latency-ms", 5, "longest wait for a batch to fill once the device is free", type=float)
    _from_env(
        parser,
        "--max-queue",
        256,
        "requests allowed to wait; beyond it answer 503 / RESOURCE_EXHAUSTED",
        type=positive_int,
    )
    _from_env(parser, "--max-body-mb", 64, "largest REST body accepted", type=float)
    _from_env(parser, "--log-level", "INFO", "DEBUG logs every request")
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
        precision=args.precision,
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
