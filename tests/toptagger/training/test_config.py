"""The one training declaration: the pipeline's parameters map onto it, and nothing drifts from it."""

from __future__ import annotations

import pytest

from toptagger.errors import ConfigError
from toptagger.training.config import TrainConfig


def test_train_config_maps_the_pipeline_split() -> None:
    config = TrainConfig.from_pipeline(
        image_size=32,
        epochs=1,
        batch_size=8,
        learning_rate=1e-3,
        seed=0,
        base_model_uri="",
        val_fraction=0.15,
        test_fraction=0.15,
        max_steps_per_epoch=0,
        patience=2,
    )
    assert config.test_fraction == 0 and config.val_fraction == pytest.approx(0.15 / 0.85)
    assert config.weights is None and config.max_steps_per_epoch is None and config.image.image_size == 32
    with pytest.raises(ConfigError, match="max_steps_per_epoch must be >= 0"):
        TrainConfig.from_pipeline(
            image_size=32,
            epochs=1,
            batch_size=8,
            learning_rate=1e-3,
            seed=0,
            base_model_uri="",
            val_fraction=0.15,
            test_fraction=0.15,
            max_steps_per_epoch=-1,
            patience=2,
        )
    with pytest.raises(ConfigError, match="lr must be > 0"):
        TrainConfig.from_pipeline(
            image_size=32,
            epochs=1,
            batch_size=8,
            learning_rate=0,
            seed=0,
            base_model_uri="",
            val_fraction=0.15,
            test_fraction=0.15,
            max_steps_per_epoch=0,
            patience=2,
        )
