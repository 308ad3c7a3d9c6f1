"""Execution backends of the predictor: torch on CPU/GPU, and the OpenCL engine (FPGA, GPU, CPU).

A backend knows its input geometry and its image configuration, renders constituents with the
training-time :class:`~toptagger.images.ImageConfig`, and turns an image batch into class
probabilities. The predictor and the batcher never look further than this interface.

:data:`BACKENDS` maps each name to its class (as hls4ml's backend registry does): it is what
``--backend`` accepts, and a new runtime is one class and one entry here. Module imports stay
light (torch and pyopencl load with the backend that needs them), so ``python -m serving --help``
stays instant.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from toptagger.errors import ConfigError, TaggerError
from toptagger.model_uri import fetch_model_dir

if TYPE_CHECKING:
    from toptagger.images import ImageConfig

log = logging.getLogger("serving.backends")
OPENCL_PACKAGE = "opencl"  # the fpga_runtime export inside a model folder


class Backend(ABC):
    """Runs the tagger on one device; ``predict`` is called from one thread at a time."""

    kind: str  # its name in BACKENDS: what actually serves, which a fallback can make differ from the request
    description: str
    channels: int
    image_config: ImageConfig
    max_batch_size: int | None = None  # a device-imposed cap, if any
    precision: str = "fp32"  # what actually runs (auto resolves to one)

    @property
    def image_size(self) -> int:
        return self.image_config.image_size

    def serving(self) -> dict[str, str]:
        """What serves: backend, precision, and how they were chosen (auto's measurements, or asked for).

        The one description of the choice: ServerMetadata (``serving.server``) shows it, and
        ModelConfig's ``precision``/``selection`` parameters say the same.
        """
        selection = getattr(self, "selection", None) or self.description  # only the graph backends measure
        return {"backend": self.kind, "precision": self.precision, "selection": selection}

    def render(self, constituents: np.ndarray) -> np.ndarray:
        """Constituents [N, 200, 4] -> images [N, 1, S, S], exactly as in training."""
        try:
            return self.image_config.render(constituents)
        except TaggerError as exc:
            from kserve.errors import InvalidInput

            raise InvalidInput(f"input 'constituents': {exc}") from None

    @abstractmethod
    def predict(self, images: np.ndarray) -> np.ndarray:
        """Images float32 [N, C, S, S] (C = 1, or the model's 3) -> probabilities [N, 2] (qcd, top)."""

    def _model_channels(self, images: np.ndarray) -> np.ndarray:
        """1-channel images as the 3 identical channels a 3-channel network takes (a broadcast view)."""
        if images.shape[1] != self.channels:
            images = np.broadcast_to(images, (images.shape[0], self.channels, *images.shape[2:]))
        return np.ascontiguousarray(images, dtype=np.float32)


TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# What --precision accepts: torch's dtypes, int8 (the quantized graphs), and auto (the fastest
# precision this version admits on this CPU; serving.precision).
PRECISIONS = (*TORCH_DTYPES, "int8", "auto")


class TorchBackend(Backend):
    kind = "torch"

    def __init__(
        self, model_dir: Path, device: str | None = None, threads: int | None = None, precision: str = "fp32"
    ) -> None:
        import torch
        from torchvision.models.resnet import ResNet

        from toptagger.model import load_model

        if precision not in TORCH_DTYPES:
            choices = ", ".join(TORCH_DTYPES)
            raise ConfigError(f"torch backend: unknown precision {precision!r}; choose one of {choices}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if threads:
            torch.set_num_threads(threads)
        # Half precision is the GPU pool's setting (tensor cores); channels-last is the layout
        # cuDNN's half-precision convolutions run fastest in. The softmax is taken in float32.
        self.dtype = getattr(torch, TORCH_DTYPES[precision])
        self.model = load_model(model_dir).to(self.device, dtype=self.dtype).eval()
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.image_config = self.model.config.image
        self.channels = self.model.config.in_channels
        # 3-channel images (the paper's CMSSW producer sends 3 copies) go straight into the
        # ResNet; 1-channel images go through the tagger, which expands them as a view.
        self._forward_rgb = ResNet.forward.__get__(self.model)
        self.precision = precision
        self.description = f"torch on {self.device} ({precision})"
        self._torch = torch

    def predict(self, images: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            # Decoded request bodies are read-only buffers; torch wants writable memory.
            batch = torch.from_numpy(np.require(images, np.float32, ["C", "W"]))
            batch = batch.to(self.device, dtype=self.dtype, non_blocking=True)
            logits = self.model(batch) if batch.shape[1] == 1 else self._forward_rgb(batch)
            return torch.softmax(logits.float(), dim=1).cpu().numpy()


class OpenCLBackend(Backend):
    kind = "opencl"

    def __init__(self, model_dir: Path, device: str | None = None, precision: str = "fp32") -> None:
        from fpga_runtime import Engine
        from toptagger.model import read_config

        config = read_config(model_dir)
        package = model_dir / OPENCL_PACKAGE
        if not (package / "plan.json").exists():
            raise ConfigError(
                f"{model_dir}: no OpenCL package ({OPENCL_PACKAGE}/plan.json); "
                "export one with python -m fpga_runtime.export"
            )
        self.engine = Engine.from_package(package, device=device, precision=precision)
        self.image_config = config.image
        self.channels = self.engine.input_shape[0]
        self.max_batch_size = self.engine.max_batch_size
        self.precision = precision  # an fp16 package serves fp16: ServerMetadata and ModelConfig say so
        self.description = f"opencl ({precision}) on {self.engine.info.label()} ({self.engine.info.kind})"

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self.engine.predict(self._model_channels(images))


class GraphBackend(Backend):
    """An exported graph (fp32 ONNX, or the int8 graphs of ``quantized/``) on a CPU runtime.

    The precision must be one the version carries and, below fp32, one its evaluate step admitted
    (:mod:`serving.precision` refuses the others by name); ``auto`` measures the admitted ones at
    load and keeps the fastest. OpenVINO runs float32 unless asked otherwise: its default on bf16
    CPUs moved logits by 0.023, which is only served once the gate has measured it as ``bf16``.
    """

    runtimes: tuple[str, ...]

    def __init__(self, model_dir: Path, precision: str = "fp32") -> None:
        from serving.precision import select

        choice = select(model_dir, self.runtimes, precision)
        from toptagger.model import read_config

        config = read_config(model_dir)
        self._graph = choice.graph
        self.kind, self.precision = choice.runtime, choice.precision  # what serves, after auto
        self.image_config, self.channels = config.image, config.in_channels
        self.selection = choice.selection
        self.description = f"{choice.description}; {choice.selection}"

    def predict(self, images: np.ndarray) -> np.ndarray:
        from toptagger.onnx_export import softmax

        return softmax(np.asarray(self._graph(self._model_channels(images)))).astype(np.float32)


class OnnxRuntimeBackend(GraphBackend):
    """The exported graphs on ONNX Runtime's CPU provider, one intra-op thread per core of the limit."""

    kind = "onnxruntime"
    runtimes = ("onnxruntime",)


class OpenVINOBackend(GraphBackend):
    """The exported graphs compiled by OpenVINO for the CPU, latency hint, at the precision asked for."""

    kind = "openvino"
    runtimes = ("openvino",)


class AutoBackend(GraphBackend):
    """``--backend auto``: the runtime and precision that measure fastest here among those allowed.

    Which wins depends on the CPU (OpenVINO f32 beat torch by 1.13x on a Sapphire Rapids and by
    1.54x on an AMD EPYC; bf16 pays only with bf16 units), so it is measured on the node, at load.
    """

    kind = "auto"
    runtimes = ("openvino", "onnxruntime")

    def __init__(self, model_dir: Path, precision: str = "auto") -> None:
        super().__init__(model_dir, precision)


BACKENDS: dict[str, type[Backend]] = {
    "torch": TorchBackend,
    "onnxruntime": OnnxRuntimeBackend,
    "openvino": OpenVINOBackend,
    "opencl": OpenCLBackend,
    "auto": AutoBackend,
}


def load_backend(
    model_uri: str, backend: str = "torch", fallback: str | None = None, precision: str = "fp32"
) -> Backend:
    """Fetch the model at ``model_uri`` and build the named backend (or the fallback, if given).

    ``precision`` is the chosen backend's; a fallback runs in float32, the one precision every
    backend has.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    model_dir = fetch_model_dir(model_uri)
    try:
        return BACKENDS[backend](model_dir, precision=precision)
    except TaggerError as exc:
        if not fallback or fallback == backend:
            raise
        log.warning("backend %s unavailable (%s); falling back to %s", backend, exc, fallback)
        return BACKENDS[fallback](model_dir)
