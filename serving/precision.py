"""Which runtime and precision serve a version: the one asked for if the version allows it, or the fastest.

A version allows a precision when it carries its graph (``model.onnx``; ``quantized/`` for int8)
and, for anything but fp32, when the evaluate step's gate admitted it (``precision.json``). fp32
needs no admission: it is the export the evaluate step holds to torch's answers.

``auto`` measures each allowed candidate for about ``seconds`` at load (a ``batch``-image
batch of zeros, the batcher's full batch), keeps the fastest, and says so in the log and in the
backend's description. A precision the CPU has no units for (int8 without VNNI/AMX, bf16 without
AVX512-BF16/AMX) is no candidate: emulated, it would be slower than fp32, and on such a CPU auto
serves fp32.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from toptagger.errors import ConfigError
from toptagger.precision.cpu import has_units
from toptagger.precision.files import ADMISSION_FILE, PRECISIONS, graph_path, key, read_admission
from toptagger.precision.graphs import Graph, open_graph
from toptagger.resources import cpu_limit

log = logging.getLogger("serving.precision")
AUTO = "auto"
MEASURE_SECONDS = 1.0
MEASURE_BATCH = 16


@dataclass
class Choice:
    """What serves: the runtime, the precision, its graph, and why it was chosen."""

    runtime: str
    precision: str
    graph: Graph
    description: str
    rates: dict[str, float] = field(default_factory=dict)  # img/s of each candidate auto measured

    @property
    def selection(self) -> str:
        if not self.rates:
            return f"{key(self.runtime, self.precision)} (asked for)"
        measured = ", ".join(f"{name} {rate:.0f}" for name, rate in self.rates.items())
        return f"{key(self.runtime, self.precision)} (auto, fastest in img/s at batch {MEASURE_BATCH}: {measured})"


def refusal(model_dir: Path, runtime: str, precision: str) -> str | None:
    """Why ``model_dir`` may not be served by ``runtime`` at ``precision``; None when it may."""
    if precision not in PRECISIONS[runtime]:
        hint = " (fp16 is torch's: --backend torch --precision fp16)" if precision == "fp16" else ""
        runs = ", ".join(PRECISIONS[runtime])
        return f"the {runtime} backend runs {runs} from the exported graphs, not {precision!r}{hint}"
    path = graph_path(model_dir, runtime, precision)
    if not path.is_file():
        return f"precision {precision} is not carried by this version: no {path.relative_to(model_dir)} for {runtime}"
    if precision == "fp32":
        return None
    admission = read_admission(model_dir)
    if admission is None:
        gate = f"it has no {ADMISSION_FILE}, the evaluate step's gate"
        return f"precision {precision} is not admitted for this version ({gate})"
    decision = admission["precisions"].get(key(runtime, precision))
    if not decision or not decision.get("admitted"):
        reason = decision.get("reason", "not measured") if decision else "not measured"
        return f"precision {precision} on {runtime} was not admitted for this version ({reason})"
    if not has_units(precision):
        units = "VNNI/AMX" if precision == "int8" else "AVX512-BF16/AMX"
        return f"precision {precision} needs CPU units this node lacks ({units})"
    return None


def select(model_dir: Path, runtimes: tuple[str, ...], precision: str, threads: int | None = None) -> Choice:
    """The runtime and precision to serve ``model_dir`` with (``precision`` may be ``auto``)."""
    from toptagger.onnx_export import ONNX_FILE

    threads = threads or cpu_limit()
    if not (model_dir / ONNX_FILE).is_file():
        raise ConfigError(
            f"{model_dir}: no {ONNX_FILE} (the train step writes it; for an older model: "
            f"python -m toptagger.onnx_export {model_dir})"
        )
    if precision != AUTO and len(runtimes) == 1:
        reason = refusal(model_dir, runtimes[0], precision)
        if reason:
            raise ConfigError(reason)
        graph, description = open_graph(model_dir, runtimes[0], precision, threads)
        return Choice(runtimes[0], precision, graph, description)
    wanted = [(r, p) for r in runtimes for p in PRECISIONS[r] if precision in (AUTO, p)]
    reasons = {key(r, p): refusal(model_dir, r, p) for r, p in wanted}
    candidates = [(r, p) for r, p in wanted if reasons[key(r, p)] is None]
    for name, reason in reasons.items():
        if reason:
            log.info("auto: %s is no candidate: %s", name, reason)
    if not candidates:
        raise ConfigError(f"no runtime may serve precision {precision}: " + "; ".join(filter(None, reasons.values())))
    return fastest(model_dir, candidates, threads)


def fastest(
    model_dir: Path, candidates: list[tuple[str, str]], threads: int, seconds: float = MEASURE_SECONDS
) -> Choice:
    """Open each candidate, measure its img/s for about ``seconds``, keep the fastest (the others are freed)."""
    from toptagger.model import read_config

    config = read_config(model_dir)
    size = config.image.image_size
    batch = np.zeros((MEASURE_BATCH, config.in_channels, size, size), np.float32)
    best: Choice | None = None
    rates: dict[str, float] = {}
    for runtime, precision in candidates:
        graph, description = open_graph(model_dir, runtime, precision, threads)
        rates[key(runtime, precision)] = rate = _rate(graph, batch, seconds or MEASURE_SECONDS)
        if best is None or rate > rates[key(best.runtime, best.precision)]:
            best = Choice(runtime, precision, graph, description)
    assert best is not None
    best.rates = rates
    log.info("auto picked %s", best.selection)
    return best


def _rate(graph: Graph, batch: np.ndarray, seconds: float) -> float:
    graph(batch)  # the first call allocates and tunes: not what serving pays per batch
    runs, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or runs < 2:
        graph(batch)
        runs += 1
    return runs * len(batch) / elapsed
