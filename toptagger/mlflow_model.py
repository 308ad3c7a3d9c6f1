"""Each registered version as an MLflow Model: signature, input example, a pyfunc from code, the tagger's files.

The register step logs the model folder the train step wrote (``model.safetensors``,
``tagger.json``, ``model.onnx``, ``opencl/``) as the artifact ``model`` of an MLflow Model
(``artifacts/model/`` in it: MLflow keeps the folder's name) whose ``python_function`` flavor is
:mod:`toptagger.mlflow_pyfunc`, logged as "models from code": MLflow keeps that file and runs it
on loading, so nothing is pickled, and the weights are read with safetensors. The library travels
inside the model (``code/toptagger``), so MLflow's own tools load it without this checkout; the
packages it needs are pinned to the versions installed here.

The same files serve both ways: ``mlflow.pyfunc.load_model("models:/top-tagger@champion")``, and
``python -m serving --model-uri models:/top-tagger@champion``, which opens the MLflow Model to its
``artifacts/model`` folder (:func:`toptagger.model_uri.tagger_folder`).
"""

from __future__ import annotations

import logging
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

from toptagger import registry
from toptagger.constants import FOUR_VECTOR, MODEL_NAME, N_CONSTITUENTS
from toptagger.errors import DataError
from toptagger.model import TaggerConfig, read_config
from toptagger.model_uri import MLFLOW_TAGGER_ARTIFACT, REGISTRY_SCHEME
from toptagger.signature import CONSTITUENTS, DATATYPE, IMAGES, Signature, TensorSpec

log = logging.getLogger(__name__)

PYFUNC_CODE = Path(__file__).with_name("mlflow_pyfunc.py")
LIBRARY = Path(__file__).parent
# What the pyfunc imports (itself and through toptagger.model): pinned in the model's requirements.
REQUIREMENTS = ("mlflow", "numpy", "torch", "torchvision", "safetensors")
NUMPY_TYPES = {"FP32": np.float32}


def model_signature(tagger: TaggerConfig) -> Any:
    """The MLflow signature of the served tensors (:class:`toptagger.signature.Signature`): both inputs optional.

    MLflow's tensor specs are always required, so the inputs are column specs with ``required=False``:
    arrays nested as deep as the tensors, batch axis included, of any element (MLflow checks a
    float32 element by casting JSON's float64, which it refuses as unsafe); the shapes and dtypes
    are in the model's metadata (:func:`model_metadata`). The output stays a tensor spec, batch axis -1.

    The signature is marked as one that the model checks itself, as MLflow marks those it infers
    from ``predict``'s type hints: MLflow then hands each call to ``predict`` as it is
    (:func:`toptagger.mlflow_pyfunc.served_inputs` checks it). MLflow's own check would refuse a
    bare ``[N, 200, 4]`` array (it makes a DataFrame of it) and turn a dict into a DataFrame.
    """
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, Array, ColSpec, Schema
    from mlflow.types.schema import TensorSpec as MlflowTensorSpec

    def nested(spec: TensorSpec) -> Any:
        element: Any = AnyType()
        for _ in range(len(spec.dims) + 1):
            element = Array(element)
        return element

    dtype = np.dtype(NUMPY_TYPES[DATATYPE])
    served = Signature.of(tagger)
    signature = ModelSignature(
        inputs=Schema([ColSpec(nested(spec), spec.name, required=False) for spec in served.inputs]),
        outputs=Schema([MlflowTensorSpec(dtype, (-1, *spec.dims), spec.name) for spec in served.outputs]),
    )
    signature._is_signature_from_type_hint = True  # MLmodel's is_signature_from_type_hint: predict checks
    return signature


def model_metadata(tagger: TaggerConfig) -> dict[str, Any]:
    """The MLflow Model's ``metadata``: the served tensors with their shapes, as the v2 protocol states them."""
    return {"tensors": Signature.of(tagger).to_dict()}


def served_constituents(constituents: np.ndarray) -> np.ndarray:
    """Jets ``[N, M, 4]`` (the compact files trim padding) as the served float32 ``[N, 200, 4]``."""
    if constituents.ndim != 3 or constituents.shape[2] != len(FOUR_VECTOR) or constituents.shape[1] > N_CONSTITUENTS:
        raise DataError(
            f"constituents must be [N, M <= {N_CONSTITUENTS}, {len(FOUR_VECTOR)}], got {list(constituents.shape)}"
        )
    out = np.zeros((len(constituents), N_CONSTITUENTS, len(FOUR_VECTOR)), np.float32)
    out[:, : constituents.shape[1]] = constituents
    return out


def input_example(tagger: TaggerConfig, constituents: np.ndarray) -> dict[str, np.ndarray]:
    """The first of ``constituents``, both as constituents and as the image the tagger renders from them.

    Its prediction (two rows, the same jet twice) checks that both inputs reach the same network.
    """
    if not len(constituents):
        raise DataError("no jet to make the MLflow Model's input example from")
    jet = served_constituents(constituents[:1])
    image = tagger.image.render(jet)
    images = np.ascontiguousarray(np.broadcast_to(image, (1, tagger.in_channels, *image.shape[2:])))
    return {IMAGES: images, CONSTITUENTS: jet}


def requirements() -> list[str]:
    """``package==version`` of what the pyfunc imports, as installed here."""
    return [f"{name}=={version(name)}" for name in REQUIREMENTS]


def uri(model_id: str) -> str:
    """The URI of a logged MLflow Model: what a registered version's ``source`` is."""
    return f"{REGISTRY_SCHEME}{model_id}"


def _experiment(run_id: str) -> str:
    mlflow_client = registry.client()
    return str(registry.mlflow_call(f"reading run {run_id}", mlflow_client.get_run, run_id).info.experiment_id)


def find_logged(run_id: str) -> str | None:
    """The id of the finished MLflow Model that ``run_id`` logged, if any (a retried task reuses it)."""
    from mlflow.entities import LoggedModelStatus

    found = registry.mlflow_call(
        "searching logged models",
        registry.client().search_logged_models,
        [_experiment(run_id)],
        # The SQL store does not filter on status (it stores a number): that is checked here.
        filter_string=f"source_run_id = '{run_id}' AND name = '{MODEL_NAME}'",
    )
    ready = [m for m in found if m.status == LoggedModelStatus.READY]
    return str(min(ready, key=lambda m: m.creation_timestamp).model_id) if ready else None


def log_tagger(run_id: str, model_dir: str | Path, example_jets: np.ndarray) -> str:
    """Log ``model_dir`` as the MLflow Model of ``run_id`` (once); returns its model id.

    A model that a failed attempt left unfinished is not READY and is not reused.
    """
    found = find_logged(run_id)
    if found is not None:
        log.info("run %s already logged MLflow Model %s: not logging again", run_id, found)
        return found
    import mlflow.pyfunc
    from mlflow.models import Model

    model_dir = Path(model_dir)
    tagger = read_config(model_dir)  # a StorageError naming the folder if it holds no tagger
    # Created here, in the run's experiment: left to itself, Model.log would put it in the
    # active (default) experiment, whose artifacts are wherever the task happens to run.
    created = registry.mlflow_call(
        "creating a logged model",
        registry.client().create_logged_model,
        _experiment(run_id),
        name=MODEL_NAME,
        source_run_id=run_id,
    )
    registry.mlflow_call(
        f"logging the MLflow Model of {model_dir}",
        Model.log,
        artifact_path=None,  # deprecated in MLflow 3: the model has a name instead
        flavor=mlflow.pyfunc,
        run_id=run_id,
        model_id=created.model_id,
        python_model=str(PYFUNC_CODE),
        artifacts={MLFLOW_TAGGER_ARTIFACT: str(model_dir)},
        code_paths=[str(LIBRARY)],
        signature=model_signature(tagger),
        metadata=model_metadata(tagger),
        # As nested lists: MLflow would read an example of arrays back through the signature as
        # float64 arrays, which predict refuses; lists come back as they are, read as float32.
        input_example={name: array.tolist() for name, array in input_example(tagger, example_jets).items()},
        pip_requirements=requirements(),
    )
    return str(created.model_id)
