"""Benchmarks of the data layer: jet generation and streaming reads.

    python -m benchmarks.data [--jets 3000] [--read-jets 200000] [--markdown docs/benchmarks/data.md]

Generation is compared, in the same run, with a straightforward single-process peer: a Python loop
over every particle of the event feeding the standalone ``fastjet`` package, as one would first
write it. Reading streams a large and a small reference-format file, each in a fresh process, and
compares their peak memory: streaming means the peak does not grow with the file.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from benchmarks.common import machine, publish
from toptagger.cli import positive_int, run_cli
from toptagger.jets.dataset import DEFAULT_CHUNK, JetBatch, iter_jets, write_jets
from toptagger.jets.generator import BACKGROUND, SIGNAL, JetFactory, Recipe, generate_jets
from toptagger.jets.kinematics import delta_r


def naive_jets_per_second(n_jets: int, seed: int = 99) -> float:
    """The straightforward peer: per-particle Python loop + fastjet package, one process."""
    import fastjet

    recipe = Recipe()
    factories = {p: JetFactory(p, recipe) for p in (SIGNAL, BACKGROUND)}
    definition = fastjet.JetDefinition(fastjet.antikt_algorithm, recipe.jet_radius)
    accepted = 0
    start = time.perf_counter()
    for process, factory in factories.items():
        factory.pythia.rndm.init(seed)
        target = accepted + n_jets // 2
        while accepted < target:
            if not factory.pythia.next():
                continue
            event = factory.pythia.event
            particles = [
                fastjet.PseudoJet(p.px(), p.py(), p.pz(), p.e())
                for p in (event[i] for i in range(event.size()))
                if p.isFinal() and p.isVisible()
            ]
            sequence = fastjet.ClusterSequence(particles, definition)
            tops = factory._top_decays() if process == SIGNAL else []
            for jet in sequence.inclusive_jets(recipe.pt_min):
                if not (recipe.pt_min < jet.pt() < recipe.pt_max and abs(jet.eta()) < recipe.eta_max):
                    continue
                if process == SIGNAL:
                    axis = (jet.eta(), jet.phi_std())
                    if not any((delta_r(p[:, 0], p[:, 1], *axis) < recipe.match_radius).all() for _, p in tops):
                        continue
                sorted(jet.constituents(), key=lambda c: -c.pt())[:200]
                accepted += 1
    return accepted / (time.perf_counter() - start)


def stream_file(path: str, chunk_size: int) -> dict[str, float]:
    """Stream one file; runs in a fresh process so that its peak RSS is its own."""
    start = time.perf_counter()
    jets = 0
    checksum = 0.0
    for batch in iter_jets(path, chunk_size=chunk_size):
        jets += len(batch)
        checksum += float(batch.constituents[:, 0, 0].sum())  # touch the data
    seconds = time.perf_counter() - start
    return {"jets": jets, "seconds": seconds, "jets_per_s": jets / seconds, "peak_rss_mb": peak_rss_mb()}


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM).

    Not ``getrusage``'s ru_maxrss: Linux carries that across fork+exec, so a child would report
    the parent's peak at fork time (here, the parent that just wrote the large file).
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _stream_in_subprocess(path: Path, chunk_size: int) -> dict[str, float]:
    code = (
        "import json, sys; from benchmarks.data import stream_file; "
        f"print(json.dumps(stream_file({str(path)!r}, {chunk_size})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def tiled(batch: JetBatch, n: int) -> JetBatch:
    """``n`` jets made by repeating ``batch`` (real jets; the I/O does not care about repeats)."""
    index = np.arange(n) % len(batch)
    return batch[index]


def run(n_jets: int, read_jets: int, workers: int, chunk_size: int, naive_jets: int) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []
    start = time.perf_counter()
    batch = generate_jets(n_jets // 2, n_jets - n_jets // 2, seed=2024, workers=workers, progress=True)
    ours = len(batch) / (time.perf_counter() - start)
    rows.append(
        (
            f"generation, {workers} workers ({len(batch)} jets, selection + truth matching)",
            f"{ours:,.0f} jets/s",
            "≥ 150 jets/s",
        )
    )
    if naive_jets:
        peer = naive_jets_per_second(naive_jets)
        rows.append(
            (f"peer: Python particle loop + fastjet package, 1 process ({naive_jets} jets)", f"{peer:,.0f} jets/s", "—")
        )
        rows.append(("generation speed-up over the peer", f"{ours / peer:.2f}×", "—"))

    with tempfile.TemporaryDirectory(prefix="toptagger-bench-") as tmp:
        results = {}
        for n in (read_jets // 10, read_jets):
            path = Path(tmp) / f"jets_{n}.h5"
            write_jets(path, tiled(batch, n))
            results[n] = _stream_in_subprocess(path, chunk_size)
            size_mb = os.path.getsize(path) / 1e6
            rows.append(
                (
                    f"streaming read, {n:,} jets ({size_mb:,.0f} MB, chunks of {chunk_size:,})",
                    f"{results[n]['jets_per_s']:,.0f} jets/s, peak RSS {results[n]['peak_rss_mb']:,.0f} MB",
                    "≥ 50k jets/s",
                )
            )
        small, large = results[read_jets // 10], results[read_jets]
        rows.append(
            (
                "peak RSS, large file / small file (10× the jets)",
                f"{large['peak_rss_mb'] / small['peak_rss_mb']:.2f}×",
                "≈ 1 (bounded memory)",
            )
        )
    return rows


def markdown(rows: list[tuple[str, str, str]]) -> str:
    lines = ["| measurement | result | target |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--jets", type=positive_int, default=3000, help="jets to generate (half top, half QCD)")
    parser.add_argument("--read-jets", type=positive_int, default=200_000, help="jets in the large read file")
    parser.add_argument("--workers", type=positive_int, default=os.cpu_count() or 1)
    parser.add_argument("--chunk-size", type=positive_int, default=DEFAULT_CHUNK)
    parser.add_argument("--naive-jets", type=int, default=300, help="jets for the naive peer (0 skips it)")
    parser.add_argument("--markdown", help="also write the table to this Markdown file")
    args = parser.parse_args(argv)
    table = markdown(run(args.jets, args.read_jets, args.workers, args.chunk_size, args.naive_jets))
    header = f"Measured with `python -m benchmarks.data` on {machine()}, {time.strftime('%Y-%m-%d')}.\n\n"
    publish(header + table + "\n", args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
