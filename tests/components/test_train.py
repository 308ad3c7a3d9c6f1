"""The train step: the plain function of the component (training resumed across a killed attempt)."""

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

from toptagger.jets.compact import save_jets
from toptagger.jets.dataset import JetBatch

REPO = Path(__file__).resolve().parents[2]

TRAIN_SCRIPT = """
import logging, sys
from kfp import dsl
from components.train import train_step
from toptagger.training.config import TrainConfig
fit, out, root = sys.argv[1:4]
logging.basicConfig(level=logging.INFO)
config = TrainConfig.from_pipeline(image_size=32, epochs=2, batch_size=16, learning_rate=1e-3, seed=0,
    base_model_uri="", val_fraction=0.15, test_fraction=0.15, max_steps_per_epoch=3, patience=5)
train_step(dsl.Dataset(uri=fit), dsl.Model(uri=out), dsl.Metrics(uri=out + "-metrics"), config, root, "pipeline-run-7")
print("DONE")
"""


@pytest.mark.slow
def test_an_interrupted_training_resumes_from_its_checkpoint(tiny_jets: JetBatch, tmp_path: Path) -> None:
    fit = tmp_path / "fit.npz"
    save_jets(fit, tiny_jets[np.arange(100)])
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
