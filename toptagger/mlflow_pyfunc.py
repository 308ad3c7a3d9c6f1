"""The tagger as an MLflow pyfunc: the code file that MLflow's "models from code" logs and runs.

MLflow executes this file when it loads a registered version (``mlflow.pyfunc.load_model``, ``mlflow
models serve``, KServe's MLflow runtime); nothing is unpickled. ``load_context`` rebuilds the tagger
from the safetensors weights and ``tagger.json`` among the MLflow Model's artifacts
(:func:`toptagger.model.load_model`), so it renders constituents with the image options it was
trained with.

Call pattern. The signature names both served tensors (:mod:`toptagger.signature`), and MLflow
requires every named tensor of a tensor signature in each call, so a call passes a dict holding
both; the one not used holds zero rows::

    model = mlflow.pyfunc.load_model("models:/top-tagger@champion")
    images = model.metadata.get_input_schema().input_dict()["images"].shape   # (-1, C, S, S)
    model.predict({"constituents": jets, "images": np.zeros((0, *images[1:]), np.float32)})

The result is float32 ``[N, 2]`` probabilities (qcd, top): one row per image, then one row per jet
of constituents. Over the v2 protocol (KServe's MLflow runtime) the unused input is a tensor of
shape ``[0, ...]``, which v2 can state (not tried here: no MLServer in this environment). MLflow's
own JSON format (``mlflow models serve``) cannot: ``[]`` parses as shape ``(0,)``, which the
signature refuses, so there both inputs need rows. This module is not on the predictor's import
path (the predictor reads the same files through :func:`toptagger.model_uri.fetch_model_dir`).
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel

from toptagger.errors import DataError
from toptagger.model_uri import MLFLOW_TAGGER_ARTIFACT
from toptagger.signature import CONSTITUENTS, IMAGES

BATCH_SIZE = 256  # images per forward pass, as score_jets batches constituents


class TopTaggerPyfunc(PythonModel):
    """Probabilities [N, 2] (qcd, top) for jet images and for constituents."""

    def load_context(self, context: Any) -> None:
        from toptagger.model import load_model

        self.tagger = load_model(context.artifacts[MLFLOW_TAGGER_ARTIFACT])

    # No type hints: MLflow would read them as a second signature (and warn that it cannot).
    def predict(self, context, model_input, params=None):
        if not isinstance(model_input, dict):
            raise DataError(
                f"the top tagger takes a dict of arrays named {IMAGES!r} and {CONSTITUENTS!r}, "
                f"got {type(model_input).__name__}"
            )
        parts = [self._images(model_input.get(IMAGES)), self._constituents(model_input.get(CONSTITUENTS))]
        return np.concatenate(parts).astype(np.float32)

    def _images(self, images: np.ndarray | None) -> np.ndarray:
        import torch
        from torchvision.models.resnet import ResNet

        if images is None or not len(images):
            return np.zeros((0, 2))
        out = []
        with torch.inference_mode():
            for start in range(0, len(images), BATCH_SIZE):
                batch = torch.from_numpy(np.require(images[start : start + BATCH_SIZE], np.float32, ["C", "W"]))
                # Images with the network's own channels skip the tagger's 1-channel expansion,
                # as the predictor and the ONNX graph do.
                out.append(torch.softmax(ResNet.forward(self.tagger, batch).double(), dim=1).numpy())
        return np.concatenate(out)

    def _constituents(self, constituents: np.ndarray | None) -> np.ndarray:
        from toptagger.model import score_jets

        if constituents is None or not len(constituents):
            return np.zeros((0, 2))
        top = score_jets(self.tagger, constituents, batch_size=BATCH_SIZE)  # renders through jet_images
        return np.stack([1.0 - top, top], axis=1)


mlflow.models.set_model(TopTaggerPyfunc())
