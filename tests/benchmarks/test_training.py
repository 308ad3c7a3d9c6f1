"""benchmarks.training: a CLI with --help, and its pieces (no timed assertions: it is a script, not a test)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from benchmarks.training import command, steady_rate, tiled
from toptagger.jets.dataset import JetBatch

REPO = Path(__file__).resolve().parents[2]


def test_help() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.training", "--help"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0 and "--ranks" in result.stdout, result.stderr


def test_one_rank_runs_without_torchrun_and_more_under_it() -> None:
    assert command(1, ["--out", "x"])[1:] == ["-m", "toptagger.training", "--out", "x"]
    several = command(2, ["--out", "x"])
    assert several[1:4] == ["-m", "torch.distributed.run", "--standalone"] and "--nproc-per-node=2" in several
    assert several[-4:] == ["-m", "toptagger.training", "--out", "x"]


def test_the_first_epoch_is_left_out_of_the_rate() -> None:
    assert steady_rate([{"jets_per_second": 10.0}, {"jets_per_second": 30.0}, {"jets_per_second": 50.0}]) == 40.0
    assert steady_rate([{"jets_per_second": 10.0}]) == 10.0


def test_the_memory_file_tiles_the_jets_in_chunks(small_jets: JetBatch) -> None:
    chunks = list(tiled(small_jets[:30], 70, chunk=25))
    assert [len(c) for c in chunks] == [25, 25, 20]
    labels = np.concatenate([c.labels for c in chunks])
    np.testing.assert_array_equal(labels, np.tile(small_jets.labels[:30], 3)[:70])
