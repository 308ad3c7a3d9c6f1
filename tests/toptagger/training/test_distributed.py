"""Data-parallel training with real torch.distributed: 2 gloo processes on loopback.

The processes are real (``torch.multiprocessing`` here, ``torchrun`` in tests/components/test_train.py),
the process group is real gloo over 127.0.0.1, and each rank runs the real trainer. Small images
(16 px) and one or two steps keep each test to seconds of compute on 2 cores.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from serving.process import free_port
from toptagger.errors import ConfigError, DataError
from toptagger.images import ImageConfig
from toptagger.jets.compact import save_jets
from toptagger.jets.dataset import JetBatch
from toptagger.model import build_model
from toptagger.training import distributed
from toptagger.training.config import TrainConfig
from toptagger.training.data import JetImageLoader, load_training_jets, split_indices
from toptagger.training.distributed import World
from toptagger.training.trainer import CHECKPOINT_FILE, HISTORY_FILE, MODEL_DIR, train

STEP = TrainConfig(
    image=ImageConfig(image_size=16, center="centroid", rotate=True, flip=True, normalize=True),
    epochs=1,
    batch_size=16,
    max_steps_per_epoch=1,
    patience=5,
    seed=3,
    lr=1e-3,
)


def test_world_from_the_torchrun_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.from_environment() == World() and not World().distributed and World().main
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    world = distributed.from_environment()
    assert world == World(rank=3, size=4, local_rank=1, local_size=2) and not world.main
    assert distributed.threads_per_rank(world) == max(1, len(os.sched_getaffinity(0)) // 2)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ConfigError, match="inconsistent torchrun environment"):
        distributed.from_environment()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ConfigError, match="WORLD_SIZE"):
        distributed.from_environment()
    # Without a process group the helpers are the identity: one rank, as before DDP.
    assert distributed.current() == World()
    values = np.arange(5.0)
    assert distributed.gather(values, World(), torch.device("cpu")) is values
    assert distributed.all_sum([1.0, 2.0], World(), torch.device("cpu")) == [1.0, 2.0]


def test_rank_shards_partition_every_global_batch(small_jets: JetBatch) -> None:
    jets = small_jets[:101]
    cpu = torch.device("cpu")
    whole = JetImageLoader(jets, STEP.image, 16, seed=1, device=cpu, prefetch=0)
    ranks = [JetImageLoader(jets, STEP.image, 16, seed=1, device=cpu, rank=r, world_size=3) for r in range(3)]
    # 101 = 6 * 16 + 5: the short last batch still gives each of 3 ranks a jet
    assert len(whole) == 7 and all(len(loader) == 7 for loader in ranks)
    for step, (_, labels) in enumerate(whole):
        parts = [loader.batch_indices(step) for loader in ranks]
        # strides of the sorted batch: interleaved, the ranks' jets are the whole batch
        merged = np.empty(whole.jets_in_step(step), np.int64)
        for r, part in enumerate(parts):
            merged[r::3] = part
        np.testing.assert_array_equal(merged, whole.batch_indices(step))
        assert len(labels) == len(merged)
    for loader in ranks:
        for step, (images, labels) in enumerate(loader):
            mine = loader.batch_indices(step)
            assert torch.equal(images, STEP.image.render(torch.from_numpy(loader.constituents[mine])))
            assert torch.equal(labels, torch.from_numpy(jets.labels[mine]))
    # 100 = 6 * 16 + 4 jets on 5 ranks: the last batch cannot feed every rank and is left out
    assert len(JetImageLoader(jets[:100], STEP.image, 16, seed=1, device=cpu, rank=0, world_size=5)) == 6
    with pytest.raises(DataError, match="without jets"):
        JetImageLoader(jets, STEP.image, 2, seed=1, device=cpu, rank=0, world_size=3)


def test_prefetching_changes_nothing_and_stops_with_the_loop(small_jets: JetBatch) -> None:
    import threading

    cpu = torch.device("cpu")
    ahead = JetImageLoader(small_jets[:80], STEP.image, 16, seed=2, device=cpu, prefetch=3)
    inline = JetImageLoader(small_jets[:80], STEP.image, 16, seed=2, device=cpu, prefetch=0)
    for (a, la), (b, lb) in zip(ahead, inline, strict=True):
        assert torch.equal(a, b) and torch.equal(la, lb)
    batches = iter(ahead)
    next(batches)
    batches.close()  # leaving the loop early
    assert not [t for t in threading.enumerate() if t.name == "jet-image-prefetch"]
    # an error while rendering ahead reaches the training loop, naming the problem
    broken = small_jets[np.arange(40)]  # a copy: the fixture is shared
    broken.constituents[20, 0, 1] = np.nan
    with pytest.raises(DataError, match="NaN"):
        list(JetImageLoader(broken, STEP.image, 16, seed=2, device=cpu, prefetch=2))


def test_training_data_in_either_format(small_jets: JetBatch, jets_file: Path, tmp_path: Path) -> None:
    compact = tmp_path / "fit.npz"
    save_jets(compact, small_jets)
    for path in (jets_file, compact):
        jets = load_training_jets(path)
        assert len(jets) == len(small_jets)
        np.testing.assert_array_equal(jets.labels, small_jets.labels)
    (tmp_path / "notes.txt").write_text("not jets")
    with pytest.raises(DataError, match=r"notes\.txt: neither the reference layout"):
        load_training_jets(tmp_path / "notes.txt")
    with pytest.raises(DataError, match=r"missing\.h5: no such file"):
        load_training_jets(tmp_path / "missing.h5")


# ----------------------------------------------------------------------------------------------
# Two real ranks


def _rank(rank: int, port: int, data: str, folder: str) -> None:
    """One rank of a 2-process gloo group, set up as torchrun would; trains into its own folder."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE="2",
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE="2",
    )

    def keep(epoch: int, model: nn.Module, record: dict) -> None:
        torch.save(
            {
                "params": {k: p.detach().clone() for k, p in model.named_parameters()},
                "grads": {k: p.grad.clone() for k, p in model.named_parameters()},
                "record": record,
                "threads": torch.get_num_threads(),
            },
            Path(folder) / f"rank{rank}.pt",
        )

    with distributed.initialized("cpu") as world:
        with distributed.local_rank_first(world):  # as components.train reads --data
            jets = load_training_jets(data)
        # Each rank gets a folder of its own here (torchrun runs share one): what lands in
        # rank 1's shows whether a rank other than 0 writes.
        train(STEP, jets, Path(folder) / f"run{rank}", device="cpu", progress=False, on_epoch=keep)


def _half_step_gradient(config: TrainConfig, jets: JetBatch, rank: int, threads: int) -> dict[str, torch.Tensor]:
    """The gradient rank ``rank`` computes alone on its half of the first batch (no communication)."""
    train_idx, _, _ = split_indices(len(jets), config.seed, config.val_fraction, config.test_fraction)
    loader = JetImageLoader(
        jets[train_idx], config.image, config.batch_size, config.seed, torch.device("cpu"), rank=rank, world_size=2
    )
    images, labels = next(iter(loader))
    torch.manual_seed(config.seed)
    model = build_model(config.tagger).train()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # the ranks' thread count: the same kernels, the same roundings
    try:
        loss = nn.CrossEntropyLoss(reduction="sum")(model(images), labels) * (2 / loader.jets_in_step(0))
        loss.backward()
    finally:
        torch.set_num_threads(before)
    return {k: p.grad for k, p in model.named_parameters()}


@pytest.mark.slow
def test_two_gloo_ranks_average_gradients_and_only_rank_0_writes(small_jets: JetBatch, tmp_path: Path) -> None:
    data = tmp_path / "jets.npz"
    save_jets(data, small_jets)
    mp.start_processes(_rank, args=(free_port(), str(data), str(tmp_path)), nprocs=2, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    # After the step both ranks hold the same weights, bit for bit, and agree on the metrics.
    for name, weight in ranks[0]["params"].items():
        assert torch.equal(weight, ranks[1]["params"][name]), name
    assert ranks[0]["record"]["val_auc"] == ranks[1]["record"]["val_auc"]
    assert ranks[0]["record"]["train_loss"] == ranks[1]["record"]["train_loss"]
    # The gradient is the average of the two halves' gradients: DDP adds g0 / 2 and g1 / 2, and
    # halving is exact in binary floating point, so with each half computed as its rank did
    # (same inputs, same thread count) the sum is the same float32 addition.
    halves = [_half_step_gradient(STEP, small_jets, r, ranks[r]["threads"]) for r in range(2)]
    for name, grad in ranks[0]["grads"].items():
        assert torch.equal(grad, halves[0][name] / 2 + halves[1][name] / 2), name
    # ... and not what one rank would have done on its half of the data alone.
    flat = torch.cat([g.flatten() for g in ranks[0]["grads"].values()])
    half = torch.cat([g.flatten() for g in halves[0].values()])
    assert float((flat - half).norm() / half.norm()) > 0.1
    torch.manual_seed(STEP.seed)
    alone = build_model(STEP.tagger)
    for name, p in alone.named_parameters():
        p.grad = halves[0][name].clone()
    torch.optim.AdamW(alone.parameters(), lr=STEP.lr, weight_decay=STEP.weight_decay).step()
    moved = [not torch.equal(p.detach(), ranks[0]["params"][k]) for k, p in alone.named_parameters()]
    assert sum(moved) > len(moved) // 2
    # Only rank 0 wrote: a checkpoint, the model and the history; rank 1 wrote nothing at all.
    assert {p.name for p in (tmp_path / "run0").iterdir()} == {CHECKPOINT_FILE, MODEL_DIR, HISTORY_FILE}
    assert not (tmp_path / "run1").exists()
