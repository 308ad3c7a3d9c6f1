"""The train step: fine-tune or train the tagger, resuming its checkpoint on a retry; export the model.

``train`` is the Kubeflow component; :func:`train_step` the plain function it runs, over the
training library's resumable job (:func:`toptagger.training.job.train_resumable`, the same one
that ``torchrun -m toptagger.training`` runs in a Kubeflow TrainJob). :func:`record_outputs`
turns a training summary into the KFP artifact's metadata and metrics, for the train step and
the TrainJob launcher (:mod:`components.trainjob`) alike. The model folder holds the serving
export (:mod:`toptagger.training.export`).
"""

# No `from __future__ import annotations`: KFP reads the component's annotations as objects.
from typing import Any

from kfp.dsl import Dataset, Input, Metrics, Model, Output


def train(
    fit_jets: Input[Dataset],
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
    checkpoint_root: str,
    run_key: str,
    pipeline_run_id: str,
    model: Output[Model],
    metrics: Output[Metrics],
):
    """Train (or fine-tune from base_model_uri) the ResNet-50 tagger; resumes its checkpoint on retry."""
    from components.step import step

    with step("train"):
        from components.train import train_step
        from toptagger.training.config import TrainConfig

        config = TrainConfig.from_pipeline(
            image_size=image_size,
            epochs=epochs,
            batch_size=batch_size,
            learning_rate=learning_rate,
            seed=seed,
            base_model_uri=base_model_uri,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            max_steps_per_epoch=max_steps_per_epoch,
            patience=patience,
        )
        train_step(fit_jets, model, metrics, config, checkpoint_root, run_key or pipeline_run_id)


def train_step(
    fit_jets: Any, model: Any, metrics: Any, config: Any, checkpoint_root: str, run_key: str, device: str = "auto"
) -> dict[str, Any]:
    """Train on ``fit_jets`` into the ``model`` folder; a checkpoint under ``checkpoint_root/run_key`` is resumed."""
    from pathlib import Path

    from toptagger.training.export import export
    from toptagger.training.job import train_resumable

    out = Path(model.path)
    summary, seconds, resumed = train_resumable(
        config,
        fit_jets.path,
        checkpoint_root,
        run_key,
        lambda folder, _summary, _seconds, _resumed: export(folder, out, config.image.image_size),
        device=device,
        progress=False,
    )
    record_outputs(summary, model, metrics, config, seconds, resumed)
    return summary


def record_outputs(summary: dict, model: Any, metrics: Any, config: Any, seconds: float, resumed: bool) -> None:
    """Fill the KFP model artifact's metadata and the step's metrics from a training summary.

    The train step calls it after training; the TrainJob launcher calls it after downloading a
    TrainJob's export, with the ``summary.json`` written beside it (``training_seconds``, ``resumed``).
    """
    from toptagger.training.files import OPENCL_PRECISIONS

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
        "resumed": float(resumed),
        "world_size": summary.get("world_size", 1),
    }
    for key, value in values.items():
        metrics.log_metric(key, float(value))
