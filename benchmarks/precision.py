"""Reduced precision in-process: img/s at batch 1 and 16 of each runtime x precision, and its physics cost.

    python -m benchmarks.precision --model models:/top-tagger@champion --generate 2000 \\
        --out docs/benchmarks/serving/precision.md

For every graph the model carries (``model.onnx``; ``quantized/`` for int8) on OpenVINO and ONNX
Runtime, at fp32, bf16 (OpenVINO's precision hint, only on a CPU with bf16 units) and int8: the
images per second at batch 1 and 16 (best of ``--repeats`` timed runs of ``--seconds`` each,
after a warm-up), their ratio to the same runtime's fp32 in the same run, and on held-out jets
the AUC, its difference from torch fp32 and the largest |delta p| against torch fp32. The jets
are generated with a seed no training run uses (``--seed``), or read from ``--data``. The gate's
decision (``precision.json``) is shown where the model has one. The CPU's model name and its
ISA flags head the table: only ratios measured in one run carry over to other machines.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from benchmarks.common import machine, publish
from toptagger.cli import positive_int, run_cli

HELD_OUT_SEED = 424242  # no training run uses it (training seeds are small integers)
BATCHES = (1, 16)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.precision", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model folder, s3:// prefix or models:/name@alias")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="held-out jets in the reference layout (path or s3://)")
    source.add_argument("--generate", type=positive_int, help="generate this many held-out jets (half top)")
    parser.add_argument("--seed", type=int, default=HELD_OUT_SEED, help="generator seed for --generate")
    parser.add_argument("--threads", type=positive_int, default=2, help="runtime threads")
    parser.add_argument("--seconds", type=float, default=1.0, help="length of one timed run")
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed runs per figure (the best counts)")
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    return parser


def rate(run: object, images: np.ndarray, seconds: float, repeats: int) -> float:
    """Images per second of the best of ``repeats`` runs of about ``seconds`` each."""
    run(images)  # type: ignore[operator]
    best = 0.0
    for _ in range(repeats):
        calls, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds or calls < 2:
            run(images)  # type: ignore[operator]
            calls += 1
        best = max(best, calls * len(images) / elapsed)
    return best


def main(argv: Sequence[str] | None = None) -> int:
    import torch

    from toptagger.evaluation.metrics import auc, roc_curve
    from toptagger.jets.dataset import read_jets
    from toptagger.jets.generator import generate_jets
    from toptagger.model import load_model
    from toptagger.model_uri import fetch_model_dir
    from toptagger.precision.cpu import has_units
    from toptagger.precision.files import PRECISIONS, RUNTIMES, graph_path, key, read_admission
    from toptagger.precision.graphs import model_images, open_graph, top_probabilities

    args = build_parser().parse_args(argv)
    folder = fetch_model_dir(args.model)
    jets = read_jets(args.data) if args.data else generate_jets(args.generate // 2, args.generate // 2, seed=args.seed)
    torch.set_num_threads(args.threads)
    tagger = load_model(folder)
    config = tagger.config
    images = model_images(config.in_channels, config.image.render(np.ascontiguousarray(jets.constituents)))
    with torch.inference_mode():
        logits = torch.cat([tagger(torch.from_numpy(images[s : s + 64, :1].copy())) for s in range(0, len(images), 64)])
    reference = torch.softmax(logits.double(), 1)[:, 1].numpy()

    def area(p: np.ndarray) -> float:
        return float(auc(*roc_curve(jets.labels, p)[:2]))

    reference_auc = area(reference)
    admission = read_admission(folder) or {"precisions": {}}
    rows = [f"| torch | fp32 | — | — | {reference_auc:.4f} | — | — | reference |"]
    for runtime in RUNTIMES:
        fp32_rates: dict[int, float] = {}
        for precision in PRECISIONS[runtime]:
            if not graph_path(folder, runtime, precision).is_file() or not has_units(precision):
                continue
            graph, _ = open_graph(folder, runtime, precision, args.threads)
            rates = {b: rate(graph, images[:b], args.seconds, args.repeats) for b in BATCHES}
            if precision == "fp32":
                fp32_rates = rates
            probabilities = top_probabilities(graph, images)
            value = area(probabilities)
            cells = [
                f"{rates[b]:.0f} ({rates[b] / fp32_rates[b]:.2f}×)" if fp32_rates else f"{rates[b]:.0f}"
                for b in BATCHES
            ]
            decision = admission["precisions"].get(key(runtime, precision), {})
            gate = "" if not decision else ("admitted" if decision.get("admitted") else "refused")
            rows.append(
                f"| {runtime} | {precision} | {cells[0]} | {cells[1]} | {value:.4f} | {value - reference_auc:+.4f} "
                f"| {np.abs(probabilities - reference).max():.3g} | {gate} |"
            )
            print(rows[-1], flush=True)
    size = config.image.image_size
    report = "\n".join(
        [
            "# Reduced precision in-process (`python -m benchmarks.precision`)",
            "",
            f"Machine: {machine()}; {args.threads} runtime threads, one sitting; load average "
            f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} at the end.",
            f"Model: `{args.model}` ({size}×{size}, {config.in_channels} channel(s)); "
            f"{len(jets.labels)} held-out jets ({'seed ' + str(args.seed) if not args.data else args.data}).",
            f"img/s: best of {args.repeats} runs of {args.seconds:g} s after a warm-up; (×) the same runtime's fp32 "
            "in this run. ΔAUC and |Δp| against torch fp32 on the same images. Gate: the evaluate step's decision.",
            "",
            "| runtime | precision | batch 1 img/s | batch 16 img/s | held-out AUC | ΔAUC | largest \\|Δp\\| | gate |",
            "|---|---|---|---|---|---|---|---|",
            *rows,
            "",
        ]
    )
    publish(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
