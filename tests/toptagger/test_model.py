"""ResNet-50 tagger: sizes, ImageNet-format transfer, URIs (file, s3://, models:/), saving."""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from tests.tolerances import gamma
from toptagger import storage
from toptagger.errors import DataError, StorageError
from toptagger.images import ImageConfig
from toptagger.jets.dataset import JetBatch
from toptagger.model import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    TaggerConfig,
    build_model,
    load_model,
    load_weights,
    save_model,
    score_jets,
)


@pytest.fixture(scope="module")
def imagenet_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A state_dict in the exact format of torchvision's ImageNet ResNet-50 file (1000 classes).

    The real file cannot be downloaded here; the format (names, shapes, 1000-class head) is what
    the loader must handle, and a seeded torchvision model has exactly that format.
    """
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "resnet50-imagenet.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)
    return path


@pytest.mark.parametrize("size", [32, 40, 64])
def test_two_class_output_for_small_images(size: int) -> None:
    torch.manual_seed(0)  # build_model initialises the weights from the global RNG; torch.rand draws from it
    model = build_model(TaggerConfig(image=ImageConfig(image_size=size))).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 1, size, size))
    assert out.shape == (2, 2)


def test_imagenet_state_dict_loads_backbone_and_reinitialises_head(
    imagenet_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = torch.load(imagenet_file, weights_only=True)
    torch.manual_seed(0)  # build_model initialises the weights (and load_weights the new head) from the global RNG
    model = build_model(TaggerConfig())
    with caplog.at_level(logging.INFO, logger="toptagger.model"):
        skipped = load_weights(model, imagenet_file)
    assert skipped == ["fc.bias", "fc.weight"]
    assert "fc.weight [1000, 2048]" in caplog.text and "fc.bias" in caplog.text
    state = model.state_dict()
    for name in ("conv1.weight", "layer3.2.conv2.weight", "layer4.2.bn3.running_var"):
        torch.testing.assert_close(state[name], source[name], rtol=0, atol=0)  # copied: identical
    assert state["fc.weight"].shape == (2, 2048)
    assert state["fc.weight"].abs().sum() > 0


def test_one_channel_input_sums_the_rgb_filters(imagenet_file: Path) -> None:
    source = torch.load(imagenet_file, weights_only=True)
    torch.manual_seed(0)  # build_model initialises the weights from the global RNG; torch.rand draws from it
    model = build_model(TaggerConfig(in_channels=1))
    load_weights(model, str(imagenet_file))
    # the same float32 sum over the same 3 values as the loader's: identical
    torch.testing.assert_close(model.conv1.weight, source["conv1.weight"].sum(dim=1, keepdim=True), rtol=0, atol=0)
    # a grey image through the 1-channel net equals the same image in 3 channels through RGB filters
    rgb = build_model(TaggerConfig(in_channels=3))
    load_weights(rgb, imagenet_file)
    image = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        grey, colour = model.conv1(image).double(), rgb.conv1(image.expand(-1, 3, -1, -1)).double()
    # Equal in exact arithmetic. In float32 the grey side rounds the 3-term weight sum (gamma(2)) and
    # then sums 49 products (gamma(49)), the RGB side sums 147 (gamma(147)), all on magnitudes up to
    # sum_c |w_c| conv |x|: the two differ by at most the sum of the three bounds, <= gamma(198) of it.
    magnitude = F.conv2d(image.double(), rgb.conv1.weight.detach().double().abs().sum(dim=1, keepdim=True), None, 2, 3)
    assert bool(((grey - colour).abs() <= gamma(2 + 49 + 147) * magnitude).all())


def test_no_weights_means_from_scratch(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)  # build_model initialises the weights from the global RNG
    with caplog.at_level(logging.INFO, logger="toptagger.model"):
        assert load_weights(build_model(TaggerConfig()), None) == []
    assert "from scratch" in caplog.text


def test_missing_and_mismatched_weights_are_named(tmp_path: Path) -> None:
    torch.manual_seed(0)  # build_model and resnet18 initialise their weights from the global RNG
    model = build_model(TaggerConfig())
    with pytest.raises(StorageError, match=r"nope\.pth: no such file"):
        load_weights(model, tmp_path / "nope.pth")
    resnet18 = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), resnet18)
    with pytest.raises(DataError, match=r"do not match the resnet50 backbone.*missing.*wrong shape"):
        load_weights(model, resnet18)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(DataError, match="not a readable safetensors file"):
        load_weights(model, garbage)


class Payload:
    """Stands in for an arbitrary object that a pickle could smuggle in."""


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"conv1.weight": Payload()}))
    torch.manual_seed(0)  # build_model initialises the weights from the global RNG
    with pytest.raises(DataError, match="weights_only=True"):
        load_weights(build_model(TaggerConfig()), path)


def test_save_and_load_round_trip(tmp_path: Path, small_jets: JetBatch) -> None:
    config = TaggerConfig(image=ImageConfig(image_size=32, center="centroid", rotate=True), in_channels=1)
    torch.manual_seed(1)
    model = build_model(config).eval()
    folder = save_model(model, tmp_path / "tagger")
    assert sorted(p.name for p in folder.iterdir()) == [WEIGHTS_FILE, CONFIG_FILE]
    saved = json.loads((folder / CONFIG_FILE).read_text())
    assert saved["image"]["image_size"] == 32 and saved["image"]["rotate"] is True and saved["in_channels"] == 1
    loaded = load_model(folder)
    assert loaded.config == config
    jets = small_jets.constituents[:16]
    # the same float32 computation on bit-identical weights and inputs: identical, not merely close
    np.testing.assert_array_equal(score_jets(loaded, jets), score_jets(model, jets))
    probabilities = score_jets(loaded, jets, batch_size=5)
    assert probabilities.shape == (16,) and ((probabilities >= 0) & (probabilities <= 1)).all()


def test_weights_and_models_from_s3(s3_env: str, tmp_path: Path, imagenet_file: Path) -> None:
    storage.upload(imagenet_file, f"{s3_env}/pretrained/resnet50.pth")
    torch.manual_seed(0)  # build_model (also inside load_model) initialises weights from the global RNG
    model = build_model(TaggerConfig())
    assert load_weights(model, f"{s3_env}/pretrained/resnet50.pth") == ["fc.bias", "fc.weight"]
    save_model(model, tmp_path / "tagger")
    storage.upload_dir(tmp_path / "tagger", f"{s3_env}/models/tagger")
    loaded = load_model(f"{s3_env}/models/tagger")
    torch.testing.assert_close(loaded.state_dict()["fc.weight"], model.state_dict()["fc.weight"], rtol=0, atol=0)
    with pytest.raises(StorageError, match="no such object"):
        load_weights(model, f"{s3_env}/pretrained/missing.pth")


def test_models_from_the_mlflow_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mlflow = pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    torch.manual_seed(0)  # build_model (also inside load_model) initialises weights from the global RNG
    model = build_model(TaggerConfig(image=ImageConfig(image_size=32)))
    save_model(model, tmp_path / "tagger")
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(tmp_path / "tagger"), artifact_path="tagger")
    client = MlflowClient()
    client.create_registered_model("top-tagger")
    version = client.create_model_version("top-tagger", f"{run.info.artifact_uri}/tagger", run.info.run_id)
    client.set_registered_model_alias("top-tagger", "champion", version.version)
    loaded = load_model("models:/top-tagger@champion")
    torch.testing.assert_close(loaded.state_dict()["fc.weight"], model.state_dict()["fc.weight"], rtol=0, atol=0)
    fresh = build_model(TaggerConfig())
    assert load_weights(fresh, "models:/top-tagger/1") == []
    with pytest.raises(StorageError, match="models:/absent@champion: cannot resolve"):
        load_weights(fresh, "models:/absent@champion")
