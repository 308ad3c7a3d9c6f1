"""The train step: fine-tune or train the tagger, resuming from a checkpoint on retry; export it.

The output model folder holds what serving and the registry need:

    model/model.safetensors, model/tagger.json   the tagger, loaded without pickle
    model/opencl/plan.json, weights-fp32...      the fpga_runtime package (``--backend opencl``)
    state_dict.pt                                 the torch state_dict (tensors only)
    training.json                                 per-epoch history and the training config
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any

from components.errors import ConfigError
from components.train import CHECKPOINT_FILE, HISTORY_FILE, MODEL_DIR, TrainConfig, train
from pipelines.steps.checkpoints import CheckpointFolder
from pipelines.steps.common import load_jets, log

STATE_DICT_FILE = "state_dict.pt"
OPENCL_DIR = "opencl"
OPENCL_PRECISIONS = ("fp32",)


def train_config(
    *,
    image_size: int,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    base_model_uri: str,
    val_fraction: float,
    test_fraction: float,
    max_steps_per_epoch: int,
    patience: int,
) -> TrainConfig:
    """The TrainConfig of the pipeline's parameters (the test jets were split off by preprocess)."""
    if not 0 <= test_fraction < 1 or not 0 < val_fraction < 1 - test_fraction:
        raise ConfigError(f"need 0 < val_fraction < 1 - test_fraction, got {val_fraction} and {test_fraction}")
    if max_steps_per_epoch < 0:
        raise ConfigError(f"max_steps_per_epoch must be >= 0 (0: whole epochs), got {max_steps_per_epoch}")
    image = dataclasses.replace(TrainConfig().image, image_size=image_size)
    return TrainConfig(
        image=image,
        weights=base_model_uri or None,
        epochs=epochs,
        batch_size=batch_size,
        lr=learning_rate,
        patience=patience,
        seed=seed,
        # The fit jets are train + validation only; keep the validation share of the whole sample.
        val_fraction=val_fraction / (1 - test_fraction),
        test_fraction=0.0,
        max_steps_per_epoch=max_steps_per_epoch or None,
    )


def run(
    fit_jets: Any, model: Any, metrics: Any, checkpoint_root: str, run_key: str, device: str = "auto", **params: Any
) -> dict[str, Any]:
    """The component's entry: ``params`` are :func:`train_config`'s keyword arguments."""
    return train_model(fit_jets, model, metrics, train_config(**params), checkpoint_root, run_key, device)


def train_model(
    fit_jets: Any,
    model: Any,
    metrics: Any,
    config: TrainConfig,
    checkpoint_root: str,
    run_key: str,
    device: str = "auto",
) -> dict[str, Any]:
    """Train on ``fit_jets`` into the ``model`` folder; a checkpoint under ``checkpoint_root/run_key`` is resumed."""
    jets = load_jets(fit_jets.path)
    started = time.perf_counter()
    checkpoint = CheckpointFolder(checkpoint_root, run_key)
    with checkpoint as folder:
        resume = (folder / CHECKPOINT_FILE).is_file()
        if resume:
            log.info("a checkpoint of this pipeline run exists in %s: resuming from it", folder)
        summary = train(config, jets, folder, resume=resume, device=device, progress=False)
        export(folder, Path(model.path), config.image.image_size)
    checkpoint.clear()
    seconds = time.perf_counter() - started
    history = summary["history"]
    model.metadata.update(
        {
            "framework": "pytorch",
            "format": "safetensors + tagger.json",
            "image_size": config.image.image_size,
            "in_channels": config.in_channels,
            "opencl_precisions": list(OPENCL_PRECISIONS),
            "best_epoch": summary["best_epoch"],
            "best_val_auc": summary["best_val_auc"],
        }
    )
    values = {
        "best_val_auc": summary["best_val_auc"],
        "epochs_run": len(history),
        "train_jets": summary["n_train"],
        "val_jets": summary["n_val"],
        "training_seconds": seconds,
        "resumed": float(resume),
    }
    for key, value in values.items():
        metrics.log_metric(key, float(value))
    return summary


def export(folder: Path, out: Path, image_size: int) -> None:
    """Copy the best model out of the checkpoint folder, with its state_dict and OpenCL package."""
    import torch

    from components.model import load_model
    from fpga_runtime.export import export_model

    out.mkdir(parents=True, exist_ok=True)
    if (out / MODEL_DIR).exists():
        shutil.rmtree(out / MODEL_DIR)
    shutil.copytree(folder / MODEL_DIR, out / MODEL_DIR)
    shutil.copyfile(folder / HISTORY_FILE, out / HISTORY_FILE)
    tagger = load_model(out / MODEL_DIR)
    torch.save(tagger.state_dict(), out / STATE_DICT_FILE)
    export_model(tagger, out / MODEL_DIR / OPENCL_DIR, OPENCL_PRECISIONS, image_size=image_size, overwrite=True)


def read_history(model_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(model_dir) / HISTORY_FILE).read_text())
