"""Batch normalisation over the global batch: 2 real gloo ranks against one process on the whole batch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from serving.process import free_port
from toptagger.training import distributed
from toptagger.training.sync_batchnorm import GlobalBatchNorm2d, synchronize


def _network() -> nn.Module:
    torch.manual_seed(0)
    network = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 3, 3), nn.BatchNorm2d(3))
    with torch.no_grad():  # not the identity: the affine parameters take part
        for module in network:
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return network


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(7, 2, 8, 8, generator=generator, dtype=torch.float64) * 3 + 1
    target = torch.randn(7, 3, 4, 4, generator=generator, dtype=torch.float64)
    return x, target


def _step(network: nn.Module, x: torch.Tensor, target: torch.Tensor, scale: float) -> dict[str, torch.Tensor]:
    out = network(x)
    ((out - target) ** 2).sum().mul(scale).backward()
    return {
        **{f"grad.{k}": p.grad.clone() for k, p in network.named_parameters()},
        **{f"buffer.{k}": b.clone() for k, b in network.named_buffers()},
        "x.grad": x.grad.clone(),
    }


def _rank(rank: int, port: int, folder: str, parts: list[list[int]]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    os.environ.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    with distributed.initialized("cpu"):
        network = synchronize(_network().double(), torch.device("cpu"))
        assert sum(isinstance(m, GlobalBatchNorm2d) for m in network.modules()) == 2
        x, target = _batch()
        mine = x[parts[rank]].clone().requires_grad_(True)
        result = _step(network, mine, target[parts[rank]], scale=1.0)
        # this rank's parameter gradients are its own: the sum over ranks is the whole batch's
        torch.save(result, Path(folder) / f"rank{rank}.pt")


@pytest.mark.parametrize("parts", [[[0, 1, 2], [3, 4, 5, 6]], [[0, 2, 4, 6], [1, 3, 5]]])
def test_two_ranks_normalise_over_the_global_batch_as_one_process_does(tmp_path: Path, parts: list[list[int]]) -> None:
    mp.start_processes(_rank, args=(free_port(), str(tmp_path), parts), nprocs=2, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    x, target = _batch()
    whole = _network().double()
    x.requires_grad_(True)
    expected = _step(whole, x, target, scale=1.0)
    # float64 throughout: agreement to 1e-10 says the algebra is that of the whole batch
    for name, value in expected.items():
        if name == "x.grad":
            got = torch.empty_like(value)
            for rank, rows in enumerate(parts):
                got[rows] = ranks[rank]["x.grad"]
        elif name.startswith("grad."):
            got = ranks[0][name] + ranks[1][name]
        else:
            got = ranks[0][name]
            assert torch.equal(got, ranks[1][name]), name  # running statistics: the same on both ranks
        torch.testing.assert_close(got, value, rtol=1e-10, atol=1e-10, msg=lambda m, name=name: f"{name}: {m}")


def test_without_a_process_group_it_is_plain_batch_norm() -> None:
    x, target = _batch()
    plain, converted = _network().double(), synchronize(_network().double(), torch.device("cpu"))
    a = _step(plain, x.clone().requires_grad_(True), target, 1.0)
    b = _step(converted, x.clone().requires_grad_(True), target, 1.0)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert converted.load_state_dict(plain.state_dict()) is not None  # the same keys: checkpoints load either way
