"""Our server next to the real peers, one run, same model: the table with the peers as columns.

    python -m benchmarks.serving --peers --model-uri models:/top-tagger@champion [--seconds 6]

Columns: each runtime in-process (torch, ONNX Runtime, OpenVINO) at batch 1 and 16; our server on
torch and on the fastest runtime (the best in-process batch-16 rate, measured here, not assumed);
stock KServe (a plain ``kserve.Model``, no batching) on that runtime; real Triton
(``tritonserver`` 2.51) running that runtime in its Python backend with its dynamic batcher, at
its usual 2 ms queue delay and at our server's batching wait, the better one counting.
Every server gets batch-1 gRPC image requests from closed-loop clients (as CMSSW streams send):
16 clients for throughput, one client for latency.

Reduced precision (issue 20): OpenVINO and ONNX Runtime in-process at int8 and bf16 too, each
opened as serving opens it (``serving.backends.load_backend`` with ``precision``). A precision
the version did not admit, that the CPU has no units for (int8 without VNNI/AMX, bf16 without
AVX512-BF16/AMX) or that the runtime cannot run (ONNX Runtime's CPU provider has no bf16
kernels) is not measured: its cell says why. The fastest admitted graph (runtime and precision,
by the in-process batch-16 rate, fp32 included) is then served by ours, stock KServe and Triton
alike, beside ours on OpenVINO fp32. The CPU's model and ISA flags are in the JSON (``cpu``) and
the table, and the targets that depend on them (AMX or not) are chosen from them.

These 2 shared cores drift by ±20 % within minutes, more than the differences measured. So every
server runs for the whole benchmark (idle ones cost nothing), and the measurements go in rounds,
each round every runtime and server once, one after another; each cell is the median over the
rounds, and the ratios are of medians, so that a slow minute hits every column alike.

Targets (issue 12): ours on the fastest runtime, 16 clients, ≥ 1.6× ours on torch, ≥ 0.85× the
runtime's in-process batch-16 rate, ≥ 1.0× Triton on the same runtime, ≥ 3× stock KServe;
batch-1 p50 at one client ≤ 0.35× ours on torch.

Targets (issue 20): in-process at batch 16, the admitted int8 graph ≥ 2× the same runtime's fp32
on a CPU with VNNI and no AMX, ≥ 4.5× with AMX; OpenVINO bf16 ≥ 2.5× fp32 with AMX. Ours on the
fastest admitted graph, 16 clients, ≥ 3× ours on OpenVINO fp32 with AMX (≥ 2× elsewhere) and
≥ 0.85× that graph's in-process batch-16 rate. Ours against Triton and stock KServe on that graph
is held to issue 12's ≥ 1.0× and ≥ 3×.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.common import machine, machine_info, publish
from benchmarks.measure import bounded_ratio, closed_loop, percentiles, running_server, sample_inputs, timed_calls
from serving.backends import load_backend
from serving.precision import refusal
from serving.triton.process import start_triton
from serving.triton.repository import write_repository
from toptagger.images import three_channels
from toptagger.model_uri import fetch_model_dir
from toptagger.precision.cpu import cpu_flags, has_units
from toptagger.precision.files import PRECISIONS, key, read_admission
from toptagger.storage import atomic_output

RUNTIMES = ("torch", "onnxruntime", "openvino")  # in float32: issue 12's columns
# The reduced-precision columns, (runtime, precision), each runtime's bf16 and int8 graphs.
REDUCED = (("openvino", "bf16"), ("openvino", "int8"), ("onnxruntime", "bf16"), ("onnxruntime", "int8"))
TRITON_DELAY_US = 2000  # Triton's dynamic batcher as its users usually set it (reference §2)
CLIENTS = 16
ROUNDS = 3
AMX_FLAGS = ("amx_int8", "amx_bf16")
UNITS = {"int8": "VNNI/AMX", "bf16": "AVX512-BF16/AMX"}


def column(runtime: str, precision: str = "fp32") -> str:
    """A graph's name in the table and the JSON: ``openvino`` at fp32 (issue 12's names), else ``openvino/int8``."""
    return runtime if precision == "fp32" else key(runtime, precision)


def why_not(model_dir: Path, runtime: str, precision: str) -> str | None:
    """Why ``runtime`` at ``precision`` is not measured here, in a table cell's words; None when it is.

    :func:`serving.precision.refusal` decides (what serving refuses is what is not measured); this
    only says it shortly, the CPU first (a fact of the machine, whatever the version admits).
    """
    reason = refusal(model_dir, runtime, precision)
    if reason is None:
        return None
    if precision not in PRECISIONS[runtime]:
        return f"not run: {runtime} has no {precision} kernels"
    if not has_units(precision):
        return f"no {precision} units ({UNITS[precision]})"
    decision = (read_admission(model_dir) or {"precisions": {}})["precisions"].get(key(runtime, precision))
    if decision and not decision.get("admitted"):
        return f"not admitted: {decision.get('reason', 'not measured')}"
    return reason  # not carried, or no admission record: serving's own words


def units() -> dict[str, bool]:
    """Which targets apply: int8 and bf16 units (as serving's ``auto`` decides), and AMX."""
    return {"int8": has_units("int8"), "bf16": has_units("bf16"), "amx": any(f in cpu_flags() for f in AMX_FLAGS)}


def best_graph(rates: dict[str, dict[int, list[float]]], measured: tuple[tuple[str, str], ...]) -> tuple[str, str]:
    """The fastest admitted (runtime, precision) in-process at batch :data:`CLIENTS`, the float32 graphs included.

    Torch is no candidate: the precisions are those of the exported graphs, which all three servers run.
    """
    candidates = [(runtime, "fp32") for runtime in RUNTIMES if runtime != "torch"] + list(measured)
    return max(candidates, key=lambda graph: statistics.median(_rate(rates[column(*graph)], CLIENTS)))


@dataclass
class Served:
    """One server's measurements, one entry per round."""

    label: str
    rows_per_s: list[float] = field(default_factory=list)  # CLIENTS batch-1 clients
    p50_ms: list[float] = field(default_factory=list)  # CLIENTS clients
    single_rows_per_s: list[float] = field(default_factory=list)  # one client
    single_p50_ms: list[float] = field(default_factory=list)
    errors: int = 0

    def measure(self, grpc_url: str, image: np.ndarray, seconds: float) -> None:
        many = asyncio.run(closed_loop(grpc_url, CLIENTS, image, "images", seconds))
        one = asyncio.run(closed_loop(grpc_url, 1, image, "images", seconds))
        self.rows_per_s.append(many.rows_per_s)
        self.p50_ms.append(percentiles(many.latencies)[0])
        self.single_rows_per_s.append(one.rows_per_s)
        self.single_p50_ms.append(percentiles(one.latencies)[0])
        self.errors += many.errors + one.errors


def in_process(
    model_uri: str, images: np.ndarray, seconds: float, rounds: int, reduced: tuple[tuple[str, str], ...] = ()
) -> dict[str, dict[int, list[float]]]:
    """Each graph's own rate (jets/s) at batch 1 and at batch :data:`CLIENTS`, one entry per round.

    Keyed by :func:`column`: every runtime of :data:`RUNTIMES` in float32, and each (runtime,
    precision) of ``reduced`` (admitted ones only: serving's backends refuse the others).
    """
    graphs = [(runtime, "fp32") for runtime in RUNTIMES] + list(reduced)
    backends = {column(r, p): load_backend(model_uri, r, precision=p) for r, p in graphs}
    inputs = {batch: np.ascontiguousarray(np.resize(images, (batch, *images.shape[1:]))) for batch in (1, CLIENTS)}
    rates: dict[str, dict[int, list[float]]] = {name: {batch: [] for batch in inputs} for name in backends}
    for _ in range(rounds):
        for name, backend in backends.items():
            for batch, x in inputs.items():
                rates[name][batch].append(batch / float(np.mean(timed_calls(backend, x, seconds))))
    return rates


@contextlib.contextmanager
def triton(
    model_uri: str, runtime: str, delay_us: int, max_batch_size: int, precision: str = "fp32"
) -> Iterator[dict[str, str]]:
    """Real Triton on a repository written for ``runtime`` at ``precision``; yields ``{"grpc": url}``."""
    repo_root = str(Path(__file__).resolve().parents[1])
    with tempfile.TemporaryDirectory(prefix="top-tagger-triton-repo-") as repository:
        write_repository(
            model_uri, repository, runtime, max_batch_size, delay_us, python_path=repo_root,
            precision=None if precision == "fp32" else precision,  # fp32: the repository issue 12 measured
        )  # fmt: skip
        with start_triton(repository) as server:
            yield {"grpc": server.grpc_url}


def servers(
    model_uri: str, fastest: str, max_batch_size: int, max_latency_ms: float, best: tuple[str, str] | None = None
) -> list[tuple[str, Callable]]:
    """(label, context manager yielding URLs) for every served column, each label once.

    ``fastest``: the fastest float32 runtime (issue 12's columns); ``best``: the fastest admitted
    (runtime, precision), served by ours, stock KServe and Triton, beside ours on OpenVINO fp32.
    """
    ours = ["--max-batch-size", str(max_batch_size), "--max-latency-ms", str(max_latency_ms)]
    wait_us = round(max_latency_ms * 1000)

    def graph(runtime: str, precision: str) -> list[tuple[str, Callable]]:
        name = column(runtime, precision)
        # fp32 runs as issue 12 ran it (no --precision: every backend's default is fp32 there).
        chosen = [] if precision == "fp32" else ["--precision", precision]
        return [
            (f"ours, {name}",
             lambda: running_server("serving", model_uri, [*ours, "--backend", runtime, *chosen])),
            (f"stock KServe, {name}",
             lambda: running_server("benchmarks.stock_kserve", model_uri, ["--backend", runtime, *chosen])),
            (f"Triton, {name}, {TRITON_DELAY_US} µs",
             lambda: triton(model_uri, runtime, TRITON_DELAY_US, max_batch_size, precision)),
            (f"Triton, {name}, {wait_us} µs",
             lambda: triton(model_uri, runtime, wait_us, max_batch_size, precision)),
        ]  # fmt: skip

    plan = [("ours, torch", lambda: running_server("serving", model_uri, [*ours, "--backend", "torch"]))]
    plan += graph(fastest, "fp32")
    if best is not None:
        # Ours on the best graph beside ours on OpenVINO fp32 (issue 20's reference), then the peers on it.
        plan += graph(*best)[:1]
        plan.append(("ours, openvino", lambda: running_server("serving", model_uri, [*ours, "--backend", "openvino"])))
        plan += graph(*best)[1:]
    unique: dict[str, Callable] = {}
    for label, start in plan:  # the best graph may be the fastest fp32 runtime's: one server each
        unique.setdefault(label, start)
    return list(unique.items())


def run(
    model_uri: str, seconds: float, max_batch_size: int, max_latency_ms: float, out: Path | None, rounds: int = ROUNDS
) -> dict:
    from tqdm import tqdm

    reference = load_backend(model_uri, "torch")
    _, images = sample_inputs(reference)
    channels = reference.channels
    del reference
    model_dir = fetch_model_dir(model_uri)
    not_run = {column(r, p): why for r, p in REDUCED if (why := why_not(model_dir, r, p))}
    measured = tuple((r, p) for r, p in REDUCED if column(r, p) not in not_run)
    rates = in_process(model_uri, images, seconds, rounds, measured)
    fastest = max(RUNTIMES, key=lambda r: statistics.median(rates[r][CLIENTS]))
    best = best_graph(rates, measured)
    # The model's channels (three for the champion, as CMSSW's producer sends them and as Triton's
    # config declares them; one for a small test model, which refuses three).
    image = np.ascontiguousarray(three_channels(images[:1]) if channels == 3 else images[:1])
    plan = servers(model_uri, fastest, max_batch_size, max_latency_ms, best)
    served = [Served(label) for label, _ in plan]
    with contextlib.ExitStack() as running:
        starting = tqdm(plan, desc="starting servers", unit="server")
        urls = [running.enter_context(start())["grpc"] for _, start in starting]
        with tqdm(total=rounds * len(plan), desc="measuring (rounds x servers)", unit="server") as progress:
            for _ in range(rounds):
                for served_column, url in zip(served, urls, strict=True):
                    served_column.measure(url, image, seconds)
                    progress.update()
    result = {"machine": machine(), "cpu": machine_info(), "units": units(), "model_uri": model_uri,
              "fastest": fastest, "best": column(*best), "in_process": rates, "not_run": not_run,
              "served": [asdict(s) for s in served], "seconds": seconds, "rounds": rounds,
              "max_latency_ms": max_latency_ms}  # fmt: skip
    if out:  # the measurements first: a table that cannot be rendered must not lose them
        out.mkdir(parents=True, exist_ok=True)
        with atomic_output(out / "peers.json") as path:
            path.write_text(json.dumps(result, indent=2) + "\n")
    publish(markdown(result), out / "peers.md" if out else None)
    return result


def markdown(result: dict) -> str:
    """The table (medians over the rounds, the slowest and fastest round beside throughputs) and the ratios."""
    rates, fastest, rounds = result["in_process"], result["fastest"], result.get("rounds", 1)
    not_run: dict[str, str] = result.get("not_run", {})  # absent from a result of before issue 20
    served = {s["label"]: s for s in result["served"]}
    ours, torch_server = _medians(served[f"ours, {fastest}"]), _medians(served["ours, torch"])
    stock = _medians(served[f"stock KServe, {fastest}"])
    tritons = _tritons(served, fastest)
    best_triton = max(tritons, key=lambda label: tritons[label]["rows_per_s"])
    graphs = [*RUNTIMES, *(column(r, p) for r, p in REDUCED if column(r, p) in rates or column(r, p) in not_run)]
    # A graph not measured says why once, in the first row; its other cells are blank.
    why = [not_run.get(name) for name in graphs]
    columns = [f"in-process {name}" for name in graphs] + list(served)
    units = result.get("units")
    lines = [
        "# Serving next to the peers (one run, same model)",
        "",
        f"Machine: {result['machine']}. Model: `{result['model_uri']}`. {rounds} round(s), each measuring every "
        f"column for {result['seconds']:g} s in turn; a cell is the median over the rounds, [slowest–fastest "
        f"round] beside throughputs. Our batching wait {result['max_latency_ms']:g} ms. Fastest runtime "
        f"in-process at batch {CLIENTS}: **{fastest}**"
        + (f"; fastest admitted graph (runtime/precision): **{result['best']}**" if "best" in result else "")
        + f". Command: `python -m benchmarks.serving --peers --model-uri "
        f"{result['model_uri']} --seconds {result['seconds']:g} --rounds {rounds}`.",
        *(["", f"Reduced-precision units on this CPU: {_units(units)}; the targets below are this CPU's."]
          if units else []),
        "",
        "| | " + " | ".join(columns) + " |",
        "|---" * (len(columns) + 1) + "|",
        _row("batch 1 / 1 client, jets/s", [w or _rate(rates[g], 1) for g, w in zip(graphs, why, strict=True)],
             served, "single_rows_per_s", True),
        _row(f"batch {CLIENTS} / {CLIENTS} clients, jets/s", [None if w else _rate(rates[g], CLIENTS)
             for g, w in zip(graphs, why, strict=True)], served, "rows_per_s", True),
        _row("p50 at 1 client, ms", [None] * len(graphs), served, "single_p50_ms", False),
        _row(f"p50 at {CLIENTS} clients, ms", [None] * len(graphs), served, "p50_ms", False),
        "| errors | " + " | ".join(["—"] * len(graphs) + [str(s["errors"]) for s in served.values()]) + " |",
        "",
        "| ratio (medians, one run) | result | target |",
        "|---|---|---|",
        f"| ours on {fastest} / ours on torch, {CLIENTS} clients | "
        f"{_ratio(ours['rows_per_s'], torch_server['rows_per_s'])} | ≥ 1.6× |",
        f"| ours on {fastest}, {CLIENTS} clients / {fastest} in-process at batch {CLIENTS} | "
        f"{bounded_ratio(ours['rows_per_s'], statistics.median(_rate(rates[fastest], CLIENTS)), 'in-process')} "
        "| ≥ 0.85× |",
        f"| ours on {fastest} / {best_triton} (the better Triton), {CLIENTS} clients | "
        f"{_ratio(ours['rows_per_s'], tritons[best_triton]['rows_per_s'])} | ≥ 1.0× |",
        f"| ours on {fastest} / stock KServe on {fastest}, {CLIENTS} clients | "
        f"{_ratio(ours['rows_per_s'], stock['rows_per_s'])} | ≥ 3× |",
        f"| p50 at 1 client, ours on {fastest} / ours on torch | "
        f"{_ratio(ours['single_p50_ms'], torch_server['single_p50_ms'])} | ≤ 0.35× |",
        *(_precision_ratios(result, served) if units and "best" in result else []),
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def _precision_ratios(result: dict, served: dict[str, dict]) -> list[str]:
    """Issue 20's rows: each reduced precision against its runtime's fp32 in-process, and ours on the best graph."""
    rates, not_run, units, best = result["in_process"], result.get("not_run", {}), result["units"], result["best"]
    int8_target = "≥ 4.5× (AMX)" if units["amx"] else "≥ 2× (VNNI, no AMX)" if units["int8"] else "— (no int8 units)"
    bf16_target = "≥ 2.5× (AMX)" if units["amx"] else "— (a target with AMX only)"
    rows = []
    for runtime, precision in REDUCED:
        name = column(runtime, precision)
        if precision not in PRECISIONS[runtime]:
            continue  # no such graph anywhere (ONNX Runtime bf16): the table's cell says so
        if name in rates:
            result_cell = _ratio(*(statistics.median(_rate(rates[g], CLIENTS)) for g in (name, runtime)))
        else:
            result_cell = not_run.get(name, "not run")
        target = int8_target if precision == "int8" else bf16_target
        rows.append(f"| in-process at batch {CLIENTS}, {name} / {runtime} fp32 | {result_cell} | {target} |")
    ours = _medians(served[f"ours, {best}"])
    openvino = _medians(served["ours, openvino"])
    in_process_best = statistics.median(_rate(rates[best], CLIENTS))
    rows += [
        f"| ours on {best} / ours on openvino fp32, {CLIENTS} clients | "
        f"{_ratio(ours['rows_per_s'], openvino['rows_per_s'])} | {'≥ 3× (AMX)' if units['amx'] else '≥ 2× (no AMX)'} |",
        f"| ours on {best}, {CLIENTS} clients / {best} in-process at batch {CLIENTS} | "
        f"{bounded_ratio(ours['rows_per_s'], in_process_best, 'in-process')} | ≥ 0.85× |",
    ]
    if best != result["fastest"]:  # else issue 12's rows above compare the same servers
        tritons = _tritons(served, best)
        best_triton = max(tritons, key=lambda label: tritons[label]["rows_per_s"])
        stock = _medians(served[f"stock KServe, {best}"])
        rows += [
            f"| ours on {best} / {best_triton} (the better Triton), {CLIENTS} clients | "
            f"{_ratio(ours['rows_per_s'], tritons[best_triton]['rows_per_s'])} | ≥ 1.0× (issue 12's, same graph) |",
            f"| ours on {best} / stock KServe on {best}, {CLIENTS} clients | "
            f"{_ratio(ours['rows_per_s'], stock['rows_per_s'])} | ≥ 3× (issue 12's, same graph) |",
        ]
    return rows


def _ratio(value: float, reference: float) -> str:
    """``1.23×``; a reference that never answered (0 jets/s, errors only) makes no ratio, and no crash."""
    return f"{value / reference:.2f}×" if reference > 0 else "— (the reference measured 0)"


def _units(units: dict[str, bool]) -> str:
    int8 = "VNNI and AMX" if units["amx"] and units["int8"] else "VNNI, no AMX" if units["int8"] else "none"
    bf16 = "AMX" if units["amx"] and units["bf16"] else "AVX512-BF16, no AMX" if units["bf16"] else "none"
    return f"int8: {int8}; bf16: {bf16}"


def _tritons(served: dict[str, dict], graph: str) -> dict[str, dict[str, float]]:
    """The Triton columns on ``graph`` (its two queue delays), as medians."""
    return {label: _medians(s) for label, s in served.items() if label.startswith(f"Triton, {graph}, ")}


def _medians(served: dict) -> dict[str, float]:
    return {key: statistics.median(_rounds(served[key])) for key in ("rows_per_s", "p50_ms", "single_rows_per_s",
                                                                      "single_p50_ms")}  # fmt: skip


def _cell(values: list[float] | float | str | None, spread: bool) -> str:
    if values is None:
        return "—"
    if isinstance(values, str):
        return values  # why a graph was not measured
    values = _rounds(values)
    median = statistics.median(values)
    if not spread:
        return f"{median:.2f}"
    return f"{median:.0f} [{min(values):.0f}–{max(values):.0f}]" if len(values) > 1 else f"{median:.0f}"


def _row(name: str, in_process: list, served: dict[str, dict], key: str, spread: bool) -> str:
    cells = [_cell(v, spread) for v in in_process] + [_cell(s[key], spread) for s in served.values()]
    return f"| {name} | " + " | ".join(cells) + " |"


def _rounds(values: list[float] | float) -> list[float]:
    return [float(v) for v in values] if isinstance(values, list) else [float(values)]  # one number: a one-round run


def _rate(rates: dict, batch: int) -> list[float]:
    return _rounds(rates[batch] if batch in rates else rates[str(batch)])  # keys are strings after JSON
