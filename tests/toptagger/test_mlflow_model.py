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
    """Zero rows of an input's shape (the model's metadata states the shapes): the old stand-in for an unused input."""
    (tensor,) = [t for t in pyfunc.metadata.metadata["tensors"]["inputs"] if t["name"] == name]
    return np.zeros((0, *tensor["shape"][1:]), np.float32)


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


def test_either_input_alone_or_a_bare_array_of_constituents_gives_the_two_input_calls_answers(
    pyfunc: Any, tagger: JetTagger, served_jets: np.ndarray
) -> None:
    images = images_of(tagger, served_jets)
    by_constituents = pyfunc.predict({CONSTITUENTS: served_jets, IMAGES: no_rows(pyfunc, IMAGES)})
    by_images = pyfunc.predict({IMAGES: images, CONSTITUENTS: no_rows(pyfunc, CONSTITUENTS)})
    for call, expected in [
        (served_jets, by_constituents),  # a bare [N, 200, 4] array is constituents
        ({CONSTITUENTS: served_jets}, by_constituents),
        ({IMAGES: images}, by_images),
        (served_jets.astype(np.float16), pyfunc.predict(served_jets.astype(np.float16).astype(np.float32))),
        (served_jets[:3].tolist(), by_constituents[:3]),  # nested lists, as JSON gives them
    ]:
        answer = pyfunc.predict(call)
        assert answer.dtype == np.float32
        np.testing.assert_array_equal(answer, expected)
    both = pyfunc.predict({IMAGES: images[:4], CONSTITUENTS: served_jets[4:]})
    np.testing.assert_array_equal(both, np.concatenate([by_images[:4], by_constituents[4:]]))


F32, F64 = np.float32, np.float64


@pytest.mark.parametrize(
    ("call", "message"),
    [
        ({}, r"no input: give 'images', 'constituents' or both"),
        ({CONSTITUENTS: None}, r"no input: give 'images', 'constituents' or both"),
        ({"jets": 1, CONSTITUENTS: 2}, r"unknown inputs \['jets'\]: the top tagger takes 'images' and/or 'c"),
        (np.zeros((2, 100, 4), F32), r"a bare array is read as 'constituents' \(pass images as \{'images': \.\.\.\}\): "
         r"'constituents' must be float32 \[N, 200, 4\] \(E, px, py, pz\), got shape \[2, 100, 4\]"),
        (np.zeros((2, 1, 32, 32), F32), r"a bare array is read as 'constituents'.*got shape \[2, 1, 32, 32\]"),
        ({CONSTITUENTS: np.zeros((2, 200, 3), F32)}, r"'constituents' must be .*got shape \[2, 200, 3\]"),
        ({IMAGES: np.zeros((2, 3, 16, 16), F32)}, r"'images' must be float32 \[N, \d+, 32, 32\], got shape \[2, 3, "),
        ({CONSTITUENTS: np.zeros((2, 200, 4), F64)}, r"'constituents'.*: dtype float64 does not cast safely to"),
        ({CONSTITUENTS: np.zeros((2, 200, 4), np.int64)}, r"dtype int64 does not cast safely to float32"),
        ({IMAGES: np.array([["a"]])}, r"'images'.*: dtype <U1 does not cast safely to float32"),
        ({CONSTITUENTS: [[[1.0, 2.0]], [[1.0]]]}, r"'constituents'.*: its nested lists are not a rectangular array of"),
        ({CONSTITUENTS: "jets"}, r"'constituents' must be float32 \[N, 200, 4\] \(E, px, py, pz\), got str"),
        ("jets", r"takes an array of constituents or a dict of arrays named 'images' and/or 'constituents', got str"),
    ],
)  # fmt: skip
def test_wrong_inputs_are_named(pyfunc: Any, call: Any, message: str) -> None:
    with pytest.raises(DataError, match=message):
        pyfunc.predict(call)


def test_mlflow_models_serve_takes_one_input_as_json(pyfunc: Any, served_jets: np.ndarray) -> None:
    from mlflow.pyfunc import scoring_server

    expected = pyfunc.predict(served_jets[:2])
    for inputs in (served_jets[:2].tolist(), {CONSTITUENTS: served_jets[:2].tolist()}):
        body = json.dumps({"inputs": inputs})
        response = scoring_server.invocations(body, "application/json", pyfunc, None)
        assert response.status == 200, response.response
        np.testing.assert_array_equal(np.asarray(json.loads(response.response)["predictions"], np.float32), expected)


def test_the_signature_is_the_served_tensors_and_the_example_is_a_real_jet_both_ways(
    pyfunc: Any, tagger: JetTagger, tmp_path: Path
) -> None:
    import mlflow
    from mlflow.types.schema import AnyType, Array, ColSpec

    served = Signature.of(tagger.config)
    signature = pyfunc.metadata.signature
    # Both inputs optional (MLflow's tensor specs cannot be): arrays nested as deep as the tensors.
    inputs = signature.inputs.inputs
    assert all(isinstance(s, ColSpec) and s.required is False for s in inputs)
    assert signature.inputs.optional_input_names() == [IMAGES, CONSTITUENTS] == [s.name for s in served.inputs]
    depth = {s.name: 0 for s in inputs}
    for s in inputs:
        element = s.type
        while isinstance(element, Array):
            element, depth[s.name] = element.dtype, depth[s.name] + 1
        assert isinstance(element, AnyType)  # float32: MLflow would refuse JSON's float64 for it
    assert depth == {spec.name: 1 + len(spec.dims) for spec in served.inputs}
    assert pyfunc.metadata.metadata["tensors"] == served.to_dict()  # shapes (batch axis -1) and FP32
    assert pyfunc.metadata._is_signature_from_type_hint()  # predict checks each call: MLflow passes it as it is
    assert [(s.name, s.shape) for s in signature.outputs.inputs] == [("probabilities", (-1, 2))]
    local = fetch_model_dir(CHAMPION_URI, cache=tmp_path).parents[1]  # the MLflow Model around the tagger folder
    example = mlflow.models.Model.load(local).load_input_example(str(local))  # nested lists, as in JSON
    arrays = {name: np.asarray(value, np.float32) for name, value in example.items()}
    assert arrays[CONSTITUENTS].shape == (1, 200, 4) and arrays[IMAGES].shape == (1, *served.inputs[0].dims)
    twice = pyfunc.predict(example)  # the same jet as an image and as constituents
    np.testing.assert_array_equal(twice, pyfunc.predict(arrays))
    constituents = np.concatenate([arrays[CONSTITUENTS]] * 2)
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
    constituents = np.concatenate([np.asarray(example[CONSTITUENTS], np.float32)] * 2)
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
