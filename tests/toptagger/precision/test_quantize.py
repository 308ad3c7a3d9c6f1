"""The int8 graphs load in OpenVINO and ONNX Runtime and answer close to the fp32 graph."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from toptagger.errors import ConfigError, DataError
from toptagger.jets.dataset import JetBatch
from toptagger.model import read_config
from toptagger.precision.files import QUANTIZATION_FILE, carried
from toptagger.precision.graphs import model_images, open_graph, top_probabilities
from toptagger.precision.quantize import QuantizeOptions, quantize

# int8 activations and weights through 50 layers of a random-weight network: what is claimed is
# agreement in the probabilities to a few percent, not float32's rounding bound.
INT8_PROBABILITY_TOLERANCE = 0.05


def _probabilities(folder: Path, runtime: str, precision: str, jets: np.ndarray) -> np.ndarray:
    config = read_config(folder)
    images = model_images(config.in_channels, config.image.render(jets))
    graph, _ = open_graph(folder, runtime, precision, threads=1)
    return top_probabilities(graph, images)


def test_both_int8_graphs_are_written_and_carried(quantized_model_dir: Path) -> None:
    assert carried(quantized_model_dir) == [
        "openvino/fp32", "openvino/bf16", "openvino/int8", "onnxruntime/fp32", "onnxruntime/int8",
    ]  # fmt: skip
    record = json.loads((quantized_model_dir / "quantized" / QUANTIZATION_FILE).read_text())
    assert record["calibration_jets"] == 32 and record["validation_jets"] == 60
    # Written through a staging folder: nothing half-written is left beside it.
    assert not [p.name for p in quantized_model_dir.iterdir() if p.name.endswith(".part")]


@pytest.mark.parametrize("runtime", ["openvino", "onnxruntime"])
def test_int8_answers_close_to_fp32(runtime: str, quantized_model_dir: Path, small_jets: JetBatch) -> None:
    jets = small_jets.constituents[:64]
    fp32 = _probabilities(quantized_model_dir, runtime, "fp32", jets)
    int8 = _probabilities(quantized_model_dir, runtime, "int8", jets)
    assert np.all((int8 >= 0) & (int8 <= 1))
    assert np.abs(int8 - fp32).max() <= INT8_PROBABILITY_TOLERANCE
    assert not np.array_equal(int8, fp32), "int8 answers equal to fp32's: not the quantized graph"


def test_quantization_needs_the_onnx_graph_and_both_classes(
    model_dir: Path, tmp_path: Path, tiny_jets: JetBatch
) -> None:
    x, y = tiny_jets.constituents, tiny_jets.labels
    with pytest.raises(ConfigError, match=r"no model\.onnx to quantize"):
        quantize(model_dir, tmp_path / "q", x, x, y)
    with pytest.raises(ConfigError, match="calibration_jets must be >= 1"):
        QuantizeOptions(calibration_jets=0)
    with pytest.raises(ConfigError, match="max_auc_loss must be in"):
        QuantizeOptions(max_auc_loss=-0.1)


def test_one_class_validation_is_refused(onnx_model_dir: Path, tmp_path: Path, tiny_jets: JetBatch) -> None:
    x, y = tiny_jets.constituents, tiny_jets.labels
    top = y == 1
    with pytest.raises(DataError, match="one class only"):
        quantize(onnx_model_dir, tmp_path / "q", x, x[top], y[top])
