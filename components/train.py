"""The train step: fine-tune or train the tagger, resuming its checkpoint on a retry; export the model.

``train`` is the Kubeflow component; :func:`train_step` the plain function it runs;
``python -m components.train`` trains from a file without Kubeflow (``main``), in one of two modes:

- ``--data D --out DIR [--resume]``: a run folder (checkpoint, model/, training.json);
- ``--data D --checkpoint-root ROOT --run-key KEY --export-to URI``: what :func:`train_step` does,
  as one job (a Kubeflow TrainJob runs it under torchrun): the checkpoint of KEY under ROOT is
  resumed if there is one, rank 0 writes the export below and ``summary.json`` to URI
  (:func:`export_to`), and the checkpoint is deleted. :func:`record_outputs` turns that summary
  into the KFP artifact's metadata and metrics, for the train step and the TrainJob launcher alike.

Under ``torchrun --nproc-per-node N -m components.train ...`` either mode trains data-parallel
(:mod:`toptagger.training.distributed`). ``--data`` is the reference layout or the preprocess
step's compact file (:func:`toptagger.training.data.load_training_jets` tells them apart). Every training
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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kfp.dsl import Dataset, Input, Metrics, Model, Output

STATE_DICT_FILE = "state_dict.pt"
OPENCL_DIR = "opencl"
OPENCL_PRECISIONS = ("fp32",)
# Beside a TrainJob's export (--export-to): the trainer summary, world size, training seconds, resumed.
SUMMARY_FILE = "summary.json"


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
    from toptagger.jets.compact import load_jets

    jets = load_jets(fit_jets.path)
    out = Path(model.path)
    summary, seconds, resumed = train_resumable(
        config,
        jets,
        checkpoint_root,
        run_key,
        lambda folder, _summary, _seconds, _resumed: export(folder, out, config.image.image_size),
        device=device,
        progress=False,
    )
    record_outputs(summary, model, metrics, config, seconds, resumed)
    return summary


def train_resumable(
    config: Any,
    jets: Any,
    checkpoint_root: str,
    run_key: str,
    write_outputs: Callable[[Path, dict[str, Any], float, bool], None],
    **options: Any,
) -> tuple[dict[str, Any], float, bool]:
    """Train in ``CheckpointFolder(checkpoint_root, run_key)``, resuming its checkpoint if there is one.

    Rank 0 then calls ``write_outputs(folder, summary, seconds, resumed)`` and deletes the checkpoint; under DDP the
    other ranks write nothing. ``options`` go to :func:`toptagger.training.trainer.train`.
    Returns the summary, the training seconds (fetching the checkpoint and training, not the
    outputs) and whether it resumed.
    """
    import logging
    import time

    from toptagger.training import distributed
    from toptagger.training.checkpoints import CheckpointFolder
    from toptagger.training.trainer import CHECKPOINT_FILE, train

    world = distributed.current()
    device = distributed.resolve_device(options.get("device", "auto"), world)
    started = time.perf_counter()
    checkpoint = CheckpointFolder(checkpoint_root, run_key, mirror=world.main)
    with checkpoint as folder:
        # Rank 0 decides; a rank that cannot see the checkpoint then fails with a clear error.
        resumed = distributed.agree((folder / CHECKPOINT_FILE).is_file(), world, device)
        if resumed:
            logging.getLogger("pipelines").info("a checkpoint of this run exists in %s: resuming from it", folder)
        summary = train(config, jets, folder, resume=resumed, **options)
        seconds = time.perf_counter() - started
        if world.main:
            write_outputs(folder, summary, seconds, resumed)
    if world.main:
        checkpoint.clear()
    return summary, seconds, resumed


def record_outputs(summary: dict, model: Any, metrics: Any, config: Any, seconds: float, resumed: bool) -> None:
    """Fill the KFP model artifact's metadata and the step's metrics from a training summary.

    The train step calls it after training; the TrainJob launcher calls it after downloading a
    TrainJob's export, with the ``summary.json`` written beside it (``training_seconds``, ``resumed``).
    """
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


def export_to(uri: str, folder: Path, summary: dict[str, Any], image_size: int) -> None:
    """Write :func:`export`'s folder and ``summary.json`` to ``uri`` (a local path or s3://).

    Locally the folder is built beside ``uri`` and renamed into place. On S3, where a prefix
    cannot be renamed, ``summary.json`` is uploaded last: a reader that finds it finds the rest.
    """
    import json
    import os
    import shutil
    import tempfile

    from toptagger import storage

    if storage.is_s3(uri):
        with tempfile.TemporaryDirectory(prefix="toptagger-export-") as tmp:
            export(folder, Path(tmp) / "export", image_size)
            storage.upload_dir(Path(tmp) / "export", uri)
            (Path(tmp) / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
            storage.upload(Path(tmp) / SUMMARY_FILE, f"{uri.rstrip('/')}/{SUMMARY_FILE}")
        return
    final = Path(uri)
    staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".part"))
    try:
        export(folder, staging, image_size)
        (staging / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(staging, final)
            shutil.rmtree(old)
        else:
            os.replace(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def check_export_target(uri: str) -> None:
    """Fail before training when ``--export-to`` cannot be written."""
    from toptagger import storage
    from toptagger.errors import StorageError

    if storage.is_s3(uri):
        storage.check_writable(f"{uri.rstrip('/')}/{SUMMARY_FILE}")
    elif not Path(uri).parent.is_dir():
        raise StorageError(f"--export-to {uri}: the folder {Path(uri).parent} does not exist")
    elif Path(uri).exists() and not Path(uri).is_dir():
        raise StorageError(f"--export-to {uri}: is a file; give a folder")


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
        description="Train the ResNet-50 top tagger on jet images rendered on the fly from constituents. "
        "Under torchrun (torchrun --nproc-per-node N -m components.train ...) it trains data-parallel "
        "(DDP: gloo on CPU, nccl on CUDA); --batch-size is then the batch over all ranks.",
    )
    parser.add_argument(
        "--data",
        required=True,
        help="jets (path or s3://): the reference layout (HDF5) or the preprocess step's compact .npz",
    )
    local = parser.add_argument_group("a run folder (python -m components.train --data D --out DIR [--resume])")
    local.add_argument("--out", type=Path, help="run folder: checkpoint, model/, training.json")
    local.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    job = parser.add_argument_group(
        "the pipeline's train step as one job (e.g. a Kubeflow TrainJob): instead of --out, all three of"
    )
    job.add_argument("--checkpoint-root", help="checkpoint root (path or s3://); a checkpoint of --run-key resumes")
    job.add_argument("--run-key", help="names the run's checkpoint folder under --checkpoint-root")
    job.add_argument(
        "--export-to",
        help="rank 0 writes the serving export (model/, state_dict.pt, training.json) and summary.json here "
        "(path or s3://), then deletes the checkpoint",
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (under torchrun: the rank's GPU)")
    parser.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="channels-last memory layout of the network (default: on CUDA only)",
    )
    parser.add_argument("--prefetch", type=int, default=2, help="batches rendered ahead in a background thread")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    config.add_arguments(parser)
    return parser


def _check_mode(args: argparse.Namespace) -> None:
    from toptagger.errors import ConfigError

    job = [args.checkpoint_root, args.run_key, args.export_to]
    if args.out is not None:
        if any(value is not None for value in job):
            raise ConfigError("give either --out or --checkpoint-root/--run-key/--export-to, not both")
    elif not all(job):
        raise ConfigError("give --out DIR, or all three of --checkpoint-root, --run-key and --export-to")
    elif args.resume:
        raise ConfigError("--resume goes with --out; under --checkpoint-root a checkpoint is resumed by itself")
    if args.prefetch < 0:
        raise ConfigError(f"--prefetch must be >= 0, got {args.prefetch}")


def main(argv: Sequence[str] | None = None) -> int:
    from toptagger.training import distributed
    from toptagger.training.config import from_arguments
    from toptagger.training.data import load_training_jets
    from toptagger.training.trainer import train

    args = build_parser().parse_args(argv)
    _check_mode(args)
    config = from_arguments(args)
    if args.export_to:
        check_export_target(args.export_to)
    options = {
        "device": args.device,
        "progress": not args.no_progress,
        "channels_last": args.channels_last,
        "prefetch": args.prefetch,
    }
    with distributed.initialized(args.device) as world:
        with distributed.local_rank_first(world):  # one download of an s3:// file per node
            jets = load_training_jets(args.data)
        if args.out is not None:
            summary = train(config, jets, args.out, args.resume, **options)
        else:

            def write(folder: Path, summary: dict[str, Any], seconds: float, resumed: bool) -> None:
                record = summary | {"world_size": world.size, "training_seconds": seconds, "resumed": resumed}
                export_to(args.export_to, folder, record, config.image.image_size)

            summary, _, _ = train_resumable(config, jets, args.checkpoint_root, args.run_key, write, **options)
    if world.main:
        print(f"best validation AUC {summary['best_val_auc']:.4f} at epoch {summary['best_epoch'] + 1}")
        print(f"model saved in {args.export_to or summary['model']}")
    return 0


if __name__ == "__main__":
    from toptagger.cli import run_cli

    raise SystemExit(run_cli(main))
