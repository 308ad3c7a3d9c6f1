"""Train the ResNet-50 top tagger on jet images rendered on the fly from constituents.

:func:`train` is a short list of stages: set up (:func:`setup`: this rank's jets, the model,
optimizer and schedule, a resumed checkpoint), then per epoch :func:`train_epoch`,
:func:`validation_auc`, keep the best model, :func:`save_checkpoint`.

- split: seeded train / validation / test (:func:`toptagger.training.data.split_indices`), shared
  with evaluation; or a separate validation file (``TrainConfig.val_data``);
- AdamW with a cosine learning-rate schedule, mixed precision (bf16, else fp16 with a grad
  scaler) on CUDA, bf16 autocast also on CPU with ``amp="bf16"``; channels-last on CUDA;
- data-parallel under ``torchrun`` (:mod:`toptagger.training.distributed`): each rank reads and
  holds only its share of the jets (:mod:`toptagger.training.shards`), trains on its part of
  every global batch (:mod:`toptagger.training.batches`), batch normalisation uses the statistics
  of the global batch (:mod:`toptagger.training.sync_batchnorm`), gradients are averaged by DDP,
  validation is sharded and its scores gathered, and only rank 0 writes. ``batch_size`` is the
  batch over all ranks and the batches do not depend on the world size, so one seed gives one
  model (within float32 rounding) and a checkpoint resumes under any world size;
- early stopping on validation AUC; the best model is saved (safetensors + tagger.json);
- a checkpoint after every epoch, written atomically, and ``resume=True`` to continue from it;
  epoch ``e`` always sees the same batches, so a resumed run matches an uninterrupted one.

The command line is ``python -m toptagger.training``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from toptagger import storage
from toptagger.errors import ConfigError, DataError
from toptagger.evaluation.metrics import auc, roc_curve
from toptagger.jets.dataset import DEFAULT_CHUNK, JetBatch
from toptagger.model import JetTagger, build_model, load_weights, save_model, score_jets
from toptagger.training import distributed, sync_batchnorm
from toptagger.training.config import TrainConfig
from toptagger.training.data import JetImageLoader, RankData, rank_data
from toptagger.training.distributed import World
from toptagger.training.files import CHECKPOINT_FILE, HISTORY_FILE, MODEL_DIR
from toptagger.training.shards import JetSource

log = logging.getLogger(__name__)

# Called on every rank after each epoch with (epoch, model, record): tests read the weights
# and gradients of each rank through it.
EpochHook = Callable[[int, JetTagger, dict[str, float]], None]


def validation_auc(model: JetTagger, jets: JetBatch, device: torch.device, world: World | None = None) -> float:
    """AUC of the validation split: each rank scores its share ``jets``, and the scores are gathered."""
    world = world or World()
    scores = score_jets(model, jets.constituents, batch_size=256, device=device, logits=True)
    scores = distributed.gather(scores, world, device)
    labels = distributed.gather(jets.labels.astype(np.float64), world, device).astype(np.int64)
    fpr, tpr, _ = roc_curve(labels, scores)
    return float(auc(fpr, tpr))


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``TrainConfig.amp`` on ``device`` (None: full float32)."""
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None  # CPU autocast would only slow ResNet-50 training down here, unless asked for
    if mode == "fp16":
        if device.type != "cuda":
            raise ConfigError("amp fp16 needs a CUDA device (its grad scaler); use --amp bf16 on CPU")
        return torch.float16
    if mode == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError(f"amp bf16: {torch.cuda.get_device_name(device)} has no bfloat16; use --amp fp16")
        return torch.bfloat16
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _write_atomically(path: Path, state: dict[str, Any]) -> None:
    """torch.save to a temporary file in the same folder, then rename: never a torn checkpoint."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _read_checkpoint(path: Path, config: TrainConfig) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"--resume: no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a damaged file
        raise DataError(f"{path}: not a readable checkpoint ({exc})") from None
    stored = state.get("config", {})
    if stored != json.loads(json.dumps(config.to_dict())):
        diff = sorted(k for k in set(stored) | set(config.to_dict()) if stored.get(k) != config.to_dict().get(k))
        raise ConfigError(f"--resume: {path} was written with different settings ({', '.join(diff)})")
    return state


@dataclass
class Run:
    """One training run on this rank: its data, network, optimisation state and progress."""

    config: TrainConfig
    out_dir: Path
    world: World
    device: torch.device
    data: RankData
    model: JetTagger
    network: nn.Module  # the model, wrapped in DDP under torchrun
    loader: JetImageLoader
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    half: torch.dtype | None
    layout: torch.memory_format | None
    history: list[dict[str, float]] = field(default_factory=list)
    best_auc: float = -1.0
    best_epoch: int = -1
    stale: int = 0
    first_epoch: int = 0

    @property
    def stopped(self) -> bool:
        return self.stale >= self.config.patience


def setup(
    config: TrainConfig,
    data: JetSource,
    out_dir: Path,
    resume: bool,
    device: str,
    channels_last: bool | None,
    prefetch: int,
    chunk_size: int = DEFAULT_CHUNK,
) -> Run:
    """This rank's jets, the model on its device, the optimiser and schedule; the checkpoint when resuming."""
    world = distributed.current()
    dev = distributed.resolve_device(device, world)
    if world.main:
        out_dir.mkdir(parents=True, exist_ok=True)
    with distributed.local_rank_first(world):  # one download of an s3:// file per node
        shares = rank_data(config, data, world, chunk_size)
    _check_classes(shares, world, dev)

    torch.manual_seed(config.seed)
    model = build_model(config.tagger)
    load_weights(model, config.weights)
    if world.distributed:
        model = sync_batchnorm.synchronize(model, dev)
    layout = torch.channels_last if (dev.type == "cuda" if channels_last is None else channels_last) else None
    model.to(dev, memory_format=layout or torch.contiguous_format)
    loader = JetImageLoader(shares.train, shares.plan, config.image, dev, prefetch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    half = amp_dtype(config.amp, dev)
    run = Run(
        config,
        out_dir,
        world,
        dev,
        shares,
        model,
        model,
        loader,
        optimizer,
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs * len(loader)),
        torch.amp.GradScaler("cuda", enabled=half == torch.float16),
        half,
        layout,
    )
    if resume:
        load_checkpoint(run)
    # After loading: DDP starts by broadcasting rank 0's weights, which every rank has read anyway.
    if world.distributed:
        run.network = nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    log.info(
        "training on %d jets (validation %d, test %d held out), %d steps per epoch, world size %d "
        "(%d training jets on this rank), device %s%s%s",
        shares.plan.n_jets,
        shares.n_val,
        shares.n_test,
        len(loader),
        world.size,
        len(shares.train),
        dev,
        f", AMP {half}" if half else "",
        ", channels-last" if layout else "",
    )
    return run


def _check_classes(shares: RankData, world: World, device: torch.device) -> None:
    """Both classes in the training and the validation split, counted over all ranks."""
    counts = [float(shares.train.labels.sum()), len(shares.train), float(shares.val.labels.sum()), len(shares.val)]
    top_train, n_train, top_val, n_val = distributed.all_sum(counts, world, device)
    if not (0 < top_train < n_train and 0 < top_val < n_val):
        raise DataError("the train and validation sets each need both top and QCD jets")


def train_epoch(run: Run, epoch: int, progress: bool) -> dict[str, float]:
    """One pass over the epoch's batches; returns the mean training loss and the speed over all ranks."""
    from tqdm import tqdm

    run.network.train()
    run.loader.epoch = epoch
    # A sum, scaled per step below: DDP averages the ranks' gradients, and the ranks' shares of a
    # batch differ by one jet when the world size does not divide it.
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    dev, world = run.device, run.world
    # The loss stays on the device: reading it every step would make the host wait for the GPU.
    loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
    n_local, started = 0, time.perf_counter()
    show = progress and world.main
    desc = f"epoch {epoch + 1}/{run.config.epochs}"
    bar = tqdm(run.loader, desc=desc, unit="batch", disable=not show, file=sys.stderr)
    for step, (images, labels) in enumerate(bar):
        if run.layout:
            images = images.contiguous(memory_format=run.layout)
        with torch.autocast(dev.type, dtype=run.half or torch.float32, enabled=run.half is not None):
            loss = loss_fn(run.network(images), labels)
        run.optimizer.zero_grad(set_to_none=True)
        # The sum over this rank's jets times world / jets in the batch: after DDP's average
        # over ranks, the gradient of the mean loss over the whole batch.
        run.scaler.scale(loss * (world.size / run.loader.jets_in_step(step))).backward()
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.scheduler.step()
        loss_sum += loss.detach().double()
        n_local += len(labels)
        if show and step % 10 == 0:
            rate = n_local * world.size / (time.perf_counter() - started)
            bar.set_postfix(loss=f"{float(loss) / len(labels):.4f}", jets_per_s=f"{rate:.0f}")
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - started
    total_loss, n_seen = distributed.all_sum([float(loss_sum), float(n_local)], world, dev)
    return {"epoch": epoch, "train_loss": total_loss / max(n_seen, 1), "jets_per_second": n_seen / seconds}


def keep_best(run: Run, epoch: int, val_auc: float) -> None:
    """Save the model when the validation AUC improves; count the stale epochs otherwise."""
    if val_auc > run.best_auc:
        run.best_auc, run.best_epoch, run.stale = val_auc, epoch, 0
        if run.world.main:
            save_model(run.model, run.out_dir / MODEL_DIR)
    else:
        run.stale += 1


def save_checkpoint(run: Run, epoch: int) -> None:
    """Rank 0 writes everything a resumed run needs, atomically."""
    if not run.world.main:
        return
    _write_atomically(
        run.out_dir / CHECKPOINT_FILE,
        {
            "model": run.model.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "scaler": run.scaler.state_dict(),
            "epoch": epoch,
            "history": run.history,
            "best_auc": run.best_auc,
            "best_epoch": run.best_epoch,
            "stale": run.stale,
            "config": json.loads(json.dumps(run.config.to_dict())),
        },
    )


def load_checkpoint(run: Run) -> None:
    """Continue ``run`` after the last epoch of its checkpoint."""
    path = run.out_dir / CHECKPOINT_FILE
    state = _read_checkpoint(path, run.config)
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.scaler.load_state_dict(state["scaler"])
    run.history = list(state["history"])
    run.best_auc, run.best_epoch, run.stale = state["best_auc"], state["best_epoch"], state["stale"]
    run.first_epoch = state["epoch"] + 1
    log.info("resuming from %s after epoch %d (best val AUC %.4f)", path, state["epoch"], run.best_auc)


def train(
    config: TrainConfig,
    data: JetSource,
    out_dir: str | Path,
    resume: bool = False,
    device: str = "auto",
    progress: bool = True,
    channels_last: bool | None = None,
    prefetch: int = 2,
    on_epoch: EpochHook | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> dict[str, Any]:
    """Train on the seeded train split of ``data`` (all of it when ``config.val_data`` names a
    separate validation file); returns the history and the best epoch's AUC.

    ``data`` is a jets file (path or s3://, the reference layout or the compact file), read in
    chunks of ``chunk_size`` jets, or jets in memory. Under torchrun (an initialised process
    group) this is one rank of a DDP run: every rank passes the same ``data`` and ``out_dir``,
    which every rank reads to resume (a shared folder, or one fetched per rank) and only rank 0
    writes. ``channels_last`` (default: on CUDA) is the memory layout of the network;
    ``prefetch`` batches are rendered ahead in a background thread.
    """
    run = setup(config, data, Path(out_dir), resume, device, channels_last, prefetch, chunk_size)
    for epoch in range(run.first_epoch, config.epochs):
        if run.stopped:
            break
        record = train_epoch(run, epoch, progress)
        record["val_auc"] = validation_auc(run.model, run.data.val, run.device, run.world)
        record["lr"] = run.scheduler.get_last_lr()[0]
        run.history.append(record)
        if on_epoch is not None:
            on_epoch(epoch, run.model, record)
        keep_best(run, epoch, record["val_auc"])
        log.info(
            "epoch %d: loss %.4f, val AUC %.4f (best %.4f at epoch %d), %.0f jets/s",
            epoch + 1,
            record["train_loss"],
            record["val_auc"],
            run.best_auc,
            run.best_epoch + 1,
            record["jets_per_second"],
        )
        save_checkpoint(run, epoch)
    return finish(run)


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def finish(run: Run) -> dict[str, Any]:
    """The summary; rank 0 writes it as the run's history. Returns once every rank is here."""
    if run.stopped:
        log.info("early stop: validation AUC has not improved for %d epoch(s)", run.stale)
    summary = {
        "best_epoch": run.best_epoch,
        "best_val_auc": run.best_auc,
        "history": run.history,
        "model": str(run.out_dir / MODEL_DIR),
        "config": run.config.to_dict(),
        "n_train": run.data.plan.n_jets,
        "n_val": run.data.n_val,
        "n_test": run.data.n_test,
        "world_size": run.world.size,
        # Each rank's peak resident memory so far (MB): what a pod's memory request must cover.
        "peak_rss_mb": [
            round(float(mb), 1) for mb in distributed.gather(np.array([_peak_rss_mb()]), run.world, run.device)
        ],
    }
    if run.world.main:
        with storage.atomic_output(run.out_dir / HISTORY_FILE) as tmp:
            tmp.write_text(json.dumps(summary, indent=2) + "\n")
    # Nobody leaves before rank 0 has written: the caller may export or delete the folder next.
    distributed.barrier(run.world)
    return summary
