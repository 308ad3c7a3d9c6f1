"""The train step: fine-tune or train the tagger, resuming its checkpoint on a retry; export the model.

``train`` is the Kubeflow component; :func:`train_step` the plain function it runs;
``python -m components.train`` trains from a file without Kubeflow (``main``). Every training
setting is declared once, in :class:`toptagger.training.config.TrainConfig`: the CLI's flags are
derived from it, and the component's parameters are those of ``TrainConfig.from_pipeline``.

The model output folder holds what serving and the registry need:

    model/model.safetensors, model/tagger.json   the tagger, loaded without pickle
    model/model.onnx                              the ONNX graph (``--backend onnxruntime`` / ``openvino``)
    model/opencl/plan.json, weights-fp32...      the fpga_runtime package (``--backend opencl``)
    state_dict.pt                                 the torch state_dict (tensors only)
    training.json                                 per-epoch history and the training config
"""

# No `from __future__ import annotations`: KFP reads the component's annotations as objects.
import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kfp.dsl import Dataset, Input, Metrics, Model, Output

STATE_DICT_FILE = "state_dict.pt"
OPENCL_DIR = "opencl"
OPENCL_PRECISIONS = ("fp32",)


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
    import time

    from components.step import log
    from toptagger.jets.compact import load_jets
    from toptagger.training.checkpoints import CheckpointFolder
    from toptagger.training.trainer import CHECKPOINT_FILE, train

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
    import shutil

    import torch

    from fpga_runtime.export import export_model
    from toptagger.model import load_model
    from toptagger.onnx_export import export_onnx
    from toptagger.training.trainer import HISTORY_FILE, MODEL_DIR

    out.mkdir(parents=True, exist_ok=True)
    if (out / MODEL_DIR).exists():
        shutil.rmtree(out / MODEL_DIR)
    shutil.copytree(folder / MODEL_DIR, out / MODEL_DIR)
    shutil.copyfile(folder / HISTORY_FILE, out / HISTORY_FILE)
    tagger = load_model(out / MODEL_DIR)
    torch.save(tagger.state_dict(), out / STATE_DICT_FILE)
    export_model(tagger, out / MODEL_DIR / OPENCL_DIR, OPENCL_PRECISIONS, image_size=image_size, overwrite=True)
    export_onnx(tagger, out / MODEL_DIR)  # for the onnxruntime and openvino backends


# --------------------------------------------------------------------------------------------
# python -m components.train


def build_parser() -> argparse.ArgumentParser:
    from toptagger.training import config

    parser = argparse.ArgumentParser(
        prog="python -m components.train",
        description="Train the ResNet-50 top tagger on jet images rendered on the fly from constituents.",
    )
    parser.add_argument("--data", required=True, help="jets in the reference layout (path or s3://)")
    parser.add_argument("--out", required=True, type=Path, help="run folder: checkpoint, model/, training.json")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    config.add_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from toptagger.jets.dataset import read_jets
    from toptagger.training.config import from_arguments
    from toptagger.training.trainer import train

    args = build_parser().parse_args(argv)
    config = from_arguments(args)
    summary = train(config, read_jets(args.data), args.out, args.resume, args.device, not args.no_progress)
    print(f"best validation AUC {summary['best_val_auc']:.4f} at epoch {summary['best_epoch'] + 1}")
    print(f"model saved in {summary['model']}")
    return 0


if __name__ == "__main__":
    from toptagger.cli import run_cli

    raise SystemExit(run_cli(main))
