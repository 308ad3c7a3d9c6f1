"""The real Triton Python client against the fleet, in a process of its own; prints one JSON answer.

tritonclient.grpc cannot be imported into a process that has imported kserve (both register
``inference.ServerLiveRequest``), and the test session imports kserve, so the fleet tests run
this script.

    python tests/serving/fleet/triton_client.py requests TARGET --clients 16 --count 10 [--compression gzip]
    python tests/serving/fleet/triton_client.py load TARGET --clients 16 --stop-file F
    python tests/serving/fleet/triton_client.py index TARGET [--until empty|listed --timeout S]
    python tests/serving/fleet/triton_client.py stats TARGET
    (each with [--ca FILE] for TLS, [--token JWT] for a bearer token)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient

MODEL = "top-tagger"


def client(args: argparse.Namespace) -> grpcclient.InferenceServerClient:
    if args.ca:
        return grpcclient.InferenceServerClient(args.target, ssl=True, root_certificates=args.ca)
    return grpcclient.InferenceServerClient(args.target)


def headers(args: argparse.Namespace) -> dict[str, str] | None:
    return {"authorization": f"Bearer {args.token}"} if args.token else None


def inputs(args: argparse.Namespace, seed: int) -> list[grpcclient.InferInput]:
    """One batch-1 input of the shape the server declares (so the script fits any tagger)."""
    if args.input_shape:
        name, shape = "images", [int(n) for n in args.input_shape.split(",")]
    else:
        # The tagger takes images or constituents (either one): images, as SONIC's producer sends.
        specs = client(args).get_model_metadata(MODEL, headers=headers(args)).inputs
        spec = next((s for s in specs if s.name == "images"), specs[0])
        name, shape = spec.name, [1 if n < 0 else int(n) for n in spec.shape]
    data = np.random.default_rng(seed).random(shape, dtype=np.float32)
    tensor = grpcclient.InferInput(name, shape, "FP32")
    tensor.set_data_from_numpy(data)
    return [tensor]


def work(args: argparse.Namespace, stop_file: str | None) -> dict[str, Any]:
    """``--clients`` threads, each with its own channel (a SONIC job keeps one connection), sending
    batch-1 requests back to back: ``--count`` each, or until ``stop_file`` exists."""
    request = inputs(args, 0)
    ok: list[int] = [0] * args.clients
    failures: list[str] = []
    outputs: list[list[float]] = []
    lock = threading.Lock()

    def one_client(index: int) -> None:
        channel = client(args)
        sent = 0
        while (stop_file is None and sent < args.count) or (stop_file is not None and not os.path.exists(stop_file)):
            sent += 1
            try:
                answer = channel.infer(
                    MODEL, request, headers=headers(args), compression_algorithm=args.compression, client_timeout=120
                )
                ok[index] += 1
                if index == 0 and sent == 1:
                    outputs.append(answer.as_numpy("probabilities").ravel().tolist())
            except Exception as exc:  # InferenceServerException: status and message
                with lock:
                    failures.append(str(exc))
                if stop_file is None and len(failures) > 50:
                    return

    threads = [threading.Thread(target=one_client, args=(i,)) for i in range(args.clients)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {
        "ok": sum(ok),
        "failures": failures,
        "output": outputs[0] if outputs else None,
        "seconds": time.monotonic() - started,
    }


def index(args: argparse.Namespace) -> dict[str, Any]:
    """The repository index (CMSSW's first call); with ``--until``, polled until it is empty (or
    lists the model) or ``--timeout`` passes."""
    channel = client(args)
    deadline = time.monotonic() + args.timeout
    polls = 0
    while True:
        polls += 1
        try:
            answer = channel.get_model_repository_index(headers=headers(args))
            models, error = [m.name for m in answer.models], None
        except Exception as exc:
            models, error = [], str(exc)
        done = args.until is None or (args.until == "empty") == (not models)
        if done or time.monotonic() > deadline:
            return {"models": models, "error": error, "polls": polls, "reached": done}
        time.sleep(0.2)


def statistics(args: argparse.Namespace) -> dict[str, Any]:
    """ModelStatistics as SonicTriton reads it (verbose mode, and its choice of server on a retry)."""
    (stats,) = client(args).get_inference_statistics(MODEL, headers=headers(args)).model_stats
    return {"success": stats.inference_stats.success.count, "inference_count": stats.inference_count}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["requests", "load", "index", "stats"])
    parser.add_argument("target")
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--stop-file")
    parser.add_argument("--compression", choices=["gzip", "deflate"])
    parser.add_argument("--ca", help="CA certificate (PEM): TLS")
    parser.add_argument("--token")
    parser.add_argument("--input-shape", help="skip ModelMetadata (e.g. when testing authentication)")
    parser.add_argument("--until", choices=["empty", "listed"])
    parser.add_argument("--timeout", type=float, default=0.0)
    args = parser.parse_args()
    stop_file = args.stop_file if args.command == "load" else None
    commands = {"index": index, "stats": statistics}
    print(json.dumps(commands[args.command](args) if args.command in commands else work(args, stop_file)))


if __name__ == "__main__":
    sys.exit(main())
