"""One exported graph on one runtime at one precision: images ``[N, C, S, S]`` -> logits ``[N, 2]``.

The predictor's backends, the evaluate step and the benchmark all open graphs here, so that what
the gate measured is what serves. OpenVINO is given its precision explicitly: fp32 graphs run
at ``f32`` or ``bf16`` (its ``INFERENCE_PRECISION_HINT``), and the int8 IR's layers that NNCF kept
in float run at ``f32``, so an int8 score measured on one node pool holds on another whatever
OpenVINO's per-CPU default would be.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from toptagger.errors import ConfigError
from toptagger.precision.files import PRECISIONS, graph_path

Graph = Callable[[np.ndarray], np.ndarray]
OPENVINO_HINTS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}


def check(runtime: str, precision: str) -> None:
    if runtime not in PRECISIONS:
        raise ConfigError(f"unknown runtime {runtime!r}; choose one of {', '.join(PRECISIONS)}")
    if precision not in PRECISIONS[runtime]:
        raise ConfigError(
            f"{runtime} runs {', '.join(PRECISIONS[runtime])} from the exported graphs, not {precision!r}"
        )


def open_graph(
    model_dir: Path, runtime: str, precision: str, threads: int, quantized: Path | None = None
) -> tuple[Graph, str]:
    """(images -> logits, a description) for the graph of ``runtime`` at ``precision`` in ``model_dir``.

    ``quantized``: where the int8 graphs are, if not in ``model_dir/quantized``.
    """
    check(runtime, precision)
    path = graph_path(model_dir, runtime, precision, quantized)
    if not path.is_file():
        raise ConfigError(f"{model_dir}: no {path.name} for {runtime} {precision} (not carried by this model)")
    if runtime == "openvino":
        return _openvino(path, precision, threads)
    return _onnxruntime(path, precision, threads)


def _openvino(path: Path, precision: str, threads: int) -> tuple[Graph, str]:
    import openvino as ov

    hint = OPENVINO_HINTS[precision]
    settings = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": hint}
    request = ov.Core().compile_model(str(path), "CPU", settings).create_infer_request()

    def run(images: np.ndarray) -> np.ndarray:
        return np.asarray(request.infer([images])[0])

    return run, f"openvino {ov.__version__} on CPU ({threads} threads, {precision}{_float_part(precision, hint)})"


def _float_part(precision: str, hint: str) -> str:
    return f", float layers {hint}" if precision == "int8" else ""


def _onnxruntime(path: Path, precision: str, threads: int) -> tuple[Graph, str]:
    import onnxruntime as ort

    from toptagger.onnx_export import INPUT

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    # ORT's pool threads spin between runs by default: in a server they take the cores from the
    # event loop that forms the next batch. Off, our server on the int8 graph served 885-928
    # jets/s instead of 764-793 at 16 clients, in-process unchanged (docs/benchmarks/serving/hotpath.md).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(images: np.ndarray) -> np.ndarray:
        return session.run(None, {INPUT: images})[0]

    return run, f"onnxruntime {ort.__version__} on CPU ({threads} threads, {precision})"


def model_images(model_channels: int, images: np.ndarray) -> np.ndarray:
    """1-channel rendered images as the model's channel count, contiguous float32 (what graphs take)."""
    if images.shape[1] != model_channels:
        images = np.broadcast_to(images, (images.shape[0], model_channels, *images.shape[2:]))
    return np.ascontiguousarray(images, dtype=np.float32)


def top_probabilities(graph: Graph, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Top probability of each image through ``graph``, float64, in batches."""
    from toptagger.onnx_export import softmax

    out = np.empty(len(images), np.float64)
    for start in range(0, len(images), batch_size):
        out[start : start + batch_size] = softmax(graph(images[start : start + batch_size]))[:, 1]
    return out
