"""Train the ResNet-50 top tagger on jet images rendered on the fly from constituents.

Images are never stored: 1.2M jets at 224x224 would be 240 GB, while their constituents are
3.2 kB per jet (less after trimming trailing padding). :class:`JetImageLoader` renders each
batch with :func:`components.images.jet_images` on the training device, which takes well under
1% of a ResNet-50 step (see docs/images_training.md), so training does not wait on it.

- split: seeded train / validation / test (:func:`split_indices`), shared with evaluation;
- AdamW with a cosine learning-rate schedule, mixed precision (bf16, else fp16) on CUDA;
- early stopping on validation AUC; the best model is saved (safetensors + tagger.json);
- a checkpoint after every epoch, written atomically, and ``--resume`` to continue from it;
  epoch ``e`` always sees the same batch order, so a resumed run matches an uninterrupted one.

    python -m components.train --data jets.h5 --out runs/demo --image-size 64 --epochs 6
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from components.cli import positive_int, run_cli
from components.errors import ConfigError, DataError
from components.images import CENTERS, ImageConfig
from components.jetdata import JetBatch, read_jets
from components.metrics import auc, roc_curve
from components.model import JetTagger, TaggerConfig, build_model, load_weights, save_model, score_jets

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
MODEL_DIR = "model"
HISTORY_FILE = "training.json"


@dataclass(frozen=True)
class TrainConfig:
    """Every choice that shapes a training run; stored in the checkpoint to guard ``--resume``."""

    image: ImageConfig = field(
        default_factory=lambda: ImageConfig(image_size=64, center="centroid", rotate=True, flip=True, normalize=True)
    )
    in_channels: int = 3
    weights: str | None = None
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    patience: int = 3
    seed: int = 0
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    max_steps_per_epoch: int | None = None
    amp: bool = True
    # A separate validation file (path or s3://), e.g. the reference dataset's val.h5: then all of
    # the training data trains and the fractions are not used. Kept here so --resume checks it.
    val_data: str | None = None

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "patience"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            raise ConfigError(f"max_steps_per_epoch must be >= 1, got {self.max_steps_per_epoch}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        _check_fractions(self.val_fraction, self.test_fraction)

    @property
    def tagger(self) -> TaggerConfig:
        return TaggerConfig(image=self.image, in_channels=self.in_channels)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    if not (0 < val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ConfigError(
            f"need 0 < val_fraction, 0 <= test_fraction and val + test < 1, got {val_fraction} and {test_fraction}"
        )


def split_indices(
    n_jets: int, seed: int, val_fraction: float = 0.15, test_fraction: float = 0.15
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded (train, validation, test) jet indices; each sorted, together a partition of range(n)."""
    _check_fractions(val_fraction, test_fraction)
    order = np.random.default_rng([seed, 0x5EED]).permutation(n_jets)
    n_val, n_test = round(n_jets * val_fraction), round(n_jets * test_fraction)
    parts = order[n_val + n_test :], order[:n_val], order[n_val : n_val + n_test]
    if min(len(parts[0]), len(parts[1])) == 0:
        raise DataError(f"{n_jets} jets are too few for a train/validation split")
    return tuple(np.sort(p) for p in parts)  # type: ignore[return-value]


def trim_padding(constituents: np.ndarray) -> np.ndarray:
    """Drop the constituent slots that are padding (E = 0) in every jet: a compact, exact copy."""
    used = np.flatnonzero((constituents[..., 0] != 0).any(axis=0))
    width = int(used[-1]) + 1 if len(used) else 1
    return np.ascontiguousarray(constituents[:, :width])


class JetImageLoader:
    """Batches of (images, labels) rendered on ``device`` from compact constituents.

    Epoch ``e`` visits the jets in the order of ``default_rng([seed, e])``, so the order does not
    depend on how many epochs ran in this process (needed for an exact ``--resume``).
    """

    def __init__(
        self,
        jets: JetBatch,
        image: ImageConfig,
        batch_size: int,
        seed: int,
        device: torch.device,
        max_steps: int | None = None,
    ) -> None:
        self.constituents = trim_padding(jets.constituents)
        self.labels = jets.labels.astype(np.int64)
        self.image, self.batch_size, self.seed, self.device = image, batch_size, seed, device
        self.max_steps = max_steps
        self.epoch = 0

    def __len__(self) -> int:
        steps = -(-len(self.labels) // self.batch_size)
        return min(steps, self.max_steps) if self.max_steps else steps

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.labels))
        pin = self.device.type == "cuda"
        for step in range(len(self)):
            batch = np.sort(order[step * self.batch_size : (step + 1) * self.batch_size])
            constituents = torch.from_numpy(self.constituents[batch])
            labels = torch.from_numpy(self.labels[batch])
            if pin:
                constituents, labels = constituents.pin_memory(), labels.pin_memory()
            constituents = constituents.to(self.device, non_blocking=True)
            yield self.image.render(constituents), labels.to(self.device, non_blocking=True)


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
        len(train_jets), len(val_jets), n_test, len(loader), dev, f", AMP {amp_dtype}" if amp_dtype else "",
    )  # fmt: skip

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
            epoch + 1, record["train_loss"], val_auc, best_auc, best_epoch + 1, record["jets_per_second"],
        )  # fmt: skip
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


def build_parser() -> argparse.ArgumentParser:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(
        prog="python -m components.train",
        description="Train the ResNet-50 top tagger on jet images rendered on the fly from constituents.",
    )
    parser.add_argument("--data", required=True, help="jets in the reference layout (path or s3://)")
    parser.add_argument("--out", required=True, type=Path, help="run folder: checkpoint, model/, training.json")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    parser.add_argument("--weights", default=None, help="initial weights: file, s3:// or models:/name@alias")
    group = parser.add_argument_group("images")
    group.add_argument("--image-size", type=positive_int, default=defaults.image.image_size)
    group.add_argument("--half-width", type=float, default=defaults.image.half_width)
    group.add_argument("--center", choices=CENTERS, default=defaults.image.center)
    group.add_argument("--rotate", action=argparse.BooleanOptionalAction, default=defaults.image.rotate)
    group.add_argument("--flip", action=argparse.BooleanOptionalAction, default=defaults.image.flip)
    group.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=defaults.image.normalize)
    group.add_argument("--in-channels", type=int, choices=(1, 3), default=defaults.in_channels)
    group = parser.add_argument_group("optimisation")
    group.add_argument("--epochs", type=positive_int, default=defaults.epochs)
    group.add_argument("--batch-size", type=positive_int, default=defaults.batch_size)
    group.add_argument("--lr", type=float, default=defaults.lr)
    group.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    group.add_argument("--patience", type=positive_int, default=defaults.patience, help="early-stopping patience")
    group.add_argument("--max-steps-per-epoch", type=positive_int, default=None)
    group.add_argument("--seed", type=int, default=defaults.seed, help="seeds the split, initialisation and order")
    group.add_argument("--val-fraction", type=float, default=defaults.val_fraction)
    group.add_argument(
        "--val-data",
        default=None,
        help="separate validation jets (path or s3://, e.g. the reference val.h5): all of --data trains",
    )
    group.add_argument("--test-fraction", type=float, default=defaults.test_fraction)
    group.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    group.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="mixed precision on CUDA")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    image = ImageConfig(
        image_size=args.image_size,
        half_width=args.half_width,
        center=args.center,
        rotate=args.rotate,
        flip=args.flip,
        normalize=args.normalize,
    )
    return TrainConfig(
        image=image,
        in_channels=args.in_channels,
        weights=args.weights,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        patience=args.patience,
        seed=args.seed,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        max_steps_per_epoch=args.max_steps_per_epoch,
        amp=args.amp,
        val_data=args.val_data,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    summary = train(config, read_jets(args.data), args.out, args.resume, args.device, not args.no_progress)
    print(f"best validation AUC {summary['best_val_auc']:.4f} at epoch {summary['best_epoch'] + 1}")
    print(f"model saved in {summary['model']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
