"""Every precision the model folder carries, scored on the test jets against torch fp32.

For each ``runtime/precision``: AUC and 1/eps_B at eps_S = 0.3 with their bootstrap errors (the
same replicas as the torch numbers: same seed, same jets), and the largest |delta p| of the top
probability against torch fp32 on the same images. bf16 is scored only where this CPU has bf16
units; elsewhere OpenVINO would emulate it, and neither its speed nor its rounding would be
what a bf16 node serves.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from toptagger.evaluation.metrics import tagger_metrics
from toptagger.precision.cpu import has_units
from toptagger.precision.files import PRECISIONS, RUNTIMES, graph_path, key
from toptagger.precision.graphs import model_images, open_graph
from toptagger.resources import cpu_limit

log = logging.getLogger(__name__)
WORKING_POINT = "rejection_0.3"


def score_precisions(
    model_dir: Path,
    constituents: np.ndarray,
    labels: np.ndarray,
    torch_probability: np.ndarray,
    n_bootstrap: int = 200,
    seed: int = 0,
    quantized: Path | None = None,
) -> dict[str, dict[str, Any]]:
    """``{runtime/precision: numbers}``; a pair not scored has ``auc`` None and a ``reason``.

    ``quantized``: the folder of the int8 graphs, if not ``model_dir/quantized``.
    """
    from toptagger.model import read_config
    from toptagger.onnx_export import softmax

    config = read_config(model_dir)
    images = model_images(config.in_channels, config.image.render(np.ascontiguousarray(constituents)))
    out: dict[str, dict[str, Any]] = {}
    for runtime in RUNTIMES:
        for precision in PRECISIONS[runtime]:
            name = key(runtime, precision)
            if not graph_path(model_dir, runtime, precision, quantized).is_file():
                out[name] = {"auc": None, "reason": "the model folder does not carry this graph"}
                continue
            if not has_units(precision) and precision == "bf16":
                out[name] = {"auc": None, "reason": "the evaluating CPU has no bf16 units (avx512_bf16/amx_bf16)"}
                continue
            graph, _ = open_graph(model_dir, runtime, precision, cpu_limit(), quantized)
            logits = np.concatenate([graph(images[s : s + 64]) for s in range(0, len(images), 64)])
            probability = softmax(logits)[:, 1]
            score = logits[:, 1].astype(np.float64) - logits[:, 0]
            metrics = tagger_metrics(labels, score, probability, n_bootstrap, seed)
            out[name] = {
                "auc": metrics["auc"].value,
                "auc_error": metrics["auc"].error,
                WORKING_POINT: _finite(metrics[WORKING_POINT].value),
                f"{WORKING_POINT}_error": _finite(metrics[WORKING_POINT].error),
                "max_probability_difference": float(np.abs(probability - torch_probability).max()),
            }
            log.info(
                "%s: test AUC %.4f, max |dp| %.2e", name, out[name]["auc"], out[name]["max_probability_difference"]
            )
    return out


def _finite(value: float) -> float | None:
    return value if np.isfinite(value) else None
