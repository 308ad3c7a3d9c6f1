"""What training reads: this rank's share of the jets, the seeded split, and batches of images.

Images are never stored: 1.2M jets at 224x224 would be 240 GB, while their constituents are
3.2 kB per jet (less after trimming trailing padding). :func:`rank_data` reads only this rank's
training and validation jets (:mod:`toptagger.training.shards`, :mod:`toptagger.training.batches`).
:class:`JetImageLoader` renders each batch with :func:`toptagger.images.jet_images` on the
training device, in a background thread that prepares the next batches while the model trains on
this one (on CUDA, on a side stream), so training does not wait on reading or rendering.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from toptagger.errors import DataError
from toptagger.images import ImageConfig
from toptagger.jets.compact import trim_padding
from toptagger.jets.dataset import DEFAULT_CHUNK, JetBatch
from toptagger.training.batches import BatchPlan
from toptagger.training.config import TrainConfig, check_fractions
from toptagger.training.distributed import World
from toptagger.training.shards import JetSource, count_rows, read_shares

T = TypeVar("T")


def load_training_jets(source: JetSource) -> JetBatch:
    """All jets of ``source`` (path or s3://, the reference layout or the compact file), read in chunks."""
    return read_shares(source, [np.arange(count_rows(source))])[0]


@dataclass(frozen=True)
class RankData:
    """This rank's training and validation jets, and the sizes of the whole splits."""

    plan: BatchPlan
    train: JetBatch  # the jets of plan.held(), in that order
    val: JetBatch  # this rank's stride of the validation split
    n_val: int
    n_test: int


def rank_data(
    config: TrainConfig, data: JetSource, world: World | None = None, chunk_size: int = DEFAULT_CHUNK
) -> RankData:
    """Read only this rank's jets of ``data`` (one pass over the file; ``config.val_data`` a second).

    The split is :func:`split_indices` of the whole file (or all of it for training when
    ``config.val_data`` names a separate validation file); the training share is what
    :class:`BatchPlan` gives this rank, the validation share every ``world.size``-th jet.
    """
    world = world or World()
    n = count_rows(data)
    if config.val_data:
        train_rows, val_rows, n_test = np.arange(n), None, 0
    else:
        train_rows, val_rows, n_test = split_indices(n, config.seed, config.val_fraction, config.test_fraction)
        n_test = len(n_test)
    plan = BatchPlan(
        len(train_rows), config.batch_size, config.seed, world.rank, world.size, config.max_steps_per_epoch or None
    )
    mine = train_rows[plan.held()]
    if val_rows is None:
        (train,) = read_shares(data, [mine], chunk_size)
        n_val = count_rows(config.val_data)
        (val,) = read_shares(config.val_data, [np.arange(world.rank, n_val, world.size)], chunk_size)
    else:
        train, val = read_shares(data, [mine, val_rows[world.rank :: world.size]], chunk_size)
        n_val = len(val_rows)
    return RankData(plan, train, val, n_val, n_test)


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
    """Batches of (images, labels) rendered on ``device`` from this rank's jets, in ``plan``'s order.

    ``jets`` are the jets of ``plan.held()`` (:func:`rank_data`). Epoch ``e``'s batches depend on
    ``e`` only, not on how many epochs ran in this process (needed for an exact ``--resume``), nor on
    the world size. ``prefetch`` batches are read and rendered ahead, in a background thread (0:
    in the loop itself).
    """

    def __init__(
        self, jets: JetBatch, plan: BatchPlan, image: ImageConfig, device: torch.device, prefetch: int = 2
    ) -> None:
        if len(jets) != len(plan.held()):
            raise DataError(f"the loader got {len(jets)} jets for a plan that holds {len(plan.held())}")
        self.constituents = np.ascontiguousarray(jets.constituents)
        self.labels = jets.labels.astype(np.int64)
        self.plan, self.image, self.device, self.prefetch = plan, image, device, prefetch
        self.epoch = 0
        self._order: tuple[int, np.ndarray] = (-1, np.empty((0, 0), np.int64))

    def __len__(self) -> int:
        return len(self.plan)

    def jets_in_step(self, step: int) -> int:
        """Jets of global batch ``step`` over all ranks."""
        return self.plan.jets_in_step(step)

    def batch_indices(self, step: int, epoch: int | None = None) -> np.ndarray:
        """This rank's jets in batch ``step`` of ``epoch`` (default: the current one), as indices into ``jets``."""
        epoch = self.epoch if epoch is None else epoch
        if self._order[0] != epoch:
            self._order = (epoch, self.plan.batches(epoch))
        return self._order[1][step]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self.epoch
        cuda = self.device.type == "cuda"
        side = torch.cuda.Stream(self.device) if cuda else None

        def produce(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.cuda.Event | None]:
            batch = self.batch_indices(step, epoch)
            # Only the slots some jet of the batch uses: the rest is padding, and costs rendering time.
            constituents = torch.from_numpy(trim_padding(self.constituents[batch]))
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
