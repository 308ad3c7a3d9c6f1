"""Triton conformance: SONIC's calls and a battery of bad requests against our server and real Triton.

Both servers run the same model on the same runtime (ONNX Runtime by default): ours
(``python -m serving --backend onnxruntime``) and ``tritonserver`` from the ``nvidia-pytriton``
wheel on a repository written by :mod:`serving.triton.repository`. The same client script
(:mod:`benchmarks.sonic_sequence`, in its own process) asks both; the records must agree on
every field, on the counts in the statistics, on the outputs (within :data:`OUTPUT_TOLERANCE`),
and on the status code of each bad request, except where :data:`DOCUMENTED` says why not.

    python -m benchmarks.conformance --model-uri DIR --markdown docs/benchmarks/serving/conformance.md

Exits 1 when the servers differ anywhere that is not documented (``make test`` runs the same
comparison: tests/serving/triton/test_conformance.py).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import machine, publish
from serving.process import LocalPredictor, free_port, start_local
from serving.triton.process import start_triton
from serving.triton.repository import write_repository
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
}


@dataclass
class Comparison:
    """Where the two records differ."""

    mismatches: list[str] = field(default_factory=list)  # field paths outside the bad-request battery
    max_output_difference: float = 0.0
    battery: list[tuple[str, str, str, str, str]] = field(default_factory=list)  # proto, case, ours, triton, why

    @property
    def undocumented(self) -> list[str]:
        """Bad requests answered differently without a documented reason, and stale documented ones."""
        out = []
        for protocol, case, ours, theirs, why in self.battery:
            if ours != theirs and not why:
                out.append(f"{protocol} '{case}': ours {ours}, Triton {theirs}")
            if ours == theirs and why:
                out.append(f"{protocol} '{case}': documented as different but both answer {ours}")
        return out

    @property
    def conformant(self) -> bool:
        return not self.mismatches and not self.undocumented and self.max_output_difference <= OUTPUT_TOLERANCE


def run_sequence(server: LocalPredictor, channels: int, image_size: int, max_batch_size: int) -> dict[str, Any]:
    """SONIC's sequence and the battery against one server (in a process of its own)."""
    command = [sys.executable, str(SCRIPT), server.url, server.grpc_target, str(channels), str(image_size)]
    result = subprocess.run([*command, str(max_batch_size)], capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"{SCRIPT.name} failed against {server.url}:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout)


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
def both_servers(model_uri: str, backend: str, max_batch_size: int) -> Iterator[tuple[LocalPredictor, LocalPredictor]]:
    """Our predictor and real Triton on the same model and runtime, on free loopback ports."""
    repo_root = str(Path(__file__).resolve().parents[1])
    with ExitStack() as stack:
        repository = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="top-tagger-triton-repo-")))
        write_repository(model_uri, repository, backend, max_batch_size, python_path=repo_root)
        triton = stack.enter_context(start_triton(repository))
        ours = stack.enter_context(
            start_local(
                model_uri,
                http_port=free_port(),
                grpc_port=free_port(),
                backend=backend,
                extra_args=["--max-batch-size", str(max_batch_size)],
                timeout_s=180,
            )
        )
        yield ours, triton


def check(model_uri: str, backend: str = "onnxruntime", max_batch_size: int = 8) -> Comparison:
    """Run the sequence against both servers and compare what they answered."""
    tagger = read_config(fetch_model_dir(model_uri))
    channels, size = tagger.in_channels, tagger.image.image_size
    with both_servers(model_uri, backend, max_batch_size) as (ours, triton):
        return compare(
            run_sequence(ours, channels, size, max_batch_size), run_sequence(triton, channels, size, max_batch_size)
        )


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
    lines += [f"- undocumented: {u}" for u in comparison.undocumented]
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
