"""Which jets make each optimizer step, and which of them each rank holds.

A global batch must not depend on the world size (a checkpoint resumes under any world size, and
one seed gives one model), and each rank must hold only a fixed part of the training jets (it
reads only that part: :mod:`toptagger.training.shards`). Both follow from stratifying every
batch by position: the ``n`` training jets fall into ``B`` classes (``B`` = batch size), class
``c`` holding positions ``c, c + B, c + 2B, ...``. In epoch ``e`` each class is shuffled on its
own (``default_rng([seed, e, c])``) and batch ``j`` takes the ``j``-th jet of every class:

- batch ``j`` is the same set of jets for every world size;
- rank ``r`` of ``W`` owns the classes ``c`` with ``c % W == r``, and only their jets: about
  ``n / W`` of them, and ``B / W`` of every batch (exactly, when ``W`` divides ``B``), so the
  ranks stay in step;
- every class contributes one jet to every batch, and a fresh random one each epoch: a
  stratified shuffle, as random as a plain one for a file whose order says nothing of the jets.

An epoch has ``n // B`` full batches (the few jets left over change from epoch to epoch), or one
batch of all ``n`` jets when ``n < B``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from toptagger.errors import DataError


@dataclass(frozen=True)
class BatchPlan:
    """The batches of ``n_jets`` training jets, as rank ``rank`` of ``world_size`` sees them."""

    n_jets: int
    batch_size: int
    seed: int
    rank: int = 0
    world_size: int = 1
    max_steps: int | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise DataError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.batch_size < self.world_size:
            raise DataError(f"batch_size {self.batch_size} leaves some of the {self.world_size} ranks without jets")
        if self.n_jets < self.world_size:
            raise DataError(f"{self.n_jets} training jets leave some of the {self.world_size} ranks without jets")

    @property
    def width(self) -> int:
        """Jets in every batch (the classes)."""
        return min(self.batch_size, self.n_jets)

    @property
    def classes(self) -> np.ndarray:
        """This rank's classes."""
        return np.arange(self.rank, self.width, self.world_size)

    def __len__(self) -> int:
        steps = self.n_jets // self.width
        return min(steps, self.max_steps) if self.max_steps else steps

    def jets_in_step(self, step: int) -> int:
        """Jets of a global batch over all ranks."""
        return self.width

    def held(self) -> np.ndarray:
        """The training positions this rank holds (sorted): every member of its classes."""
        positions = (np.arange(-(-self.n_jets // self.width))[:, None] * self.width + self.classes[None, :]).ravel()
        return positions[positions < self.n_jets]

    def batches(self, epoch: int) -> np.ndarray:
        """``[steps, len(classes)]``: row ``j`` holds this rank's part of batch ``j``, as indices into :meth:`held`.

        Held position ``k * width + classes[i]`` is held index ``k * len(classes) + i``: the held
        positions run row by row, and only the last row is short.
        """
        steps = len(self)
        members = np.empty((len(self.classes), steps), np.int64)
        for i, c in enumerate(self.classes):
            size = len(range(int(c), self.n_jets, self.width))
            members[i] = np.random.default_rng([self.seed, epoch, int(c)]).permutation(size)[:steps]
        rows = members.T * len(self.classes) + np.arange(len(self.classes))[None, :]
        return np.sort(rows, axis=1)

    def positions(self, epoch: int) -> np.ndarray:
        """``[steps, len(classes)]``: this rank's part of each batch as training positions (for tests and logs)."""
        return self.held()[self.batches(epoch)]
