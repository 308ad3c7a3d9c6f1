"""Shared fixtures: a random-init resnet50 with non-trivial batch-norm statistics, exported once.

Engines are built with probe=False except in the tests of the probe itself: the probe spawns a
child process per precision, which would dominate the run time here.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from fpga_runtime import synthetic
from fpga_runtime.devices import ensure_pocl_cache
from fpga_runtime.engine import Engine
from fpga_runtime.export import export_model

IMAGE_SIZE = 32

ensure_pocl_cache()


def jet_images(n: int, size: int = IMAGE_SIZE, channels: int = 3, seed: int = 0) -> np.ndarray:
    return synthetic.jet_images(n, size, channels, seed)


def random_images(n: int, size: int = IMAGE_SIZE, channels: int = 3, seed: int = 0) -> np.ndarray:
    return synthetic.random_images(n, size, channels, seed)


@pytest.fixture(scope="session")
def model50() -> torch.nn.Module:
    return synthetic.random_tagger()


@pytest.fixture(scope="session")
def pkg50(model50: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    calib = np.concatenate([jet_images(8, seed=10), random_images(8, seed=11)])
    return export_model(
        model50,
        tmp_path_factory.mktemp("pkg") / "resnet50",
        ["fp32", "fp16", "int8", "bfp8"],
        image_size=IMAGE_SIZE,
        calibration=calib,
    )


@pytest.fixture(scope="session")
def engine50(pkg50: Path) -> Callable[[str], Engine]:
    """Engines on the exported resnet50, one per precision, built on first use."""
    cache: dict[str, Engine] = {}

    def get(precision: str) -> Engine:
        if precision not in cache:
            cache[precision] = Engine.from_package(
                pkg50, precision=precision, probe=False, allow_fp16_emulation=True, max_batch_size=8
            )
        return cache[precision]

    return get
