"""What training reads: the seeded train / validation / test split, and batches of jet images.

Images are never stored: 1.2M jets at 224x224 would be 240 GB, while their constituents are
3.2 kB per jet (less after trimming trailing padding). :class:`JetImageLoader` renders each
batch with :func:`toptagger.images.jet_images` on the training device, which takes well under
1% of a ResNet-50 step (see docs/images_training.md), so training does not wait on it.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from toptagger.errors import DataError
from toptagger.images import ImageConfig
from toptagger.jets.compact import trim_padding
from toptagger.jets.dataset import JetBatch
from toptagger.training.config import check_fractions


def split_indices(
    n_jets: int, seed: int, val_fraction: float = 0.15, test_fraction: float = 0.15
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded (train, validation, test) jet indices; each sorted, together a partition of range(n)."""
    check_fractions(val_fraction, test_fraction)
    order = np.random.default_rng([seed, 0x5EED]).permutation(n_jets)
    n_val, n_test = round(n_jets * val_fraction), round(n_jets * test_fraction)
    parts = order[n_val + n_test :], order[:n_val], order[n_val : n_val + n_test]
    if min(len(parts[0]), len(parts[1])) == 0:
        raise DataError(f"{n_jets} jets are too few for a train/validation split")
    return tuple(np.sort(p) for p in parts)  # type: ignore[return-value]


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
