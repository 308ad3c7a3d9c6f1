"""The plain step functions, called with real KFP artifact objects on tmp folders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from kfp import dsl

from components.errors import ConfigError, DataError, StorageError
from components.jetdata import JetBatch
from pipelines.steps import common, data, evaluate
from pipelines.steps.checkpoints import CheckpointFolder
from pipelines.steps.train import train_config

REPO = Path(__file__).resolve().parents[2]


def artifact(kind: type[dsl.Artifact], path: Path) -> dsl.Artifact:
    return kind(uri=str(path))


def test_fetch_copies_a_reference_file_and_names_bad_uris(tiny_file: Path, tmp_path: Path) -> None:
    out = artifact(dsl.Dataset, tmp_path / "data" / "dataset")
    info = data.fetch(out, str(tiny_file), 1, 1, 0)
    assert info == {"source": str(tiny_file), "n_jets": 120} and out.metadata["n_jets"] == 120
    assert Path(out.path).read_bytes() == tiny_file.read_bytes()
    with pytest.raises(StorageError, match=r"/no/such/jets.h5: no such dataset file"):
        data.fetch(out, "/no/such/jets.h5", 1, 1, 0)
    junk = tmp_path / "junk.h5"
    junk.write_text("not hdf5")
    with pytest.raises(DataError, match=rf"^{junk}: not a readable HDF5 file"):
        data.fetch(out, str(junk), 1, 1, 0)
    with pytest.raises(ConfigError, match="number of signal jets must be a whole number >= 1, got 0"):
        data.fetch(out, "", 0, 10, 1)


def test_preprocess_holds_out_a_test_split(tiny_file: Path, tiny_jets: JetBatch, tmp_path: Path) -> None:
    dataset = artifact(dsl.Dataset, tiny_file)
    fit, test = artifact(dsl.Dataset, tmp_path / "fit"), artifact(dsl.Dataset, tmp_path / "test")
    summary = data.preprocess(dataset, fit, test, seed=3, val_fraction=0.15, test_fraction=0.2)
    fit_jets, test_jets = common.load_jets(fit.path), common.load_jets(test.path)
    assert (len(fit_jets), len(test_jets)) == (96, 24) == (summary["n_fit"], summary["n_test"])
    # Together exactly the input jets, none twice: compare whole rows as bytes.
    rows = {r.tobytes() for r in tiny_jets.constituents.reshape(120, -1)}
    width = max(fit_jets.constituents.shape[1], test_jets.constituents.shape[1])
    got = []
    for part in (fit_jets, test_jets):
        padded = np.zeros((len(part), 200, 4), np.float32)
        padded[:, : part.constituents.shape[1]] = part.constituents
        got += [r.tobytes() for r in padded.reshape(len(part), -1)]
    assert set(got) == rows and len(got) == 120 and width < 200  # stored compact
    assert fit.metadata["dataset_sha256"] == test.metadata["dataset_sha256"] == common.jets_hash(tiny_jets)
    assert test.metadata["n_top"] == int(test_jets.labels.sum())
    with pytest.raises(ConfigError, match="promotion gate needs test jets"):
        data.preprocess(dataset, fit, test, seed=3, val_fraction=0.15, test_fraction=0.0)


def test_roc_artifact_is_json_and_thinned() -> None:
    rng = np.random.default_rng(0)
    labels = np.r_[np.ones(500), np.zeros(500)].astype(np.int64)
    scores = rng.normal(labels * 2.0, 1.0)
    roc = dsl.ClassificationMetrics()
    evaluate.log_roc(roc, labels, scores)
    points = roc.metadata["confidenceMetrics"]
    assert 100 <= len(points) <= evaluate.ROC_POINTS
    json.dumps(roc.metadata, allow_nan=False)  # no inf threshold
    assert points[0]["recall"] == 0.0 and points[-1]["recall"] == 1.0
    matrix = [row["row"] for row in roc.metadata["confusionMatrix"]["rows"]]
    assert sum(map(sum, matrix)) == 1000


def test_train_config_maps_the_pipeline_split() -> None:
    config = train_config(image_size=32, epochs=1, batch_size=8, learning_rate=1e-3, seed=0, base_model_uri="",
                          val_fraction=0.15, test_fraction=0.15, max_steps_per_epoch=0, patience=2)  # fmt: skip
    assert config.test_fraction == 0 and config.val_fraction == pytest.approx(0.15 / 0.85)
    assert config.weights is None and config.max_steps_per_epoch is None and config.image.image_size == 32
    with pytest.raises(ConfigError, match="max_steps_per_epoch must be >= 0"):
        train_config(image_size=32, epochs=1, batch_size=8, learning_rate=1e-3, seed=0, base_model_uri="",
                     val_fraction=0.15, test_fraction=0.15, max_steps_per_epoch=-1, patience=2)  # fmt: skip
    with pytest.raises(ConfigError, match="lr must be > 0"):
        train_config(image_size=32, epochs=1, batch_size=8, learning_rate=0, seed=0, base_model_uri="",
                     val_fraction=0.15, test_fraction=0.15, max_steps_per_epoch=0, patience=2)  # fmt: skip


TRAIN_SCRIPT = """
import logging, sys
from kfp import dsl
from pipelines.steps.train import run
fit, out, root = sys.argv[1:4]
logging.basicConfig(level=logging.INFO)
run(fit_jets=dsl.Dataset(uri=fit), model=dsl.Model(uri=out), metrics=dsl.Metrics(uri=out + "-metrics"),
    checkpoint_root=root, run_key="pipeline-run-7", image_size=32, epochs=2, batch_size=16, learning_rate=1e-3,
    seed=0, base_model_uri="", val_fraction=0.15, test_fraction=0.15, max_steps_per_epoch=3, patience=5)
print("DONE")
"""


@pytest.mark.slow
def test_an_interrupted_training_resumes_from_its_checkpoint(tiny_jets: JetBatch, tmp_path: Path) -> None:
    fit = tmp_path / "fit.npz"
    common.save_jets(fit, tiny_jets[np.arange(100)])
    root = tmp_path / "checkpoints"
    checkpoint = root / "pipeline-run-7" / "checkpoint.pt"
    command = [sys.executable, "-c", textwrap.dedent(TRAIN_SCRIPT), str(fit), str(tmp_path / "model"), str(root)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # First attempt: killed (as by a node failure) as soon as the first epoch's checkpoint exists.
    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        while not checkpoint.exists() and first.poll() is None:
            time.sleep(0.02)
        first.kill()
    finally:
        first.wait()
    assert first.returncode == -9, first.stdout.read().decode() if first.stdout else ""
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["epoch"] == 0, "the first attempt was not stopped inside epoch 2"
    # The retry: same pipeline run key, so it finds the checkpoint and runs epoch 2 only.
    retry = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert retry.returncode == 0, retry.stdout + retry.stderr
    assert "resuming from" in retry.stderr and "after epoch 0" in retry.stderr
    history = json.loads((tmp_path / "model" / "training.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [0, 1]
    assert history[0] == saved["history"][0]  # epoch 1 came from the checkpoint, not a rerun
    assert not checkpoint.parent.exists()  # deleted once the outputs were written
    model_dir = tmp_path / "model" / "model"
    assert (model_dir / "model.safetensors").is_file() and (model_dir / "tagger.json").is_file()
    assert (model_dir / "opencl" / "plan.json").is_file()
    state = torch.load(tmp_path / "model" / "state_dict.pt", weights_only=True)
    assert "fc.weight" in state


def test_checkpoints_are_mirrored_to_s3_and_fetched_back(s3_env: str, tmp_path: Path) -> None:
    root = f"{s3_env}/checkpoints"
    with CheckpointFolder(root, "run/1") as folder:
        (folder / "model").mkdir()
        (folder / "model" / "tagger.json").write_text("{}")
        (folder / "checkpoint.pt").write_bytes(b"epoch 0")
    # A retry in a fresh pod: another local folder, filled from S3.
    retry = CheckpointFolder(root, "run/1")
    with retry as folder:
        assert (folder / "checkpoint.pt").read_bytes() == b"epoch 0"
        assert (folder / "model" / "tagger.json").read_text() == "{}"
    retry.clear()
    with CheckpointFolder(root, "run/1") as folder:
        assert not (folder / "checkpoint.pt").exists()
