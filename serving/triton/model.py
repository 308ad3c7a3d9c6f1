"""The tagger as a model of Triton's Python backend: what ``serving.triton.repository`` installs.

Copied to ``<repository>/top-tagger/1/model.py``. It runs one of this project's backends
(:data:`serving.backends.BACKENDS`: OpenVINO, ONNX Runtime, torch, OpenCL) on the model folder
beside it, so a site that already runs Triton (CMSSW's SONIC servers) serves the same network with
the same preprocessing: ``constituents`` are rendered by the one ``jet_images``.

Triton's dynamic batcher hands ``execute`` several requests at once; the valid ones are run as one
batch per input kind, and a request that fails its checks gets its own INVALID_ARG answer without
failing the others.

Tensors cross the stub through DLPack, not ``as_numpy()``/``Tensor(name, ndarray)``: the stub in
the ``nvidia-pytriton`` wheel is built against numpy 1, and under numpy 2 it misreads an array's
descriptor (Triton then answers "output tensor shape does not match size of output").
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

IMAGES, CONSTITUENTS, OUTPUT = "images", "constituents", "probabilities"
MODEL_FOLDER = "tagger"  # inside the version folder, beside model.py


class TritonPythonModel:
    """Triton's Python-backend interface: ``initialize``, ``execute``, ``finalize``."""

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        # The stub does not see PYTHONPATH: where this project is not installed in Triton's
        # Python, the repository names its checkout.
        for folder in reversed([p for p in parameters.get("python_path", "").split(":") if p]):
            if folder not in sys.path:
                sys.path.insert(0, folder)
        from serving.backends import BACKENDS

        model_dir = Path(args["model_repository"]) / args["model_version"] / MODEL_FOLDER
        # A precision only where the repository names one (int8, bf16): else the backend's default.
        precision = {"precision": parameters["precision"]} if "precision" in parameters else {}
        self.backend = BACKENDS[parameters["backend"]](model_dir, **precision)

    def execute(self, requests: list[Any]) -> list[Any]:
        import triton_python_backend_utils as pb_utils

        from toptagger.errors import TaggerError

        answers: list[Any] = [None] * len(requests)
        images: list[tuple[int, np.ndarray]] = []
        for position, request in enumerate(requests):
            try:
                images.append((position, self._images(request, pb_utils)))
            except (TaggerError, ValueError) as exc:
                answers[position] = _error(pb_utils, str(exc))
        if images:
            probabilities = self.backend.predict(np.concatenate([array for _, array in images]))
            start = 0
            for position, array in images:
                rows = np.ascontiguousarray(probabilities[start : start + len(array)])
                start += len(array)
                answers[position] = pb_utils.InferenceResponse([_tensor(pb_utils, OUTPUT, rows)])
        return answers

    def _images(self, request: Any, pb_utils: Any) -> np.ndarray:
        given = {}
        for name in (IMAGES, CONSTITUENTS):
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is not None:
                given[name] = _array(tensor)
        if len(given) != 1:
            raise ValueError(f"send exactly one input, '{IMAGES}' or '{CONSTITUENTS}'; got {sorted(given)}")
        ((name, array),) = given.items()
        if name == CONSTITUENTS:
            return self.backend.render(array)  # checks NaN, inf and overflowing momenta
        if not np.isfinite(array).all():
            raise ValueError(f"input '{IMAGES}' contains NaN or Inf")
        return array

    def finalize(self) -> None:
        self.backend = None


def _array(tensor: Any) -> np.ndarray:
    import torch

    return torch.from_dlpack(tensor.to_dlpack()).numpy()


def _tensor(pb_utils: Any, name: str, array: np.ndarray) -> Any:
    import torch

    return pb_utils.Tensor.from_dlpack(name, torch.utils.dlpack.to_dlpack(torch.from_numpy(array)))


def _error(pb_utils: Any, message: str) -> Any:
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG))
