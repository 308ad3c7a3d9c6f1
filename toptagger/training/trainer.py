"""Train the ResNet-50 top tagger on jet images rendered on the fly from constituents.

- split: seeded train / validation / test (:func:`toptagger.training.data.split_indices`), shared
  with evaluation; or a separate validation file (``TrainConfig.val_data``);
- AdamW with a cosine learning-rate schedule, mixed precision (bf16, else fp16 with a grad
  scaler) on CUDA, bf16 autocast also on CPU with ``amp="bf16"``; channels-last on CUDA;
- data-parallel under ``torchrun`` (:mod:`toptagger.training.distributed`): each rank trains on
  its stride of every batch, gradients are averaged by DDP, validation scores are gathered, and
  only rank 0 writes; ``batch_size`` is the batch over all ranks, so the world size changes
  neither the result nor the checkpoint, which resumes under any world size;
- early stopping on validation AUC; the best model is saved (safetensors + tagger.json);
- a checkpoint after every epoch, written atomically, and ``resume=True`` to continue from it;
  epoch ``e`` always sees the same batch order, so a resumed run matches an uninterrupted one.

The command line is ``python -m components.train`` (the pipeline's train step).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from toptagger import storage
from toptagger.errors import ConfigError, DataError
from toptagger.evaluation.metrics import auc, roc_curve
from toptagger.jets.dataset import JetBatch, read_jets
from toptagger.model import JetTagger, build_model, load_weights, save_model, score_jets
from toptagger.training import distributed
from toptagger.training.config import TrainConfig
from toptagger.training.data import JetImageLoader, split_indices
from toptagger.training.distributed import World

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
MODEL_DIR = "model"
HISTORY_FILE = "training.json"


# Called on every rank after each epoch with (epoch, model, record): tests read the weights
# and gradients of each rank through it.
EpochHook = Callable[[int, JetTagger, dict[str, float]], None]


def validation_auc(model: JetTagger, jets: JetBatch, device: torch.device, world: World | None = None) -> float:
    """AUC over all of ``jets``; under DDP each rank scores its stride and the scores are gathered."""
    world = world or World()
    mine = distributed.shard(np.arange(len(jets)), world)
    scores = score_jets(model, jets.constituents[mine], batch_size=256, device=device, logits=True)
    scores = distributed.gather(scores, world, device)
    labels = distributed.gather(jets.labels[mine].astype(np.float64), world, device).astype(np.int64)
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


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """torch.save to a temporary file in the same folder, then rename: never a torn checkpoint."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load_checkpoint(path: Path, config: TrainConfig) -> dict[str, Any]:
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


def train(
    config: TrainConfig,
    jets: JetBatch,
    out_dir: str | Path,
    resume: bool = False,
    device: str = "auto",
    progress: bool = True,
    channels_last: bool | None = None,
    prefetch: int = 2,
    on_epoch: EpochHook | None = None,
) -> dict[str, Any]:
    """Train on the seeded train split of ``jets`` (all of it when ``config.val_data`` names a
    separate validation file); returns the history and the best epoch's AUC.

    Under torchrun (an initialised process group) this is one rank of a DDP run: every rank
    passes the same ``jets`` and ``out_dir``, which every rank reads to resume (a shared folder,
    or one fetched per rank) and only rank 0 writes. ``channels_last`` (default: on CUDA) is the
    memory layout of the network; ``prefetch`` batches are rendered ahead in a background thread.
    """
    out_dir = Path(out_dir)
    world = distributed.current()
    dev = distributed.resolve_device(device, world)
    if world.main:
        out_dir.mkdir(parents=True, exist_ok=True)
    if config.val_data:
        with distributed.local_rank_first(world):  # one download of an s3:// file per node
            train_jets, val_jets, n_test = jets, read_jets(config.val_data), 0
    else:
        train_idx, val_idx, test_idx = split_indices(len(jets), config.seed, config.val_fraction, config.test_fraction)
        train_jets, val_jets, n_test = jets[train_idx], jets[val_idx], len(test_idx)
    if len(np.unique(train_jets.labels)) < 2 or len(np.unique(val_jets.labels)) < 2:
        raise DataError("the train and validation sets each need both top and QCD jets")

    torch.manual_seed(config.seed)
    model = build_model(config.tagger)
    load_weights(model, config.weights)
    layout = torch.channels_last if (dev.type == "cuda" if channels_last is None else channels_last) else None
    model.to(dev, memory_format=layout or torch.contiguous_format)
    loader = JetImageLoader(
        train_jets,
        config.image,
        config.batch_size,
        config.seed,
        dev,
        config.max_steps_per_epoch,
        rank=world.rank,
        world_size=world.size,
        prefetch=prefetch,
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs * len(loader))
    half = amp_dtype(config.amp, dev)
    scaler = torch.amp.GradScaler("cuda", enabled=half == torch.float16)
    # A sum, scaled per step below: DDP averages the ranks' gradients, and the ranks' shares of a
    # batch differ by one jet when it does not divide evenly.
    loss_fn = nn.CrossEntropyLoss(reduction="sum")

    checkpoint_path = out_dir / CHECKPOINT_FILE
    history: list[dict[str, float]] = []
    best_auc, best_epoch, stale, first_epoch = -1.0, -1, 0, 0
    if resume:
        state = _load_checkpoint(checkpoint_path, config)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        history = list(state["history"])
        best_auc, best_epoch, stale = state["best_auc"], state["best_epoch"], state["stale"]
        first_epoch = state["epoch"] + 1
        log.info("resuming from %s after epoch %d (best val AUC %.4f)", checkpoint_path, state["epoch"], best_auc)
    # After loading: DDP starts by broadcasting rank 0's weights, which every rank has read anyway.
    network: nn.Module = model
    if world.distributed:
        network = nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    log.info(
        "training on %d jets (validation %d, test %d held out), %d steps per epoch, world size %d, device %s%s%s",
        len(train_jets),
        len(val_jets),
        n_test,
        len(loader),
        world.size,
        dev,
        f", AMP {half}" if half else "",
        ", channels-last" if layout else "",
    )

    from tqdm import tqdm

    for epoch in range(first_epoch, config.epochs):
        if stale >= config.patience:
            break
        network.train()
        loader.epoch = epoch
        # The loss stays on the device: reading it every step would make the host wait for the GPU.
        loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
        n_local, started = 0, time.perf_counter()
        show = progress and world.main
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{config.epochs}", unit="batch", disable=not show, file=sys.stderr)
        for step, (images, labels) in enumerate(bar):
            if layout:
                images = images.contiguous(memory_format=layout)
            with torch.autocast(dev.type, dtype=half or torch.float32, enabled=half is not None):
                loss = loss_fn(network(images), labels)
            optimizer.zero_grad(set_to_none=True)
            # The sum over this rank's jets times world / jets in the batch: after DDP's average
            # over ranks, the gradient of the mean loss over the whole batch.
            scaler.scale(loss * (world.size / loader.jets_in_step(step))).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            loss_sum += loss.detach().double()
            n_local += len(labels)
            if show and step % 10 == 0:
                rate = n_local * world.size / (time.perf_counter() - started)
                bar.set_postfix(loss=f"{float(loss) / len(labels):.4f}", jets_per_s=f"{rate:.0f}")
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        seconds = time.perf_counter() - started
        total_loss, n_seen = distributed.all_sum([float(loss_sum), float(n_local)], world, dev)
        # DDP broadcasts rank 0's batch-norm statistics before each forward, and each rank then
        # updates them on its own shard: validate every rank with rank 0's, the ones saved.
        distributed.broadcast_buffers(model, world)
        val_auc = validation_auc(model, val_jets, dev, world)
        record = {
            "epoch": epoch,
            "train_loss": total_loss / max(n_seen, 1),
            "val_auc": val_auc,
            "jets_per_second": n_seen / seconds,
            "lr": scheduler.get_last_lr()[0],
        }
        history.append(record)
        if on_epoch is not None:
            on_epoch(epoch, model, record)
        if val_auc > best_auc:
            best_auc, best_epoch, stale = val_auc, epoch, 0
            if world.main:
                save_model(model, out_dir / MODEL_DIR)
        else:
            stale += 1
        log.info(
            "epoch %d: loss %.4f, val AUC %.4f (best %.4f at epoch %d), %.0f jets/s",
            epoch + 1,
            record["train_loss"],
            val_auc,
            best_auc,
            best_epoch + 1,
            record["jets_per_second"],
        )
        if not world.main:
            continue
        _save_checkpoint(
            checkpoint_path,
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "epoch": epoch,
                "history": history,
                "best_auc": best_auc,
                "best_epoch": best_epoch,
                "stale": stale,
                "config": json.loads(json.dumps(config.to_dict())),
            },
        )
    if stale >= config.patience:
        log.info("early stop: validation AUC has not improved for %d epoch(s)", stale)
    summary = {
        "best_epoch": best_epoch,
        "best_val_auc": best_auc,
        "history": history,
        "model": str(out_dir / MODEL_DIR),
        "config": config.to_dict(),
        "n_train": len(train_jets),
        "n_val": len(val_jets),
        "n_test": n_test,
        "world_size": world.size,
    }
    if world.main:
        with storage.atomic_output(out_dir / HISTORY_FILE) as tmp:
            tmp.write_text(json.dumps(summary, indent=2) + "\n")
    # Nobody leaves before rank 0 has written: the caller may export or delete the folder next.
    distributed.barrier(world)
    return summary
