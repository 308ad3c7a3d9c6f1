"""The ONNX export: a dynamic-batch graph that ONNX Runtime and OpenVINO run as torch does, checked on real jets."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from tests.tolerances import tagger_probability_bound
from toptagger.errors import DataError
from toptagger.evaluation.evaluate import network_scores
from toptagger.images import ImageConfig
from toptagger.jets.dataset import JetBatch
from toptagger.model import JetTagger, TaggerConfig, build_model, load_model, save_model
from toptagger.onnx_export import ONNX_FILE, OPSET, compare, export_onnx, top_probabilities

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", params=[3, 1], ids=["3 channels", "1 channel"])
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[JetTagger, Path]:
    torch.manual_seed(0)
    image = ImageConfig(image_size=32, center="centroid", rotate=True, flip=True, normalize=True)
    config = TaggerConfig(image=image, in_channels=request.param)
    folder = save_model(build_model(config).eval(), tmp_path_factory.mktemp("onnx") / "tagger")
    with torch.random.fork_rng(devices=[]):
        model = load_model(folder)
    return model, export_onnx(model, folder)


def test_the_graph_takes_any_batch_of_the_models_images(exported: tuple[JetTagger, Path]) -> None:
    model, path = exported
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    assert path.name == ONNX_FILE and graph.opset_import[0].version == OPSET
    dims = graph.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [model.config.in_channels, 32, 32]


def test_onnx_runtime_agrees_with_torch_on_real_jets(exported: tuple[JetTagger, Path], small_jets: JetBatch) -> None:
    model, path = exported
    jets = small_jets[np.arange(120)]
    _, torch_top = network_scores(model, jets.constituents)
    onnx_top = top_probabilities(path, model, jets.constituents, batch_size=50)  # other batches than torch's
    images = model.config.image.render(jets.constituents)
    bound = tagger_probability_bound(model, images.repeat(model.config.in_channels, axis=1))[:, 1]
    assert np.all(np.abs(onnx_top - torch_top) <= bound)  # both float32 evaluations of the same network
    check = compare(onnx_top, torch_top, jets.labels)
    assert check["onnx_max_probability_difference"] == pytest.approx(float(np.abs(onnx_top - torch_top).max()))
    assert check["onnx_auc_difference"] <= 5e-4


def test_a_graph_that_disagrees_is_refused() -> None:
    labels = np.r_[np.ones(50), np.zeros(50)].astype(np.int64)
    reference = np.random.default_rng(1).random(100)
    with pytest.raises(DataError, match=r"top probabilities differ by up to 2\.00e-03"):
        compare(reference + 2e-3, reference, labels)


def test_the_cli_exports_a_saved_model(exported: tuple[JetTagger, Path], tmp_path: Path) -> None:
    model, _ = exported
    folder = save_model(model, tmp_path / "old-model")  # a model saved before exports existed
    command = [sys.executable, "-m", "toptagger.onnx_export", str(folder)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (folder / ONNX_FILE).is_file()
