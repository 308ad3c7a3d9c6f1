"""Asynchronous client for the top-tagger service, in the style of CMSSW's SONIC.

SONIC's ExternalWork pattern sends a request in ``acquire()`` and reads the answer in
``produce()``, so a CPU thread never blocks on the network. :class:`TaggerClient` is the asyncio
equivalent: many requests in flight from one thread, each with its own deadline, retried with
backoff while the server is UNAVAILABLE (restarting, overloaded), and optionally answered
in-process when the server stays down — as SONIC can fall back to a local server.

    python -m serving.client --url grpc://127.0.0.1:8081 --jets jets.h5 --out scores.csv
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import random
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from toptagger.cli import positive_int, run_cli
from toptagger.constants import MODEL_NAME
from toptagger.errors import ConfigError, TaggerError
from toptagger.signature import PROBABILITIES


class InferenceFailed(TaggerError):
    """The service did not answer within the deadline, refused the request, or answered wrongly."""


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 4
    backoff_s: float = 0.05  # doubled after each try, with jitter
    max_backoff_s: float = 1.0


class _Transport:
    async def infer(self, name: str, array: np.ndarray, request_id: str, timeout: float) -> np.ndarray:
        raise NotImplementedError

    async def close(self) -> None:
        pass


class _Retryable(Exception):
    """A failure worth another try: the server is unreachable, restarting or overloaded."""


class _GrpcTransport(_Transport):
    def __init__(self, target: str, model: str) -> None:
        import grpc
        from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
        from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc

        self._grpc, self._pb, self.model = grpc, pb, model
        self._channel = grpc.aio.insecure_channel(
            target,
            options=[("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 256 << 20)],
        )
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)

    async def infer(self, name: str, array: np.ndarray, request_id: str, timeout: float) -> np.ndarray:
        pb, grpc = self._pb, self._grpc
        request = pb.ModelInferRequest(model_name=self.model, id=request_id)
        request.inputs.add(name=name, datatype="FP32", shape=list(array.shape))
        request.raw_input_contents.append(np.ascontiguousarray(array, dtype=np.float32).tobytes())
        try:
            response = await self._stub.ModelInfer(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED):
                raise _Retryable(f"{exc.code().name}: {exc.details()}") from None
            raise InferenceFailed(f"{exc.code().name}: {exc.details()}") from None
        if response.id != request_id:
            raise InferenceFailed(f"answer for request {response.id!r} arrived for {request_id!r}")
        output = response.outputs[0]
        return np.frombuffer(response.raw_output_contents[0], dtype=np.float32).reshape(list(output.shape))

    async def close(self) -> None:
        await self._channel.close()


class _RestTransport(_Transport):
    """v2 REST with the binary tensor extension: a JSON header followed by raw tensor bytes."""

    def __init__(self, base_url: str, model: str) -> None:
        import httpx

        self._httpx = httpx
        self._client = httpx.AsyncClient(base_url=base_url, limits=httpx.Limits(max_connections=256))
        self.path = f"/v2/models/{model}/infer"

    async def infer(self, name: str, array: np.ndarray, request_id: str, timeout: float) -> np.ndarray:
        data = np.ascontiguousarray(array, dtype=np.float32).tobytes()
        header = json.dumps(
            {
                "id": request_id,
                "inputs": [
                    {
                        "name": name,
                        "datatype": "FP32",
                        "shape": list(array.shape),
                        "parameters": {"binary_data_size": len(data)},
                    }
                ],
                "outputs": [{"name": PROBABILITIES, "parameters": {"binary_data": True}}],
            }
        ).encode()
        try:
            response = await self._client.post(
                self.path,
                content=header + data,
                headers={
                    "Inference-Header-Content-Length": str(len(header)),
                    "Content-Type": "application/octet-stream",
                },
                timeout=timeout,
            )
        except (self._httpx.ConnectError, self._httpx.RemoteProtocolError, self._httpx.ReadError) as exc:
            raise _Retryable(f"connection failed: {exc}") from None
        except self._httpx.TimeoutException:
            raise InferenceFailed(f"no answer within {timeout:.3f} s") from None
        if response.status_code == 503:
            raise _Retryable(f"503: {response.text}")
        if response.status_code != 200:
            raise InferenceFailed(f"HTTP {response.status_code}: {response.text}")
        return _decode_rest(response, request_id)

    async def close(self) -> None:
        await self._client.aclose()


def _decode_rest(response: Any, request_id: str) -> np.ndarray:
    body = response.content
    header_length = response.headers.get("inference-header-content-length")
    header = json.loads(body[: int(header_length)] if header_length else body)
    if header.get("id") != request_id:
        raise InferenceFailed(f"answer for request {header.get('id')!r} arrived for {request_id!r}")
    output = header["outputs"][0]
    if header_length:
        size = output["parameters"]["binary_data_size"]
        raw = body[int(header_length) : int(header_length) + size]
        return np.frombuffer(raw, dtype=np.float32).reshape(output["shape"])
    return np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])


class TaggerClient:
    """Send images or constituents; get (qcd, top) probabilities back.

    ``url`` is ``grpc://host:port`` or ``http://host:port``. ``fallback``, if given, is called with
    (input name, array) when the service stays unreachable; it must return the probabilities.
    """

    def __init__(
        self,
        url: str,
        deadline_s: float = 30.0,
        retry: RetryPolicy | None = None,
        fallback: Callable[[str, np.ndarray], np.ndarray] | None = None,
        model: str = MODEL_NAME,
    ) -> None:
        if url.startswith("grpc://"):
            self.transport: _Transport = _GrpcTransport(url.removeprefix("grpc://"), model)
            self.protocol = "grpc"
        elif url.startswith(("http://", "https://")):
            self.transport = _RestTransport(url, model)
            self.protocol = "rest"
        else:
            raise ConfigError(f"{url!r}: the URL must start with grpc://, http:// or https://")
        if deadline_s <= 0:
            raise ConfigError(f"the deadline must be > 0 s, got {deadline_s}")
        self.deadline_s = deadline_s
        self.retry = retry or RetryPolicy()
        self.fallback = fallback
        self.fallbacks = 0  # how many requests were answered in-process

    async def infer(self, images: np.ndarray | None = None, constituents: np.ndarray | None = None) -> np.ndarray:
        if (images is None) == (constituents is None):
            raise ConfigError("pass exactly one of images or constituents")
        name, array = ("images", images) if images is not None else ("constituents", constituents)
        assert array is not None
        request_id = uuid.uuid4().hex
        deadline = time.monotonic() + self.deadline_s
        backoff = self.retry.backoff_s
        last = "no attempt made"
        for _ in range(self.retry.attempts):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                return await self.transport.infer(name, array, request_id, remaining)
            except _Retryable as exc:
                last = str(exc)
            pause = min(backoff * (1 + random.random()), self.retry.max_backoff_s, max(deadline - time.monotonic(), 0))
            await asyncio.sleep(pause)
            backoff *= 2
        if self.fallback is not None:
            self.fallbacks += 1
            return await asyncio.get_running_loop().run_in_executor(None, self.fallback, name, array)
        raise InferenceFailed(f"{self.protocol} request {request_id} failed: {last}")

    async def close(self) -> None:
        await self.transport.close()

    async def __aenter__(self) -> TaggerClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def local_fallback(model_uri: str) -> Callable[[str, np.ndarray], np.ndarray]:
    """In-process inference with the same backend code the server uses."""
    from serving.backends import load_backend

    backend = load_backend(model_uri, "torch")

    def run(name: str, array: np.ndarray) -> np.ndarray:
        images = backend.render(array) if name == "constituents" else array
        return backend.predict(images)

    return run


async def score_file(
    url: str, jets: str, out: Path, batch_size: int, concurrency: int, fallback_uri: str | None
) -> int:
    from toptagger.jets.dataset import iter_jets

    fallback = local_fallback(fallback_uri) if fallback_uri else None
    rows: list[tuple[int, int, float]] = []
    async with TaggerClient(url, fallback=fallback) as client:
        limit = asyncio.Semaphore(concurrency)

        async def one(first: int, constituents: np.ndarray, labels: np.ndarray) -> None:
            async with limit:
                probabilities = await client.infer(constituents=constituents)
            rows.extend(
                zip(range(first, first + len(labels)), labels.tolist(), probabilities[:, 1].tolist(), strict=True)
            )

        offset = 0
        tasks = []
        for batch in iter_jets(jets):
            for start in range(0, len(batch), batch_size):
                part = batch[start : start + batch_size]
                tasks.append(asyncio.create_task(one(offset + start, part.constituents, part.labels)))
            offset += len(batch)
            await asyncio.gather(*tasks)
            tasks.clear()
    rows.sort()
    tmp = out.with_name(f".{out.name}.part")
    with tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["jet", "label", "top_probability"])
        writer.writerows(rows)
    tmp.replace(out)
    return len(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.client", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="grpc://host:8081 or http://host:8080")
    parser.add_argument("--jets", required=True, help="reference-format .h5 file or s3:// URI to score")
    parser.add_argument("--out", type=Path, default=Path("scores.csv"), help="CSV of jet index, label, top probability")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="jets per request")
    parser.add_argument("--concurrency", type=positive_int, default=8, help="requests in flight")
    parser.add_argument("--fallback-model", help="model URI for in-process inference if the server is down")
    args = parser.parse_args(argv)
    n = asyncio.run(score_file(args.url, args.jets, args.out, args.batch_size, args.concurrency, args.fallback_model))
    print(f"scored {n} jets -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
