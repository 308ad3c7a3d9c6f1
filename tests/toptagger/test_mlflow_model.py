"""A registered version as an MLflow Model, on a real SQLite store: MLflow loads and runs it, the predictor reads it.

Real parts: a seeded ResNet-50 tagger with its ONNX graph (as the train step writes it), Pythia8
jets, MLflow's own ``mlflow.pyfunc.load_model`` on ``models:/`` URIs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from tests.tolerances import tagger_probability_bound
from tests.toptagger.conftest import local_store
from toptagger import mlflow_model, registry
from toptagger.constants import CHAMPION_URI, MODEL_NAME
from toptagger.errors import DataError, StorageError
from toptagger.jets.dataset import JetBatch
from toptagger.model import JetTagger, TaggerConfig, load_model, score_jets
from toptagger.model_uri import fetch_model_dir
from toptagger.signature import CONSTITUENTS, IMAGES, Signature


@pytest.fixture(scope="module")
def registered(
    onnx_model_dir: Path, small_jets: JetBatch, empty_db: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """The tagger logged as the MLflow Model of a run and registered as the champion."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        local_store(tmp_path_factory.mktemp("mlflow-model"), monkeypatch, empty_db)
        run_id = registry.find_or_create_run("exp", "p1")
        model_id = mlflow_model.log_tagger(run_id, onnx_model_dir, small_jets.constituents)
        version = registry.register_version(MODEL_NAME, run_id, mlflow_model.uri(model_id), 0.9)
        registry.promote(MODEL_NAME, version, 0.9)
        yield {"run_id": run_id, "model_id": model_id, "version": version}


@pytest.fixture(scope="module")
def tagger(onnx_model_dir: Path) -> JetTagger:
    with torch.random.fork_rng(devices=[]):
        return load_model(onnx_model_dir)


@pytest.fixture(scope="module")
def pyfunc(registered: dict[str, Any]) -> Any:
    import mlflow

    return mlflow.pyfunc.load_model(CHAMPION_URI)


@pytest.fixture(scope="module")
def served_jets(small_jets: JetBatch) -> np.ndarray:
    """The first six top and six QCD jets, padded to the served 200 slots (the shared ``jets``: 6, seeded)."""
    rows = np.r_[np.flatnonzero(small_jets.labels == 1)[:6], np.flatnonzero(small_jets.labels == 0)[:6]]
    return mlflow_model.served_constituents(small_jets.constituents[rows])


def no_rows(pyfunc: Any, name: str) -> np.ndarray:
    """The documented stand-in for the input a call does not use: zero rows of its shape."""
    shape = pyfunc.metadata.get_input_schema().input_dict()[name].shape
    return np.zeros((0, *shape[1:]), np.float32)


def images_of(tagger: JetTagger, constituents: np.ndarray) -> np.ndarray:
    images = tagger.config.image.render(constituents)
    return np.ascontiguousarray(np.broadcast_to(images, (len(images), tagger.config.in_channels, *images.shape[2:])))


def assert_within_rounding(tagger: JetTagger, constituents: np.ndarray, top: np.ndarray, reference: np.ndarray) -> None:
    """Two float32 evaluations of the same network on the same jets (other batches, other processes)."""
    bound = tagger_probability_bound(tagger, images_of(tagger, constituents), constituents)[:, 1]
    excess = np.abs(top.astype(np.float64) - reference) / bound
    assert (excess <= 1).all(), f"differences up to {excess.max():.3g} times the float32 rounding bound"


def test_the_champion_predicts_constituents_as_score_jets_does(
    pyfunc: Any, tagger: JetTagger, served_jets: np.ndarray
) -> None:
    probabilities = pyfunc.predict({CONSTITUENTS: served_jets, IMAGES: no_rows(pyfunc, IMAGES)})
    assert probabilities.dtype == np.float32 and probabilities.shape == (len(served_jets), 2)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=0, atol=2 * np.finfo(np.float32).eps)
    assert_within_rounding(tagger, served_jets, probabilities[:, 1], score_jets(tagger, served_jets))


def test_images_are_classified_as_their_jets_and_rows_come_images_first(
    pyfunc: Any, tagger: JetTagger, served_jets: np.ndarray
) -> None:
    images = images_of(tagger, served_jets)
    alone = pyfunc.predict({IMAGES: images, CONSTITUENTS: no_rows(pyfunc, CONSTITUENTS)})
    assert alone.shape == (len(served_jets), 2)
    assert_within_rounding(tagger, served_jets, alone[:, 1], score_jets(tagger, served_jets))
    both = pyfunc.predict({IMAGES: images[:4], CONSTITUENTS: served_jets[4:]})
    assert both.shape == (len(served_jets), 2)
    assert_within_rounding(tagger, served_jets, both[:, 1], score_jets(tagger, served_jets))


def test_a_call_without_every_named_input_is_refused_by_mlflow(pyfunc: Any, served_jets: np.ndarray) -> None:
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match=r"Model is missing inputs \['images'\]"):
        pyfunc.predict({CONSTITUENTS: served_jets})
    with pytest.raises(MlflowException, match="does not match expected shape"):
        pyfunc.predict({CONSTITUENTS: served_jets[:, :100], IMAGES: no_rows(pyfunc, IMAGES)})


def test_the_signature_is_the_served_tensors_and_the_example_is_a_real_jet_both_ways(
    pyfunc: Any, tagger: JetTagger, tmp_path: Path
) -> None:
    import mlflow

    served = Signature.of(tagger.config)
    signature = pyfunc.metadata.signature
    assert [(s.name, s.shape, str(s.type)) for s in signature.inputs.inputs] == [
        (spec.name, (-1, *spec.dims), "float32") for spec in served.inputs
    ]
    assert [(s.name, s.shape) for s in signature.outputs.inputs] == [("probabilities", (-1, 2))]
    local = fetch_model_dir(CHAMPION_URI, cache=tmp_path).parents[1]  # the MLflow Model around the tagger folder
    example = mlflow.models.Model.load(local).load_input_example(str(local))
    assert example[CONSTITUENTS].shape == (1, 200, 4) and example[IMAGES].shape == (1, *served.inputs[0].dims)
    twice = pyfunc.predict(example)  # the same jet as an image and as constituents
    constituents = np.concatenate([example[CONSTITUENTS]] * 2)
    assert_within_rounding(tagger, constituents, twice[:, 1], score_jets(tagger, constituents))


def test_the_model_is_code_and_safetensors_and_the_predictor_reads_its_tagger_folder(
    registered: dict[str, Any], onnx_model_dir: Path, tmp_path: Path
) -> None:
    folder = fetch_model_dir(CHAMPION_URI, cache=tmp_path / "cache")  # what python -m serving loads
    # MLflow keeps the folder's name: artifacts/model/ for the train step's model/ folder.
    assert folder.parts[-2:] == ("artifacts", onnx_model_dir.name)
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in onnx_model_dir.iterdir())
    model = folder.parent.parent
    meta = yaml.safe_load((model / "MLmodel").read_text())["flavors"]["python_function"]
    assert meta["loader_module"] == "mlflow.pyfunc.loaders.code_model" and "python_model" not in meta
    assert not list(model.rglob("*.pkl")), "nothing pickled"
    assert (model / "code" / "toptagger" / "model.py").is_file()  # loads without this checkout
    requirements = (model / "requirements.txt").read_text().split()
    assert {r.split("==")[0] for r in requirements} == set(mlflow_model.REQUIREMENTS)
    with torch.random.fork_rng(devices=[]):
        assert load_model(CHAMPION_URI).config.image.image_size == 32  # toptagger.model's own loader


def test_mlflow_loads_the_model_without_this_checkout(pyfunc: Any, tagger: JetTagger, tmp_path: Path) -> None:
    model = fetch_model_dir(CHAMPION_URI, cache=tmp_path / "cache").parents[1]
    probe = (
        "import json, sys, mlflow\n"
        "model = mlflow.pyfunc.load_model(sys.argv[1])\n"
        "example = model.metadata.load_input_example(sys.argv[1])\n"
        "print(json.dumps([sys.modules['toptagger'].__file__, model.predict(example).tolist()]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI")}
    result = subprocess.run([sys.executable, "-c", probe, str(model)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    library, probabilities = json.loads(result.stdout.strip().splitlines()[-1])
    assert library == str(model / "code" / "toptagger" / "__init__.py")  # the copy inside the model
    example = pyfunc.metadata.load_input_example(str(model))
    expected = pyfunc.predict(example)  # the same code and weights, in another process (other threads)
    constituents = np.concatenate([example[CONSTITUENTS]] * 2)
    assert_within_rounding(tagger, constituents, np.asarray(probabilities)[:, 1], expected[:, 1].astype(np.float64))


def test_a_retried_task_reuses_the_logged_model_but_not_a_failed_one(
    registered: dict[str, Any], onnx_model_dir: Path, small_jets: JetBatch
) -> None:
    client = registry.client()
    run_id = registered["run_id"]
    assert mlflow_model.log_tagger(run_id, onnx_model_dir, small_jets.constituents) == registered["model_id"]
    other = registry.find_or_create_run("exp", "p2")
    experiment = client.get_run(other).info.experiment_id
    failed = client.create_logged_model(experiment, name=MODEL_NAME, source_run_id=other)
    client.finalize_logged_model(failed.model_id, "FAILED")  # an upload that broke off
    assert mlflow_model.find_logged(other) is None


def test_bad_folders_and_jets_are_named(registered: dict[str, Any], tmp_path: Path) -> None:
    run_id = registry.find_or_create_run("exp", "p3")
    with pytest.raises(StorageError, match=rf"{tmp_path}: no tagger.json beside the weights"):
        mlflow_model.log_tagger(run_id, tmp_path, np.zeros((1, 200, 4), np.float32))
    with pytest.raises(DataError, match=r"constituents must be \[N, M <= 200, 4\], got \[2, 201, 4\]"):
        mlflow_model.served_constituents(np.zeros((2, 201, 4), np.float32))
    with pytest.raises(DataError, match="no jet to make the MLflow Model's input example from"):
        mlflow_model.input_example(TaggerConfig(), np.zeros((0, 200, 4), np.float32))
