"""Execution backends of the predictor: torch on CPU/GPU, and the OpenCL engine (FPGA, GPU, CPU).

A backend knows its input geometry and its image configuration, renders constituents with the
training-time :class:`~components.images.ImageConfig`, and turns an image batch into class
probabilities. The predictor and the batcher never look further than this interface.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from components.errors import ConfigError, TaggerError
from components.images import ImageConfig, three_channels
from components.model_store import fetch_model_dir

log = logging.getLogger("serving.backends")
BACKENDS = ("torch", "opencl")


class Backend(ABC):
    """Runs the tagger on one device; ``predict`` is called from one thread at a time."""

    description: str
    channels: int
    image_config: ImageConfig
    max_batch_size: int | None = None  # a device-imposed cap, if any

    @property
    def image_size(self) -> int:
        return self.image_config.image_size

    def render(self, constituents: np.ndarray) -> np.ndarray:
        """Constituents [N, 200, 4] -> images [N, C, S, S], exactly as in training."""
        try:
            images = self.image_config.render(constituents)
        except TaggerError as exc:
            from kserve.errors import InvalidInput

            raise InvalidInput(f"input 'constituents': {exc}") from None
        return three_channels(images) if self.channels == 3 else images

    @abstractmethod
    def predict(self, images: np.ndarray) -> np.ndarray:
        """Images float32 [N, C, S, S] -> probabilities float32 [N, 2] (qcd, top)."""


class TorchBackend(Backend):
    def __init__(self, model_dir: Path, device: str | None = None, threads: int | None = None) -> None:
        import torch

        from components.model import load_tagger

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if threads:
            torch.set_num_threads(threads)
        tagger = load_tagger(model_dir)
        self.model = tagger.model.to(self.device).eval()
        self.image_config = tagger.image_config
        self.channels = tagger.in_channels
        self.description = f"torch on {self.device}"
        self._torch = torch

    def predict(self, images: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            batch = torch.from_numpy(np.ascontiguousarray(images)).to(self.device, non_blocking=True)
            return torch.softmax(self.model(batch), dim=1).float().cpu().numpy()


class OpenCLBackend(Backend):
    def __init__(self, model_dir: Path, device: str | None = None) -> None:
        from components.model import read_tagger_config
        from fpga_runtime import Engine

        config = read_tagger_config(model_dir)
        package = model_dir / "opencl"
        if not (package / "plan.json").exists():
            raise ConfigError(f"{model_dir}: no OpenCL package (opencl/plan.json); export it with fpga_runtime.export")
        self.engine = Engine.from_package(package, device=device)
        self.image_config = config.image_config
        self.channels = config.in_channels
        self.max_batch_size = getattr(self.engine, "max_batch_size", None)
        self.description = f"opencl on {self.engine.device_description}"

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self.engine.predict(np.ascontiguousarray(images, dtype=np.float32))


def load_backend(model_uri: str, backend: str = "torch", fallback: str | None = None) -> Backend:
    """Fetch the model at ``model_uri`` and build the named backend (or the fallback, if given)."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    model_dir = fetch_model_dir(model_uri)
    try:
        return _build(backend, model_dir)
    except TaggerError as exc:
        if not fallback or fallback == backend:
            raise
        log.warning("backend %s unavailable (%s); falling back to %s", backend, exc, fallback)
        return _build(fallback, model_dir)


def _build(backend: str, model_dir: Path) -> Backend:
    if backend == "torch":
        return TorchBackend(model_dir)
    return OpenCLBackend(model_dir)
