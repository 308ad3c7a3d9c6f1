"""Triton conformance: SONIC's calls and a battery of bad requests against our server and real Triton.

Both servers run the same model on the same runtime (ONNX Runtime by default): ours
(``python -m serving --backend onnxruntime``) and ``tritonserver`` from the ``nvidia-pytriton``
wheel on a repository written by :mod:`serving.triton.repository`. The same client script
(:mod:`benchmarks.sonic_sequence`, in its own process) asks both; the records must agree on
every field, on the counts in the statistics, on the outputs (within :data:`OUTPUT_TOLERANCE`),
and on the status code of each bad request, except where :data:`DOCUMENTED` says why not.

Two more of SONIC's dependencies are compared on the same two servers:

- Triton's Prometheus metrics (``--metrics-port`` on both): every ``nv_inference_*`` family with
  its type and label names, all at zero at start, the request, row, execution and failure counts
  after SONIC's sequence and after the bad requests, durations above zero and never falling;
- SONIC's versioning check (reference §12): the ``checksum`` agent's parameters of the client's
  local ``config.pbtxt`` against the server's ``ModelConfig``: ``OK`` for the repository's own
  config, ``ModelVersioning`` for the config of the same model with one file changed.

    python -m benchmarks.conformance --model-uri DIR --markdown docs/benchmarks/serving/conformance.md

Exits 1 when the servers differ anywhere that is not documented (``make test`` runs the same
comparison: tests/serving/triton/test_conformance.py).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from google.protobuf import text_format

from benchmarks.common import machine, publish
from serving.process import LocalPredictor, free_port, start_local
from serving.triton import checksum
from serving.triton.metrics import COUNTERS, FAILURE, FAMILIES, PENDING
from serving.triton.process import start_triton
from serving.triton.protos import extensions_pb2, model_config_pb2
from serving.triton.repository import write_repository
from toptagger.constants import MODEL_NAME
from toptagger.model import read_config
from toptagger.model_uri import fetch_model_dir

SCRIPT = Path(__file__).with_name("sonic_sequence.py")
# Both servers run the same graph on the same runtime with the same batch composition (one request
# per batch), so their probabilities agree far closer than this; 1e-5 is the bound.
OUTPUT_TOLERANCE = 1e-5

# (protocol, request) -> why our answer differs from Triton's on purpose.
DOCUMENTED = {
    ("grpc", "one channel"): (
        "we accept [N, 1, S, S] images: the network repeats a single channel itself (serving/contract.py), "
        "as CMSSW producers that send one channel expect; Triton checks dims against config.pbtxt"
    ),
    ("http", "data shorter than shape"): (
        "Triton answers 500 for a body whose data does not fill its shape; it is the client's error, "
        "and this project never answers bad input with a 5xx"
    ),
    ("http", "not JSON"): "Triton answers 500 for a body that is not JSON; a client error is a 4xx here",
    # --- metrics (port 8002) ---
    **{
        ("metrics", f"family {name}"): (
            "node-wide, not per model: a Kubernetes cluster has them from the node exporter and the kubelet"
            if name.startswith("nv_cpu_")
            else "CUDA pinned host memory; this server allocates none"
        )
        for name in (
            "nv_cpu_memory_total_bytes",
            "nv_cpu_memory_used_bytes",
            "nv_cpu_utilization",
            "nv_pinned_memory_pool_total_bytes",
            "nv_pinned_memory_pool_used_bytes",
        )
    },
    **{
        ("metrics", f"{name} after the bad requests"): (
            "validation before the queue: our contract refuses NaN images and overflowing momenta before they are "
            "queued, so they count nowhere; Triton hands them to the Python model, which answers each with an "
            "error inside an execution, and counts them as executed, successful requests (+2 requests, +5 rows, "
            "+2 executions), and one more malformed request as a BACKEND failure; the 'one channel' request "
            "succeeds here only (+1 request, +2 rows, +1 execution)"
        )
        for name in (
            "nv_inference_request_success",
            "nv_inference_count",
            "nv_inference_exec_count",
            "nv_inference_request_failure",
        )
    },
}


@dataclass
class Comparison:
    """Where the two records differ."""

    mismatches: list[str] = field(default_factory=list)  # field paths outside the bad-request battery
    max_output_difference: float = 0.0
    battery: list[tuple[str, str, str, str, str]] = field(default_factory=list)  # proto, case, ours, triton, why
    metrics: list[tuple[str, str, str, str, str]] = field(default_factory=list)  # "metrics", check, ours, triton, why
    versioning: dict[str, dict[str, str]] = field(default_factory=dict)  # server -> case -> SONIC's verdict

    @property
    def undocumented(self) -> list[str]:
        """Bad requests answered differently without a documented reason, and stale documented ones."""
        out = []
        for protocol, case, ours, theirs, why in self.battery + self.metrics:
            if ours != theirs and not why:
                out.append(f"{protocol} '{case}': ours {ours}, Triton {theirs}")
            if ours == theirs and why:
                out.append(f"{protocol} '{case}': documented as different but both answer {ours}")
        return out

    @property
    def conformant(self) -> bool:
        return not self.mismatches and not self.undocumented and self.max_output_difference <= OUTPUT_TOLERANCE


@dataclass
class Peer:
    """A running server and where its Prometheus metrics are."""

    server: LocalPredictor
    metrics_url: str


def run_sequence(peer: Peer, channels: int, image_size: int, max_batch_size: int) -> dict[str, Any]:
    """SONIC's sequence and the battery against one server (in a process of its own)."""
    server = peer.server
    command = [sys.executable, str(SCRIPT), server.url, server.grpc_target, str(channels), str(image_size)]
    command += [str(max_batch_size), peer.metrics_url]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"{SCRIPT.name} failed against {server.url}:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout)


def sonic_versioning(peer: Peer, local_config: Path) -> str:
    """SONIC's versioning check against one server: ``OK`` or ``ModelVersioning: ...``.

    As ``TritonClient`` does it: the ``checksum`` agent's parameters of the client's local
    ``config.pbtxt`` against those of the server's ``ModelConfig``.
    """
    local = text_format.Parse(local_config.read_text(), model_config_pb2.ModelConfig())
    with grpc.insecure_channel(peer.server.grpc_target) as channel:
        call = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelConfig",
            request_serializer=extensions_pb2.ModelConfigRequest.SerializeToString,
            response_deserializer=extensions_pb2.ModelConfigResponse.FromString,
        )
        served = call(extensions_pb2.ModelConfigRequest(name=MODEL_NAME), timeout=60).config
    mine, theirs = _checksums(local), _checksums(served)
    if mine == theirs:
        return "OK"
    differ = sorted(key for key in set(mine) | set(theirs) if mine.get(key) != theirs.get(key))
    return f"ModelVersioning ({', '.join(differ)} differ)"


def _checksums(config: Any) -> dict[str, str]:
    agents = [agent for agent in config.model_repository_agents.agents if agent.name == checksum.AGENT]
    return {key: value for agent in agents for key, value in agent.parameters.items()}


def changed_model_config(model_uri: str, folder: Path, backend: str, max_batch_size: int) -> Path:
    """The ``config.pbtxt`` of the same model with one file changed (a client built for another version)."""
    model = folder / "model"
    shutil.copytree(fetch_model_dir(model_uri), model)
    config = model / "tagger.json"
    config.write_text(config.read_text() + "\n")  # same model, other bytes
    write_repository(str(model), folder / "repository", backend, max_batch_size)
    return folder / "repository" / MODEL_NAME / "config.pbtxt"


def compare_metrics(ours: dict[str, Any], triton: dict[str, Any], comparison: Comparison) -> None:
    """Rows of (check, ours, Triton): families, zero at start, counts, durations, pending."""
    rows = comparison.metrics

    def row(check: str, mine: object, theirs: object) -> None:
        rows.append(("metrics", check, str(mine), str(theirs), DOCUMENTED.get(("metrics", check), "")))

    def shape(family: dict[str, Any] | None) -> str:
        return "absent" if family is None else f"{family['type']} [{', '.join(family['label_names'])}]"

    start = (ours["start"], triton["start"])
    for name in sorted(set(start[0]) | set(start[1])):
        row(f"family {name}", shape(start[0].get(name)), shape(start[1].get(name)))
    for name in FAMILIES:
        row(f"{name} at start", *(_values(scraped.get(name)) for scraped in start))
    counted = ("nv_inference_request_success", "nv_inference_count", "nv_inference_exec_count", FAILURE, PENDING)
    for when, key in (("after SONIC's sequence", "after_sonic"), ("after the bad requests", "after_battery")):
        for name in counted:
            row(f"{name} {when}", *(_values(scrapes[key].get(name)) for scrapes in (ours, triton)))
    for name in (name for name in COUNTERS if name.endswith("_duration_us")):
        row(f"{name} grows", *(_growth(scrapes, name) for scrapes in (ours, triton)))


def _values(family: dict[str, Any] | None) -> str:
    if family is None:
        return "absent"
    return "; ".join(f"{labels}: {value:g}" for labels, value in sorted(family["samples"].items()))


def _growth(scrapes: dict[str, Any], name: str) -> str:
    """``0 < ...`` when the duration starts at 0, rises over SONIC's calls and never falls."""
    values = [sum(scrapes[key].get(name, {}).get("samples", {None: -1.0}).values()) for key in _SCRAPES]
    start, after_sonic, after_battery = values
    return "0, rises, never falls" if start == 0 < after_sonic <= after_battery else f"{values}"


_SCRAPES = ("start", "after_sonic", "after_battery")


def compare(ours: dict[str, Any], triton: dict[str, Any]) -> Comparison:
    comparison = Comparison()
    _walk(ours["grpc"], triton["grpc"], "grpc", comparison)
    _walk(_without_battery(ours["http"]), _without_battery(triton["http"]), "http", comparison)
    for protocol, mine, theirs in (
        ("grpc", ours["grpc_bad"], triton["grpc_bad"]),
        ("http", ours["http"]["bad"], triton["http"]["bad"]),
    ):
        for case in sorted(set(mine) | set(theirs)):
            why = DOCUMENTED.get((protocol, case), "")
            comparison.battery.append((protocol, case, str(mine.get(case)), str(theirs.get(case)), why))
    compare_metrics(ours["metrics"], triton["metrics"], comparison)
    return comparison


def _without_battery(record: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in record.items() if key != "bad"}


def _walk(ours: Any, theirs: Any, path: str, comparison: Comparison) -> None:
    if isinstance(ours, dict) and isinstance(theirs, dict):
        for key in sorted(set(ours) | set(theirs)):
            _walk(ours.get(key), theirs.get(key), f"{path}/{key}", comparison)
    elif path.endswith("/values") and ours is not None and theirs is not None:
        mine, other = np.asarray(ours, dtype=np.float64), np.asarray(theirs, dtype=np.float64)
        if mine.shape != other.shape:
            comparison.mismatches.append(f"{path}: shape {list(mine.shape)} vs Triton's {list(other.shape)}")
        else:
            difference = float(np.abs(mine - other).max(initial=0.0))
            comparison.max_output_difference = max(comparison.max_output_difference, difference)
    elif ours != theirs:
        comparison.mismatches.append(f"{path}: ours {ours!r}, Triton {theirs!r}")


@contextmanager
def both_servers(model_uri: str, backend: str, max_batch_size: int) -> Iterator[tuple[Peer, Peer, Path]]:
    """Our predictor and real Triton on the same model and runtime, on free loopback ports, with
    their metrics on; and the repository Triton serves (its config.pbtxt is a SONIC client's)."""
    repo_root = str(Path(__file__).resolve().parents[1])
    with ExitStack() as stack:
        repository = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="top-tagger-triton-repo-")))
        write_repository(model_uri, repository, backend, max_batch_size, python_path=repo_root)
        triton_metrics, our_metrics = free_port(), free_port()
        triton = stack.enter_context(start_triton(repository, metrics_port=triton_metrics))
        ours = stack.enter_context(
            start_local(
                model_uri,
                http_port=free_port(),
                grpc_port=free_port(),
                backend=backend,
                extra_args=["--max-batch-size", str(max_batch_size), "--metrics-port", str(our_metrics)],
                timeout_s=180,
            )
        )
        metrics = "http://127.0.0.1:{}/metrics"
        yield Peer(ours, metrics.format(our_metrics)), Peer(triton, metrics.format(triton_metrics)), repository


def check(model_uri: str, backend: str = "onnxruntime", max_batch_size: int = 8) -> Comparison:
    """Run the sequence against both servers and compare what they answered."""
    tagger = read_config(fetch_model_dir(model_uri))
    channels, size = tagger.in_channels, tagger.image.image_size
    with (
        both_servers(model_uri, backend, max_batch_size) as (ours, triton, repository),
        tempfile.TemporaryDirectory(prefix="top-tagger-changed-") as changed,
    ):
        comparison = compare(
            run_sequence(ours, channels, size, max_batch_size), run_sequence(triton, channels, size, max_batch_size)
        )
        configs = {
            "same model": repository / MODEL_NAME / "config.pbtxt",
            "a model file changed": changed_model_config(model_uri, Path(changed), backend, max_batch_size),
        }
        for name, peer in (("ours", ours), ("triton", triton)):
            comparison.versioning[name] = {case: sonic_versioning(peer, config) for case, config in configs.items()}
        _check_versioning(comparison)
        return comparison


def _check_versioning(comparison: Comparison) -> None:
    """SONIC accepts the same model and refuses a changed one, on both servers alike."""
    for server, verdicts in comparison.versioning.items():
        if verdicts.get("same model") != "OK":
            comparison.mismatches.append(f"versioning/{server}: same model answered {verdicts.get('same model')}")
        if not verdicts.get("a model file changed", "").startswith("ModelVersioning"):
            comparison.mismatches.append(f"versioning/{server}: a changed model file passed SONIC's check")


def markdown(comparison: Comparison, backend: str) -> str:
    verdict = "conformant" if comparison.conformant else "NOT conformant"
    lines = [
        "# Triton conformance: our server next to real Triton",
        "",
        f"Machine: {machine()}. Both servers on the same model, runtime `{backend}` "
        "(Triton: `tritonserver` 2.51 from `nvidia-pytriton` 0.7.0, Python backend, "
        "`serving.triton.repository`). Command: `python -m benchmarks.conformance`.",
        "",
        f"**{verdict}**: {len(comparison.mismatches)} field(s) differ in SONIC's sequence; largest output "
        f"difference {comparison.max_output_difference:.1e} (bound {OUTPUT_TOLERANCE:.0e}).",
        "",
    ]
    lines += [f"- differs: {m}" for m in comparison.mismatches]
    lines += ["", "## Bad requests", "", "| protocol | request | ours | Triton | why they differ |"]
    lines.append("|---|---|---|---|---|")
    for protocol, case, ours, theirs, why in comparison.battery:
        lines.append(f"| {protocol} | {case} | {ours} | {theirs} | {why if ours != theirs else ''} |")
    lines += [
        "",
        "## Metrics (`--metrics-port`, Triton's port 8002)",
        "",
        "| check | ours | Triton | why they differ |",
    ]
    lines.append("|---|---|---|---|")
    for _, check, ours, theirs, why in comparison.metrics:
        lines.append(f"| {check} | {ours} | {theirs} | {why if ours != theirs else ''} |")
    lines += [
        "",
        "## SONIC's versioning check (checksum agent, reference §12)",
        "",
        "| local config.pbtxt | ours | Triton |",
    ]
    lines.append("|---|---|---|")
    for case in comparison.versioning.get("ours", {}):
        verdicts = [comparison.versioning.get(server, {}).get(case, "") for server in ("ours", "triton")]
        lines.append(f"| {case} | {verdicts[0]} | {verdicts[1]} |")
    lines += [""] + [f"- undocumented: {u}" for u in comparison.undocumented]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.conformance", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-uri", required=True, help="a model folder with model.onnx, or a models:/ URI")
    parser.add_argument("--backend", default="onnxruntime", help="the runtime both servers use")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--markdown", default=None, help="write the report here (default: print it)")
    args = parser.parse_args(argv)
    comparison = check(args.model_uri, args.backend, args.max_batch_size)
    publish(markdown(comparison, args.backend), args.markdown)
    return 0 if comparison.conformant else 1


if __name__ == "__main__":
    from toptagger.cli import run_cli

    sys.exit(run_cli(main))
