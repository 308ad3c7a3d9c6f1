"""Training: loss goes down, the split is seeded, checkpoint + resume equals an uninterrupted run."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tests.tolerances import image_sum_error
from toptagger.errors import ConfigError, DataError
from toptagger.jets.compact import trim_padding
from toptagger.jets.dataset import JetBatch
from toptagger.model import TaggerConfig, build_model, load_model
from toptagger.training import trainer as train_module
from toptagger.training.batches import BatchPlan
from toptagger.training.config import TrainConfig
from toptagger.training.data import JetImageLoader, split_indices
from toptagger.training.files import CHECKPOINT_FILE, HISTORY_FILE, MODEL_DIR
from toptagger.training.trainer import train


@pytest.fixture
def tiny(train_config: TrainConfig) -> TrainConfig:
    return replace(train_config, epochs=2)


def test_split_is_seeded_and_a_partition() -> None:
    train_idx, val_idx, test_idx = split_indices(1000, seed=3, val_fraction=0.2, test_fraction=0.1)
    assert (len(train_idx), len(val_idx), len(test_idx)) == (700, 200, 100)
    np.testing.assert_array_equal(np.sort(np.concatenate([train_idx, val_idx, test_idx])), np.arange(1000))
    again = split_indices(1000, seed=3, val_fraction=0.2, test_fraction=0.1)
    assert all(np.array_equal(a, b) for a, b in zip(again, (train_idx, val_idx, test_idx), strict=True))
    assert not np.array_equal(split_indices(1000, seed=4, val_fraction=0.2, test_fraction=0.1)[1], val_idx)
    with pytest.raises(ConfigError, match="val_fraction"):
        split_indices(100, seed=0, val_fraction=0.6, test_fraction=0.5)


def test_loader_renders_compact_constituents(tiny: TrainConfig, small_jets: JetBatch) -> None:
    compact = trim_padding(small_jets.constituents)
    assert compact.shape[1] < 200 and compact.flags.c_contiguous
    loader = JetImageLoader(small_jets[:40], BatchPlan(40, 16, seed=1), tiny.image, torch.device("cpu"))
    batches = list(loader)
    assert len(loader) == len(batches) == 2  # whole batches only: 40 = 2 * 16 + 8
    images, labels = batches[0]
    assert images.shape == (16, 1, 16, 16) and images.dtype == torch.float32
    assert labels.dtype == torch.int64
    # normalised images: the pixel sum (in float64) is 1 up to the rounding of the largest jet's render
    most = int((small_jets.constituents[:40, :, 0] != 0).sum(axis=1).max())
    assert bool(((images.double().sum(dim=(1, 2, 3)) - 1.0).abs() <= image_sum_error(most)).all())
    # the order of an epoch is a function of (seed, epoch) only
    loader.epoch = 1
    first = [lab for _, lab in loader]
    loader.epoch = 0
    loader.epoch = 1
    assert all(torch.equal(a, b) for a, b in zip(first, [lab for _, lab in loader], strict=True))


def test_a_few_steps_reduce_the_loss(tiny: TrainConfig, small_jets: JetBatch) -> None:
    torch.manual_seed(0)
    model = build_model(TaggerConfig(image=tiny.image)).train()
    jets = small_jets[:64]
    loader = JetImageLoader(jets, BatchPlan(len(jets), 32, seed=0), tiny.image, torch.device("cpu"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    images = tiny.image.render(torch.from_numpy(jets.constituents))
    labels = torch.from_numpy(jets.labels)
    with torch.no_grad():
        before = float(loss_fn(model(images), labels))
    for epoch in range(5):
        loader.epoch = epoch
        for batch, target in loader:
            optimizer.zero_grad()
            loss_fn(model(batch), target).backward()
            optimizer.step()
    with torch.no_grad():
        after = float(loss_fn(model(images), labels))
    assert after < 0.7 * before, (before, after)


@pytest.mark.slow
def test_checkpoint_and_resume_continue_training_exactly(
    tiny: TrainConfig, small_jets: JetBatch, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    straight = train(tiny, small_jets, tmp_path / "straight", device="cpu", progress=False)
    assert [h["epoch"] for h in straight["history"]] == [0, 1]
    assert all(np.isfinite(h["train_loss"]) and 0 <= h["val_auc"] <= 1 for h in straight["history"])
    for name in (CHECKPOINT_FILE, HISTORY_FILE, MODEL_DIR):
        assert (tmp_path / "straight" / name).exists()

    # crash during the second epoch's validation: the first epoch's checkpoint must survive
    real_auc = train_module.validation_auc
    calls = {"n": 0}

    def crash_on_second(*args: object, **kwargs: object) -> float:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_auc(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(train_module, "validation_auc", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        train(tiny, small_jets, tmp_path / "resumed", device="cpu", progress=False)
    monkeypatch.setattr(train_module, "validation_auc", real_auc)
    state = torch.load(tmp_path / "resumed" / CHECKPOINT_FILE, weights_only=True)
    assert state["epoch"] == 0
    assert not list((tmp_path / "resumed").glob("*.part"))

    resumed = train(tiny, small_jets, tmp_path / "resumed", resume=True, device="cpu", progress=False)

    def physics(history: list[dict]) -> list[dict]:
        return [{k: v for k, v in h.items() if k != "jets_per_second"} for h in history]

    # deterministic on CPU, and the resumed run is the uninterrupted one
    assert physics(resumed["history"]) == physics(straight["history"])
    a = load_model(tmp_path / "straight" / MODEL_DIR).state_dict()
    b = load_model(tmp_path / "resumed" / MODEL_DIR).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)

    with pytest.raises(ConfigError, match=r"different settings.*epochs"):
        train(replace(tiny, epochs=3), small_jets, tmp_path / "resumed", resume=True, device="cpu", progress=False)


def test_resume_without_checkpoint_and_bad_settings(tiny: TrainConfig, small_jets: JetBatch, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no checkpoint"):
        train(tiny, small_jets, tmp_path, resume=True, device="cpu", progress=False)
    with pytest.raises(ConfigError, match="batch_size"):
        replace(tiny, batch_size=0)
    with pytest.raises(ConfigError, match="lr"):
        replace(tiny, lr=-1.0)
    one_class = small_jets[small_jets.labels == 1]
    with pytest.raises(DataError, match="both top and QCD"):
        train(tiny, one_class, tmp_path / "one", device="cpu", progress=False)


def test_separate_validation_file_trains_on_all_of_data_and_guards_resume(
    tiny: TrainConfig, small_jets: JetBatch, jets_file: Path, tmp_path: Path
) -> None:
    from toptagger.jets.dataset import write_jets

    val_path = tmp_path / "val.h5"
    write_jets(val_path, small_jets[::4])
    config = replace(tiny, epochs=1, val_data=str(val_path))
    summary = train(config, small_jets, tmp_path / "run", device="cpu", progress=False)
    assert (summary["n_train"], summary["n_val"], summary["n_test"]) == (len(small_jets), len(small_jets[::4]), 0)
    assert summary["config"]["val_data"] == str(val_path)
    # resuming with another validation file would change what "best epoch" means
    with pytest.raises(ConfigError, match="val_data"):
        train(replace(config, val_data=str(jets_file)), small_jets, tmp_path / "run", resume=True, progress=False)
    with pytest.raises(DataError, match=r"missing-val\.h5"):
        train(replace(tiny, val_data=str(tmp_path / "missing-val.h5")), small_jets, tmp_path / "x", progress=False)


def test_bf16_autocast_and_channels_last_on_cpu(
    tiny: TrainConfig, small_jets: JetBatch, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The half-precision path of a GPU run (--amp bf16, channels-last), exercised on CPU so it cannot rot."""
    seen: dict[str, object] = {}
    real_build = train_module.build_model

    def build_and_watch(config: TaggerConfig) -> nn.Module:
        model = real_build(config)

        def record(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if module.training:
                seen.setdefault("dtype", output.dtype)
                seen.setdefault("layout", output.is_contiguous(memory_format=torch.channels_last))

        model.layer1.register_forward_hook(record)
        return model

    monkeypatch.setattr(train_module, "build_model", build_and_watch)
    records: list[dict] = []
    # 32 pixels and three channels, the settings this test always ran with: at 16 pixels and one
    # channel, bf16 from scratch ended in NaN scores once in a full-suite run (never alone; cause not
    # found). The test is about the bf16 path, not about training that small a network stably.
    image = replace(tiny.image, image_size=32)
    config = replace(tiny, image=image, in_channels=3, seed=7, epochs=1, max_steps_per_epoch=2, amp="bf16")
    summary = train(
        config,
        small_jets,
        tmp_path,
        device="cpu",
        progress=False,
        channels_last=True,
        on_epoch=lambda epoch, model, record: records.append(
            {"conv1": model.conv1.weight.is_contiguous(memory_format=torch.channels_last), **record}
        ),
    )
    assert seen == {"dtype": torch.bfloat16, "layout": True}
    assert records[0]["conv1"] and np.isfinite(records[0]["train_loss"]) and 0 <= records[0]["val_auc"] <= 1
    # the saved model is float32 and loads as usual
    assert summary["config"]["amp"] == "bf16"
    assert all(
        t.dtype == torch.float32
        for t in load_model(tmp_path / MODEL_DIR).state_dict().values()
        if t.is_floating_point()
    )
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        train(replace(config, amp="fp16"), small_jets, tmp_path / "fp16", device="cpu", progress=False)
