"""SONIC's calls and a battery of bad requests against one server; prints what it answered, as JSON.

Run as a separate process, never beside kserve (tritonclient's protos and KServe's register the
same message names). benchmarks/conformance.py runs it against our server
and against a real ``tritonserver`` and compares the two records.

    python benchmarks/sonic_sequence.py HTTP_URL GRPC_TARGET CHANNELS IMAGE_SIZE MAX_BATCH_SIZE [METRICS_URL]

With ``METRICS_URL`` (``http://host:port/metrics``) it scrapes the server's Prometheus metrics at
the start, after SONIC's sequence and after the bad requests.

The order is CMSSW's (HeterogeneousCore/SonicTriton): ``TritonService`` asks for ServerMetadata and
RepositoryIndex at job start; each ``TritonClient`` reads ModelConfig and ModelMetadata, then calls
ModelStatistics before and after its inferences. Every answer is reduced to what both servers
must agree on; differences are the suite's to judge.
"""

from __future__ import annotations

import json
import re
import sys
import time
import urllib.error
import urllib.request
from typing import Any

import grpc
import numpy as np
from google.protobuf.json_format import MessageToDict
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

MODEL = "top-tagger"
N_CONSTITUENTS = 200


def tensors(message: Any) -> list[tuple[str, str, list[int]]]:
    return [(t["name"], t.get("datatype", t.get("data_type")), [int(d) for d in t.get("shape", t.get("dims"))])
            for t in message]  # fmt: skip


class Grpc:
    def __init__(self, target: str) -> None:
        self.stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(target))

    def call(self, method: str, request: Any) -> tuple[str, Any]:
        try:
            return "OK", getattr(self.stub, method)(request, timeout=60)
        except grpc.RpcError as exc:
            return exc.code().name, exc.details()


def infer_request(name: str, array: np.ndarray, model: str = MODEL, version: str = "", shape: Any = None,
                  datatype: str = "FP32", raw: bytes | None = None) -> pb.ModelInferRequest:  # fmt: skip
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    request.inputs.add(name=name, datatype=datatype, shape=list(array.shape if shape is None else shape))
    request.outputs.add(name="probabilities")
    request.raw_input_contents.append(array.tobytes() if raw is None else raw)
    return request


def statistics(client: Grpc) -> dict[str, Any]:
    code, answer = client.call("ModelStatistics", pb.ModelStatisticsRequest(name=MODEL))
    assert code == "OK", answer
    (entry,) = answer.model_stats
    stats = entry.inference_stats
    return {
        "rows": entry.inference_count,
        "executions": entry.execution_count,
        "success": stats.success.count,
        "fail": stats.fail.count,
        "queue": stats.queue.count,
        "compute_infer": stats.compute_infer.count,
        "batch_sizes": {str(b.batch_size): b.compute_infer.count for b in entry.batch_stats},
    }


def delta(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    out = {key: after[key] - before[key] for key in after if key != "batch_sizes"}
    sizes = {size: count - before["batch_sizes"].get(size, 0) for size, count in after["batch_sizes"].items()}
    out["batch_sizes"] = {size: count for size, count in sizes.items() if count}
    return out


def sonic(client: Grpc, channels: int, size: int, images: np.ndarray, jets: np.ndarray) -> dict[str, Any]:
    record: dict[str, Any] = {}
    code, answer = client.call("ServerMetadata", pb.ServerMetadataRequest())
    record["server_metadata"] = {"code": code, "has_name_and_version": bool(answer.name and answer.version)}
    code, answer = client.call("RepositoryIndex", pb.RepositoryIndexRequest())
    record["repository_index"] = {"code": code, "models": [(m.name, m.version, m.state) for m in answer.models]}
    code, answer = client.call("RepositoryIndex", pb.RepositoryIndexRequest(ready=True))
    record["repository_index_ready"] = [(m.name, m.version, m.state) for m in answer.models]
    for version in ("", "1"):
        code, answer = client.call("ModelConfig", pb.ModelConfigRequest(name=MODEL, version=version))
        config = MessageToDict(answer.config, preserving_proto_field_name=True) if code == "OK" else {}
        record[f"config_v{version}"] = {
            "code": code,
            "name": config.get("name"),
            "max_batch_size": config.get("max_batch_size"),
            "inputs": tensors(config.get("input", [])),
            "outputs": tensors(config.get("output", [])),
            "dynamic_batching": "dynamic_batching" in config,
        }
        code, answer = client.call("ModelMetadata", pb.ModelMetadataRequest(name=MODEL, version=version))
        record[f"metadata_v{version}"] = {
            "code": code,
            "name": answer.name,
            "versions": list(answer.versions),
            "inputs": [(t.name, t.datatype, list(t.shape)) for t in answer.inputs],
            "outputs": [(t.name, t.datatype, list(t.shape)) for t in answer.outputs],
        }
    code, _ = client.call("ModelReady", pb.ModelReadyRequest(name=MODEL))
    record["model_ready"] = code
    before = statistics(client)
    outputs = {}
    # One request at a time (as one SONIC module does): each is its own batch on both servers.
    for name, array in (("images", images), ("constituents", jets), ("images", images[:1])):
        for version in ("", "1"):
            code, answer = client.call("ModelInfer", infer_request(name, array, version=version))
            assert code == "OK", f"{name} v{version!r}: {code} {answer}"
            (output,) = answer.outputs
            probabilities = np.frombuffer(answer.raw_output_contents[0], dtype=np.float32).reshape(output.shape)
            outputs[f"{name}[{len(array)}] v{version}"] = {
                "name": output.name,
                "datatype": output.datatype,
                "shape": list(output.shape),
                "values": probabilities.tolist(),
            }
    record["infer"] = outputs
    # Triton counts a request once its response has left, so its statistics can lag the last
    # answer by a moment: read until every request sent is counted (or 10 s have passed).
    deadline = time.monotonic() + 10.0
    while (now := delta(statistics(client), before))["success"] < len(outputs) and time.monotonic() < deadline:
        time.sleep(0.05)
    record["statistics_delta"] = now
    return record


def bad_grpc(client: Grpc, channels: int, size: int, images: np.ndarray, max_batch: int) -> dict[str, str]:
    """Each malformed request's gRPC status code."""
    nan = images.copy()
    nan[0, 0, 0, 0] = np.nan
    jets = np.ones((2, N_CONSTITUENTS, 4), np.float32)
    cases = {
        "unknown model": infer_request("images", images, model="bottom-tagger"),
        "unknown version": infer_request("images", images, version="2"),
        "unknown input": infer_request("pixels", images),
        "FP64 datatype": infer_request("images", images.astype(np.float64), datatype="FP64"),
        "wrong image size": infer_request("images", zeros(2, channels, size - 1)),
        "one channel": infer_request("images", zeros(2, 1, size)),
        "missing batch dimension": infer_request("images", images[0]),
        "batch above max_batch_size": infer_request("images", zeros(max_batch + 1, channels, size)),
        "empty batch": infer_request("images", zeros(0, channels, size)),
        "raw contents too short": infer_request("images", images, raw=images.tobytes()[:-4]),
        "NaN in images": infer_request("images", nan),
        "constituents with 3 columns": infer_request("constituents", jets[:, :, :3]),
        "overflowing momenta": infer_request("constituents", jets * np.float32(1e30)),
    }
    no_input = pb.ModelInferRequest(model_name=MODEL)
    two_inputs = infer_request("images", images)
    two_inputs.inputs.add(name="constituents", datatype="FP32", shape=[2, N_CONSTITUENTS, 4])
    two_inputs.raw_input_contents.append(jets.tobytes())
    cases |= {"no input": no_input, "both inputs": two_inputs}
    answers = {name: client.call("ModelInfer", request)[0] for name, request in cases.items()}
    answers["config of unknown model"] = client.call("ModelConfig", pb.ModelConfigRequest(name="bottom-tagger"))[0]
    answers["statistics of unknown model"] = client.call(
        "ModelStatistics", pb.ModelStatisticsRequest(name="bottom-tagger")
    )[0]
    answers["metadata of unknown model"] = client.call("ModelMetadata", pb.ModelMetadataRequest(name="bottom-tagger"))[
        0
    ]
    return answers


def zeros(rows: int, channels: int, size: int) -> np.ndarray:
    return np.zeros((rows, channels, size, size), np.float32)


def zeros_json(rows: int, channels: int, size: int) -> tuple[list[float], list[int]]:
    return [0.0] * (rows * channels * size * size), [rows, channels, size, size]


def http(url: str, path: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    request = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, None


def http_record(url: str, channels: int, size: int, images: np.ndarray, max_batch: int) -> dict[str, Any]:
    record: dict[str, Any] = {}
    code, index = http(url, "/v2/repository/index", {})
    record["index"] = {"code": code, "models": [(m["name"], m.get("version"), m.get("state")) for m in index or []]}
    code, config = http(url, f"/v2/models/{MODEL}/config")
    config = config or {}
    record["config"] = {"code": code, "max_batch_size": config.get("max_batch_size")}
    record["config"] |= {"inputs": tensors(config.get("input", [])), "outputs": tensors(config.get("output", []))}
    code, stats = http(url, f"/v2/models/{MODEL}/stats")
    record["stats"] = {"code": code, "models": [s["name"] for s in (stats or {}).get("model_stats", [])]}
    code, meta = http(url, f"/v2/models/{MODEL}")
    meta = meta or {}
    record["metadata"] = {"code": code, "versions": meta.get("versions"), "inputs": tensors(meta.get("inputs", []))}

    def infer(name: str, array: Any, shape: list[int], datatype: str = "FP32", model: str = MODEL) -> int:
        body = {"inputs": [{"name": name, "shape": shape, "datatype": datatype, "data": array}]}
        return http(url, f"/v2/models/{model}/infer", body)[0]

    flat = images.ravel().tolist()
    body = {"inputs": [{"name": "images", "shape": list(images.shape), "datatype": "FP32", "data": flat}]}
    code, answer = http(url, f"/v2/models/{MODEL}/infer", body)
    record["infer"] = {"code": code, "values": answer["outputs"][0]["data"] if code == 200 else None}
    record["bad"] = {
        "unknown model": infer("images", flat, list(images.shape), model="bottom-tagger"),
        "unknown input": infer("pixels", flat, list(images.shape)),
        "FP64 datatype": infer("images", flat, list(images.shape), datatype="FP64"),
        "wrong image size": infer("images", *zeros_json(2, channels, size - 1)),
        "batch above max_batch_size": infer("images", *zeros_json(max_batch + 1, channels, size)),
        "data shorter than shape": infer("images", flat[:-1], list(images.shape)),
        "not JSON": http(url, f"/v2/models/{MODEL}/infer", b"{not json")[0],
        "config of unknown model": http(url, "/v2/models/bottom-tagger/config")[0],
        "stats of unknown model": http(url, "/v2/models/bottom-tagger/stats")[0],
        "config of unknown version": http(url, f"/v2/models/{MODEL}/versions/2/config")[0],
        "stats of unknown version": http(url, f"/v2/models/{MODEL}/versions/2/stats")[0],
        "metadata of unknown version": http(url, f"/v2/models/{MODEL}/versions/2")[0],
    }
    return record


SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def scrape(metrics_url: str) -> dict[str, Any]:
    """Every family of a Prometheus text page: {name: {"type", "help", "label_names", "samples"}}, the
    samples keyed by their labels ("model=top-tagger,reason=OTHER,version=1")."""
    with urllib.request.urlopen(metrics_url, timeout=30) as response:
        text = response.read().decode()
    families: dict[str, Any] = {}
    kinds: dict[str, str] = {}
    helps: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            kinds[name] = kind
        elif line.startswith("# HELP "):
            _, _, name, *words = line.split(" ")
            helps[name] = " ".join(words)
        elif line and not line.startswith("#"):
            match = SAMPLE.match(line)
            assert match, f"not a Prometheus sample line: {line!r}"
            name, labels, value = match.groups()
            pairs = dict(LABEL.findall(labels or ""))
            family = families.setdefault(
                name, {"type": kinds.get(name), "help": helps.get(name), "label_names": sorted(pairs), "samples": {}}
            )
            key = ",".join(f"{k}={pairs[k]}" for k in sorted(pairs))
            family["samples"][key] = float(value)
    return families


def main() -> None:
    url, target = sys.argv[1], sys.argv[2]
    channels, size, max_batch = (int(a) for a in sys.argv[3:6])
    metrics_url = sys.argv[6] if len(sys.argv) > 6 else None
    rng = np.random.default_rng(7)
    images = rng.random((3, channels, size, size), dtype=np.float32)
    # Jets with a plausible spread of constituents: E >= |p| so that the masses are real.
    momenta = rng.normal(0.0, 20.0, (2, N_CONSTITUENTS, 3)).astype(np.float32)
    momenta[:, 100:] = 0.0  # zero-padded slots, as in the reference files
    energy = np.linalg.norm(momenta, axis=2, keepdims=True) * np.float32(1.01)
    jets = np.ascontiguousarray(np.concatenate([energy, momenta], axis=2).astype(np.float32))
    client = Grpc(target)
    scraped = {"start": scrape(metrics_url)} if metrics_url else {}
    record: dict[str, Any] = {"grpc": sonic(client, channels, size, images, jets)}
    if metrics_url:
        scraped["after_sonic"] = scrape(metrics_url)
    record["grpc_bad"] = bad_grpc(client, channels, size, images, max_batch)
    record["http"] = http_record(url, channels, size, images, max_batch)
    if metrics_url:
        # Triton counts a request once its response has left: wait until the success count settles.
        deadline, last = time.monotonic() + 10.0, None
        while time.monotonic() < deadline:
            scraped["after_battery"] = scrape(metrics_url)
            now = scraped["after_battery"].get("nv_inference_request_success", {}).get("samples")
            if now == last:
                break
            last = now
            time.sleep(0.2)
        record["metrics"] = scraped
    print(json.dumps(record))


if __name__ == "__main__":
    main()
