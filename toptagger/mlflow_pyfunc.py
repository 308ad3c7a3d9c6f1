"""The tagger as an MLflow pyfunc: the code file that MLflow's "models from code" logs and runs.

MLflow executes this file when it loads a registered version (``mlflow.pyfunc.load_model``, ``mlflow
models serve``, KServe's MLflow runtime); nothing is unpickled. ``load_context`` rebuilds the tagger
from the safetensors weights and ``tagger.json`` among the MLflow Model's artifacts
(:func:`toptagger.model.load_model`), so it renders constituents with the image options it was
trained with.

Call pattern. Jets as constituents, float32 ``[N, 200, 4]`` (E, px, py, pz), alone or by name; jet
images ``[N, C, S, S]`` by name; or both, in one dict::

    model = mlflow.pyfunc.load_model("models:/top-tagger@champion")
    model.predict(jets)                                     # constituents [N, 200, 4]
    model.predict({"constituents": jets})
    model.predict({"images": images})                       # [N, C, S, S], the model's C and S
    model.predict({"images": images, "constituents": jets})

The result is float32 ``[N, 2]`` probabilities (qcd, top): one row per image, then one row per jet
of constituents. The signature names both inputs as optional (``required=False``; MLflow's tensor
specs cannot be optional, so they are column specs of nested arrays) and the shapes and dtype are in
the model's metadata (``model.metadata.metadata["tensors"]``, from :mod:`toptagger.signature`).
This module checks each call itself (:func:`served_inputs`): MLflow's own schema check would refuse
a bare array and turn a dict into a DataFrame. Arrays of another dtype are cast to float32 where
numpy casts safely; nested lists (JSON) are read as float32. Anything else raises a
:class:`toptagger.errors.DataError` that names the input and what is wrong with it. Over
``mlflow models serve`` the request is ``{"inputs": ...}`` holding any of the forms above as lists.
This module is not on the predictor's import path (the predictor reads the same files through
:func:`toptagger.model_uri.fetch_model_dir`).
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel

from toptagger.errors import DataError
from toptagger.model_uri import MLFLOW_TAGGER_ARTIFACT
from toptagger.signature import CONSTITUENTS, IMAGES, Signature, TensorSpec

BATCH_SIZE = 256  # images per forward pass, as score_jets batches constituents


def _shape(spec: TensorSpec) -> str:
    return "[" + ", ".join(["N", *(str(d) for d in spec.dims)]) + "]"


def _tensor(spec: TensorSpec, value: Any) -> np.ndarray:
    """``value`` as the float32 tensor ``spec`` names, or a DataError saying why it is not one."""
    what = f"{spec.name!r} must be float32 {_shape(spec)}" + (f" ({', '.join(spec.columns)})" if spec.columns else "")
    if isinstance(value, (list, tuple)):  # JSON (mlflow models serve) has lists, not arrays
        try:
            value = np.asarray(value, np.float32)
        except (TypeError, ValueError) as e:
            raise DataError(f"{what}: its nested lists are not a rectangular array of numbers ({e})") from None
    if not isinstance(value, np.ndarray):
        raise DataError(f"{what}, got {type(value).__name__}")
    if not np.can_cast(value.dtype, np.float32, "safe"):
        raise DataError(f"{what}: dtype {value.dtype} does not cast safely to float32")
    dims = value.shape[1:]
    if value.ndim != len(spec.dims) + 1 or any(d not in (-1, got) for d, got in zip(spec.dims, dims, strict=True)):
        raise DataError(f"{what}, got shape {list(value.shape)}")
    return np.require(value, np.float32, ["C"])


def served_inputs(signature: Signature, model_input: Any) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(images, constituents) of a call, each checked against ``signature`` (None where not given)."""
    specs = {spec.name: spec for spec in signature.inputs}
    if not isinstance(model_input, dict):  # a bare array: constituents
        if isinstance(model_input, (np.ndarray, list, tuple)):
            try:
                return None, _tensor(specs[CONSTITUENTS], model_input)
            except DataError as e:
                raise DataError(
                    f"a bare array is read as {CONSTITUENTS!r} (pass images as {{{IMAGES!r}: ...}}): {e}"
                ) from None
        raise DataError(
            f"the top tagger takes an array of constituents or a dict of arrays named {IMAGES!r} and/or "
            f"{CONSTITUENTS!r}, got {type(model_input).__name__}"
        )
    if unknown := sorted(map(str, set(model_input) - set(specs))):
        raise DataError(f"unknown inputs {unknown}: the top tagger takes {IMAGES!r} and/or {CONSTITUENTS!r}")
    given = {name: _tensor(specs[name], value) for name, value in model_input.items() if value is not None}
    if not given:
        raise DataError(f"no input: give {IMAGES!r}, {CONSTITUENTS!r} or both")
    return given.get(IMAGES), given.get(CONSTITUENTS)


class TopTaggerPyfunc(PythonModel):
    """Probabilities [N, 2] (qcd, top) for jet images and for constituents."""

    def load_context(self, context: Any) -> None:
        from toptagger.model import load_model

        self.tagger = load_model(context.artifacts[MLFLOW_TAGGER_ARTIFACT])

    # No type hints: MLflow would read them as a second signature (and warn that it cannot).
    def predict(self, context, model_input, params=None):
        images, constituents = served_inputs(Signature.of(self.tagger.config), model_input)
        return np.concatenate([self._images(images), self._constituents(constituents)]).astype(np.float32)

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
