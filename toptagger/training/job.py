"""Training as one resumable job: resume the run's checkpoint if there is one, train, hand on the result.

The pipeline's train step and a Kubeflow TrainJob (``torchrun -m toptagger.training
--checkpoint-root ROOT --run-key KEY --export-to URI``) both train this way: the checkpoint folder
of the run key outlives a killed attempt (:class:`~toptagger.training.checkpoints.CheckpointFolder`,
mirrored to S3 on a cluster), so a retried attempt, in a fresh pod and under any world size,
continues from the last finished epoch. Once training ends, rank 0 writes the outputs and the
checkpoint is deleted.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from toptagger.jets.dataset import JetBatch
from toptagger.training import distributed
from toptagger.training.checkpoints import CheckpointFolder
from toptagger.training.config import TrainConfig
from toptagger.training.files import CHECKPOINT_FILE
from toptagger.training.trainer import train

log = logging.getLogger(__name__)

# write_outputs(folder, summary, seconds, resumed), called on rank 0 before the checkpoint goes.
WriteOutputs = Callable[[Path, dict[str, Any], float, bool], None]


def train_resumable(
    config: TrainConfig,
    data: JetBatch | str | os.PathLike[str],
    checkpoint_root: str,
    run_key: str,
    write_outputs: WriteOutputs,
    **options: Any,
) -> tuple[dict[str, Any], float, bool]:
    """Train in ``CheckpointFolder(checkpoint_root, run_key)``, resuming its checkpoint if there is one.

    Rank 0 then calls ``write_outputs(folder, summary, seconds, resumed)`` and deletes the
    checkpoint; under DDP the other ranks write nothing. ``options`` go to
    :func:`toptagger.training.trainer.train`. Returns the summary, the training seconds (fetching
    the checkpoint and training, not the outputs) and whether it resumed.
    """
    world = distributed.current()
    device = distributed.resolve_device(options.get("device", "auto"), world)
    started = time.perf_counter()
    checkpoint = CheckpointFolder(checkpoint_root, run_key, mirror=world.main)
    with checkpoint as folder:
        # Rank 0 decides; a rank that cannot see the checkpoint then fails with a clear error.
        resumed = distributed.agree((folder / CHECKPOINT_FILE).is_file(), world, device)
        if resumed:
            log.info("a checkpoint of this run exists in %s: resuming from it", folder)
        summary = train(config, data, folder, resume=resumed, **options)
        seconds = time.perf_counter() - started
        if world.main:
            write_outputs(folder, summary, seconds, resumed)
    if world.main:
        checkpoint.clear()
    return summary, seconds, resumed
