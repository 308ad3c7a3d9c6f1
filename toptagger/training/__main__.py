"""``python -m toptagger.training``: train the tagger from a jets file, alone or under torchrun.

Two modes:

- ``--data D --out DIR [--resume]``: a run folder (checkpoint, model/, training.json);
- ``--data D --checkpoint-root ROOT --run-key KEY --export-to URI``: the pipeline's train step
  as one job (what a Kubeflow TrainJob runs under torchrun): the checkpoint of KEY under ROOT is
  resumed if there is one, rank 0 writes the serving export and ``summary.json`` to URI
  (:func:`toptagger.training.export.export_to`), and the checkpoint is deleted.

Under ``torchrun --nproc-per-node N -m toptagger.training ...`` either mode trains data-parallel
(:mod:`toptagger.training.distributed`), each rank reading only its share of ``--data``. Every
training setting is declared once, in :class:`toptagger.training.config.TrainConfig`; the flags
are derived from it.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from toptagger.cli import positive_int, run_cli
from toptagger.errors import ConfigError
from toptagger.jets.dataset import DEFAULT_CHUNK
from toptagger.training import config

PROG = "python -m toptagger.training"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Train the ResNet-50 top tagger on jet images rendered on the fly from constituents. "
        "Under torchrun (torchrun --nproc-per-node N -m toptagger.training ...) it trains data-parallel "
        "(DDP: gloo on CPU, nccl on CUDA), each rank reading only its share of --data; --batch-size is "
        "then the batch over all ranks.",
    )
    parser.add_argument(
        "--data",
        required=True,
        help="jets (path or s3://): the reference layout (HDF5) or the preprocess step's compact .npz",
    )
    local = parser.add_argument_group(f"a run folder ({PROG} --data D --out DIR [--resume])")
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
    parser.add_argument(
        "--chunk-size",
        type=positive_int,
        default=DEFAULT_CHUNK,
        help=f"jets read from --data at a time: bounds the reading buffer (default {DEFAULT_CHUNK})",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    config.add_arguments(parser)
    return parser


def _check_mode(args: argparse.Namespace) -> None:
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
    from toptagger.training.export import check_export_target, export_to
    from toptagger.training.job import train_resumable
    from toptagger.training.trainer import train

    args = build_parser().parse_args(argv)
    _check_mode(args)
    settings = config.from_arguments(args)
    if args.export_to:
        check_export_target(args.export_to)
    options = {
        "device": args.device,
        "progress": not args.no_progress,
        "channels_last": args.channels_last,
        "prefetch": args.prefetch,
        "chunk_size": args.chunk_size,
    }
    with distributed.initialized(args.device) as world:
        if args.out is not None:
            summary = train(settings, args.data, args.out, args.resume, **options)
        else:

            def write(folder: Path, summary: dict[str, Any], seconds: float, resumed: bool) -> None:
                record = summary | {"world_size": world.size, "training_seconds": seconds, "resumed": resumed}
                export_to(args.export_to, folder, record, settings.image.image_size)

            summary, _, _ = train_resumable(settings, args.data, args.checkpoint_root, args.run_key, write, **options)
    if world.main:
        print(f"best validation AUC {summary['best_val_auc']:.4f} at epoch {summary['best_epoch'] + 1}")
        print(f"model saved in {args.export_to or summary['model']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
