"""Train the ResNet-50 top tagger on jet images rendered on the fly from constituents.

- split: seeded train / validation / test (:func:`toptagger.training.data.split_indices`), shared
  with evaluation; or a separate validation file (``TrainConfig.val_data``);
- AdamW with a cosine learning-rate schedule, mixed precision (bf16, else fp16) on CUDA;
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
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from toptagger.errors import ConfigError, DataError
from toptagger.evaluation.metrics import auc, roc_curve
from toptagger.jets.dataset import JetBatch, read_jets
from toptagger.model import JetTagger, build_model, load_weights, save_model, score_jets
from toptagger.training.config import TrainConfig
from toptagger.training.data import JetImageLoader, split_indices

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
MODEL_DIR = "model"
HISTORY_FILE = "training.json"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but no CUDA GPU is available")
    return device


def validation_auc(model: JetTagger, jets: JetBatch, device: torch.device) -> float:
    scores = score_jets(model, jets.constituents, batch_size=256, device=device, logits=True)
    fpr, tpr, _ = roc_curve(jets.labels, scores)
    return float(auc(fpr, tpr))


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
) -> dict[str, Any]:
    """Train on the seeded train split of ``jets`` (all of it when ``config.val_data`` names a
    separate validation file); returns the history and the best epoch's AUC."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    if config.val_data:
        train_jets, val_jets, n_test = jets, read_jets(config.val_data), 0
    else:
        train_idx, val_idx, test_idx = split_indices(len(jets), config.seed, config.val_fraction, config.test_fraction)
        train_jets, val_jets, n_test = jets[train_idx], jets[val_idx], len(test_idx)
    if len(np.unique(train_jets.labels)) < 2 or len(np.unique(val_jets.labels)) < 2:
        raise DataError("the train and validation sets each need both top and QCD jets")

    torch.manual_seed(config.seed)
    model = build_model(config.tagger)
    load_weights(model, config.weights)
    model.to(dev)
    loader = JetImageLoader(train_jets, config.image, config.batch_size, config.seed, dev, config.max_steps_per_epoch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs * len(loader))
    amp_dtype = _amp_dtype(dev) if config.amp else None
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    loss_fn = nn.CrossEntropyLoss()

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
    log.info(
        "training on %d jets (validation %d, test %d held out), %d steps per epoch, device %s%s",
        len(train_jets),
        len(val_jets),
        n_test,
        len(loader),
        dev,
        f", AMP {amp_dtype}" if amp_dtype else "",
    )

    from tqdm import tqdm

    for epoch in range(first_epoch, config.epochs):
        if stale >= config.patience:
            break
        model.train()
        loader.epoch = epoch
        total_loss, n_seen, started = 0.0, 0, time.perf_counter()
        bar = tqdm(
            loader, desc=f"epoch {epoch + 1}/{config.epochs}", unit="batch", disable=not progress, file=sys.stderr
        )
        for images, labels in bar:
            with torch.autocast(dev.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                loss = loss_fn(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            loss_value = float(loss.detach())
            total_loss += loss_value * len(labels)
            n_seen += len(labels)
            bar.set_postfix(loss=f"{loss_value:.4f}", jets_per_s=f"{n_seen / (time.perf_counter() - started):.0f}")
        seconds = time.perf_counter() - started
        val_auc = validation_auc(model, val_jets, dev)
        record = {
            "epoch": epoch,
            "train_loss": total_loss / max(n_seen, 1),
            "val_auc": val_auc,
            "jets_per_second": n_seen / seconds,
            "lr": scheduler.get_last_lr()[0],
        }
        history.append(record)
        if val_auc > best_auc:
            best_auc, best_epoch, stale = val_auc, epoch, 0
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
    }
    (out_dir / HISTORY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _amp_dtype(device: torch.device) -> torch.dtype | None:
    if device.type != "cuda":
        return None  # CPU autocast would only slow ResNet-50 training down here
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
