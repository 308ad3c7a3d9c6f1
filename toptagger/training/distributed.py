"""Ranks, devices and reductions for data-parallel training with torch.distributed (DDP).

``python -m toptagger.training`` started by ``torchrun`` finds ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` in its environment
(torchrun sets them; Kubeflow Trainer's torch runtime hands torchrun its ``PET_*`` defaults,
reference.md §10) and :func:`initialized` joins the process group: gloo on CPU, nccl on CUDA.
Without torchrun nothing is initialised and the world is one rank, as before DDP existed.

The training semantics do not depend on the world size: ``batch_size`` is the optimizer's batch
summed over ranks, each rank renders and trains on its stride of every batch, and validation
scores are gathered so that every rank computes the AUC of the whole validation set. A
checkpoint written by one world size therefore resumes under any other.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from toptagger.errors import ConfigError
from toptagger.resources import cpu_limit

log = logging.getLogger(__name__)

# A rank that waits longer than this in a collective (a peer died or hangs) fails instead of
# hanging forever; long enough for rank 0 to write a ResNet-50 checkpoint to S3 meanwhile.
TIMEOUT = timedelta(minutes=10)


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (one rank without torchrun)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def main(self) -> bool:
        """Rank 0 writes checkpoints, the model and the logs; the others write nothing."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not a whole number (set by torchrun)") from None


def from_environment() -> World:
    """The world torchrun describes in the environment; one rank when it is not there."""
    size = _env_int("WORLD_SIZE", 1)
    world = World(
        rank=_env_int("RANK", 0),
        size=size,
        local_rank=_env_int("LOCAL_RANK", 0),
        local_size=_env_int("LOCAL_WORLD_SIZE", size),
    )
    if not 0 <= world.rank < world.size or not 0 <= world.local_rank < world.local_size:
        raise ConfigError(f"inconsistent torchrun environment: {world}")
    return world


def current() -> World:
    """The world of the initialised process group, else one rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return from_environment()


def resolve_device(name: str, world: World | None = None) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto``; under DDP ``cuda``/``auto`` mean this rank's local GPU."""
    world = world or World()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} requested but no CUDA GPU is available")
        if device.index is None:
            device = torch.device("cuda", world.local_rank if world.distributed else torch.cuda.current_device())
        if device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {device} requested but this node has {torch.cuda.device_count()} GPU(s)")
    return device


def threads_per_rank(world: World) -> int:
    """The cores this node's ranks may use divided among them, at least one thread each.

    Every rank would otherwise start one thread per core, and 2 ranks on 2 cores would fight over
    them (each rank then runs 1 thread). The cores are the pod's CPU limit, which its ranks share,
    else the CPU affinity (:func:`toptagger.resources.cpu_limit`): a node's core count would put
    more threads in a limited pod than its quota runs.
    """
    return max(1, cpu_limit() // world.local_size)


@contextlib.contextmanager
def initialized(device: str = "auto") -> Iterator[World]:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA) for the block.

    Without torchrun (``WORLD_SIZE`` unset or 1) it does nothing. Ranks other than 0 log only
    warnings and errors, so the training log is rank 0's.
    """
    world = from_environment()
    if not world.distributed or dist.is_initialized():
        yield current() if world.distributed else World()
        return
    dev = resolve_device(device, world)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    torch.set_num_threads(threads_per_rank(world))
    backend = "nccl" if dev.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=TIMEOUT, device_id=dev if dev.type == "cuda" else None)
    if not world.main:
        logging.getLogger().setLevel(logging.WARNING)
    log.info(
        "world size %d (%s; %d rank(s) on this node, %d thread(s) each)",
        world.size,
        backend,
        world.local_size,
        torch.get_num_threads(),
    )
    try:
        yield world
    finally:
        dist.destroy_process_group()


def shard(indices: np.ndarray, world: World) -> np.ndarray:
    """This rank's stride of ``indices``: the ranks' shards partition them, and differ in size by <= 1."""
    return indices[world.rank :: world.size]


def all_sum(values: list[float], world: World, device: torch.device) -> list[float]:
    """Element-wise sums over ranks (float64)."""
    if not world.distributed:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def gather(values: np.ndarray, world: World, device: torch.device) -> np.ndarray:
    """The 1-D float64 arrays of all ranks, concatenated in rank order, on every rank."""
    if not world.distributed:
        return values
    local = torch.as_tensor(np.asarray(values, dtype=np.float64), device=device)
    sizes = torch.zeros(world.size, dtype=torch.int64, device=device)
    sizes[world.rank] = len(local)
    dist.all_reduce(sizes)
    # all_gather wants equal shapes: pad to the longest shard, then drop the padding.
    longest = int(sizes.max())
    padded = torch.zeros(longest, dtype=torch.float64, device=device)
    padded[: len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(world.size)]
    dist.all_gather(parts, padded)
    return torch.cat([part[: int(n)] for part, n in zip(parts, sizes, strict=True)]).cpu().numpy()


def agree(flag: bool, world: World, device: torch.device) -> bool:
    """Rank 0's ``flag`` on every rank (e.g. whether a checkpoint exists to resume)."""
    if not world.distributed:
        return flag
    tensor = torch.tensor([float(flag)], device=device)
    dist.broadcast(tensor, src=0)
    return bool(tensor.item())


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


@contextlib.contextmanager
def local_rank_first(world: World) -> Iterator[None]:
    """Run the block on each node's local rank 0 first, then on the node's other ranks.

    For reading an s3:// file: the first reader downloads it into the node's cache
    (toptagger.storage), the others then find it there instead of downloading it G times at once.
    Every rank passes one barrier: local rank 0 after the block, the others before it.
    """
    if world.local_rank != 0:
        barrier(world)
    yield
    if world.local_rank == 0:
        barrier(world)
