"""What training reads: the jets file, the seeded train / validation / test split, and batches of images.

Images are never stored: 1.2M jets at 224x224 would be 240 GB, while their constituents are
3.2 kB per jet (less after trimming trailing padding). :class:`JetImageLoader` renders each
batch with :func:`toptagger.images.jet_images` on the training device, in a background thread
that prepares the next batches while the model trains on this one (on CUDA, on a side stream),
so training does not wait on reading or rendering.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

import numpy as np
import torch

from toptagger import storage
from toptagger.errors import DataError
from toptagger.images import ImageConfig
from toptagger.jets.compact import load_jets, trim_padding
from toptagger.jets.dataset import JetBatch, read_jets
from toptagger.training.config import check_fractions

T = TypeVar("T")
# The first bytes of the two formats training reads: HDF5 (the reference layout, a pandas
# HDFStore) and zip (numpy's .npz, the compact file of the preprocess step).
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
ZIP_SIGNATURE = b"PK\x03\x04"


def load_training_jets(uri: str | os.PathLike[str]) -> JetBatch:
    """Jets from ``uri`` (path or s3://) in the reference layout or the preprocess step's compact file."""
    with storage.local_copy(uri) as path:
        try:
            with open(path, "rb") as fh:
                head = fh.read(8)
        except FileNotFoundError:
            raise DataError(f"{uri}: no such file") from None
        except OSError as exc:
            raise DataError(f"{uri}: cannot read ({exc.strerror})") from None
        if head.startswith(HDF5_SIGNATURE):
            return read_jets(path)
        if head.startswith(ZIP_SIGNATURE):
            return load_jets(path)
    raise DataError(
        f"{uri}: neither the reference layout (an HDF5 file, read_jets) nor a compact .npz jet file "
        f"(the preprocess step's, load_jets); it starts with {head!r}"
    )


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


def prefetched(produce: Callable[[int], T], count: int, depth: int) -> Iterator[T]:
    """``produce(0), ..., produce(count - 1)``, computed ``depth`` items ahead by a background thread.

    Errors in the thread are raised here; leaving the loop early stops the thread.
    """
    if depth < 1:
        yield from (produce(i) for i in range(count))
        return
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work() -> None:
        for i in range(count):
            try:
                item = (True, produce(i))
            except BaseException as exc:  # handed to the consumer, which raises it
                item = (False, exc)
            while not stop.is_set():
                try:
                    items.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if stop.is_set() or not item[0]:
                return

    thread = threading.Thread(target=work, name="jet-image-prefetch", daemon=True)
    thread.start()
    try:
        for _ in range(count):
            ok, value = items.get()
            if not ok:
                raise value
            yield value
    finally:
        stop.set()
        thread.join()


class JetImageLoader:
    """Batches of (images, labels) rendered on ``device`` from compact constituents.

    Epoch ``e`` visits the jets in the order of ``default_rng([seed, e])``, so the order does not
    depend on how many epochs ran in this process (needed for an exact ``--resume``). Under DDP
    (``rank`` of ``world_size``) every rank takes the same global batches and yields its stride
    of each: ``batch_size`` is the batch of one optimizer step summed over the ranks, and the
    number of steps does not depend on the world size. ``prefetch`` batches are read and rendered
    ahead, in a background thread (0: in the loop itself).
    """

    def __init__(
        self,
        jets: JetBatch,
        image: ImageConfig,
        batch_size: int,
        seed: int,
        device: torch.device,
        max_steps: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        prefetch: int = 2,
    ) -> None:
        self.constituents = trim_padding(jets.constituents)
        self.labels = jets.labels.astype(np.int64)
        self.image, self.batch_size, self.seed, self.device = image, batch_size, seed, device
        self.max_steps = max_steps
        self.rank, self.world_size, self.prefetch = rank, world_size, prefetch
        self.epoch = 0
        self._order: tuple[int, np.ndarray] = (-1, np.empty(0, np.int64))
        if batch_size < world_size:
            raise DataError(f"batch_size {batch_size} leaves some of the {world_size} ranks without jets")

    def __len__(self) -> int:
        steps = -(-len(self.labels) // self.batch_size)
        if 0 < len(self.labels) % self.batch_size < self.world_size:
            steps -= 1  # the last batch is too small to give every rank a jet
        return min(steps, self.max_steps) if self.max_steps else steps

    def jets_in_step(self, step: int) -> int:
        """Jets of global batch ``step`` over all ranks (the last batch of an epoch can be short)."""
        return min(self.batch_size, len(self.labels) - step * self.batch_size)

    def batch_indices(self, step: int, epoch: int | None = None) -> np.ndarray:
        """This rank's jets in batch ``step`` of ``epoch`` (default: the current one), sorted."""
        epoch = self.epoch if epoch is None else epoch
        if self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.labels)))
        batch = np.sort(self._order[1][step * self.batch_size : (step + 1) * self.batch_size])
        return batch[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self.epoch
        cuda = self.device.type == "cuda"
        side = torch.cuda.Stream(self.device) if cuda else None

        def produce(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.cuda.Event | None]:
            batch = self.batch_indices(step, epoch)
            constituents = torch.from_numpy(self.constituents[batch])
            labels = torch.from_numpy(self.labels[batch])
            if not cuda:
                return self.image.render(constituents), labels, None
            # Copy and render on a side stream: the syncs inside jet_images (its input check)
            # then wait for this batch only, not for the training step queued on the main stream.
            torch.cuda.set_device(self.device)
            with torch.cuda.stream(side):
                constituents = constituents.pin_memory().to(self.device, non_blocking=True)
                labels = labels.pin_memory().to(self.device, non_blocking=True)
                images = self.image.render(constituents)
                ready = torch.cuda.Event()
                ready.record(side)
            return images, labels, ready

        for images, labels, ready in prefetched(produce, len(self), self.prefetch):
            if ready is not None:
                main = torch.cuda.current_stream(self.device)
                main.wait_event(ready)
                # The tensors were allocated on the side stream: keep their memory until the
                # main stream is done with them.
                images.record_stream(main)
                labels.record_stream(main)
            yield images, labels
