"""A small tagger with its int8 graphs and an admission record, as the pipeline's steps leave it.

Fixtures for tests/toptagger/precision and tests/serving (registered in tests/conftest.py). The
network is random-weight at 16 pixels, one channel; quantization runs with a gate so loose that
NNCF's accuracy control never ranks layers (its ranking is minutes on 2 cores), so the graphs
are NNCF's and ONNX Runtime's plain int8 ones, made in seconds.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from toptagger.images import ImageConfig
from toptagger.jets.dataset import JetBatch
from toptagger.model import TaggerConfig, build_model, load_model, save_model
from toptagger.onnx_export import export_onnx
from toptagger.precision.quantize import QuantizeOptions, quantize

SMALL = TaggerConfig(image=ImageConfig(image_size=16, center="centroid", rotate=True, flip=True), in_channels=1)
LOOSE = QuantizeOptions(max_auc_loss=0.5, calibration_jets=32, validation_jets=60, ranking_jets=60)


@pytest.fixture(scope="session")
def quantized_model_dir(tiny_jets: JetBatch, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved 16-pixel tagger with ``model.onnx`` and ``quantized/`` (both int8 graphs), no admission yet."""
    torch.manual_seed(0)
    np.random.seed(0)  # NNCF draws from numpy's global generator
    folder = save_model(build_model(SMALL).eval(), tmp_path_factory.mktemp("quantized") / "tagger")
    export_onnx(load_model(folder), folder)
    order = np.random.default_rng(7).permutation(len(tiny_jets.labels))  # both classes in each part
    x, y = tiny_jets.constituents[order], tiny_jets.labels[order]
    quantize(folder, folder / "quantized", x[:60], x[60:], y[60:], LOOSE)
    return folder


def copy_model(folder: Path, tmp_path: Path) -> Path:
    """A copy of a model folder that a test may add files to."""
    return Path(shutil.copytree(folder, tmp_path / "tagger"))
