"""toptagger.resources.cpu_limit on fake cgroup files: v2, v1, no limit, unreadable, and the affinity cap."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from toptagger import resources
from toptagger.resources import cpu_limit

CORES = 8  # the affinity the tests pretend to have, so that a quota can be below it


@pytest.fixture(autouse=True)
def eight_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resources, "affinity", lambda: CORES)


def v2(root: Path, text: str) -> Path:
    (root / "cpu.max").write_text(text)
    return root


def v1(root: Path, quota: str, period: str = "100000", folder: str = "cpu") -> Path:
    (root / folder).mkdir(parents=True)
    (root / folder / "cpu.cfs_quota_us").write_text(quota + "\n")
    (root / folder / "cpu.cfs_period_us").write_text(period + "\n")
    return root


@pytest.mark.parametrize(("text", "cores"), [("200000 100000\n", 2), ("150000 100000", 2), ("50000 100000", 1)])
def test_a_cgroup_v2_quota_is_rounded_up_to_whole_cores(tmp_path: Path, text: str, cores: int) -> None:
    assert cpu_limit(v2(tmp_path, text)) == cores


def test_cgroup_v2_max_means_the_affinity(tmp_path: Path) -> None:
    assert cpu_limit(v2(tmp_path, "max 100000\n")) == CORES


@pytest.mark.parametrize("folder", resources.V1_CPU_DIRS)
def test_a_cgroup_v1_quota_counts_where_there_is_no_v2_file(tmp_path: Path, folder: str) -> None:
    assert cpu_limit(v1(tmp_path, "300000", folder=folder)) == 3


def test_cgroup_v1_minus_one_means_the_affinity(tmp_path: Path) -> None:
    assert cpu_limit(v1(tmp_path, "-1")) == CORES


def test_v2_comes_before_v1(tmp_path: Path) -> None:
    assert cpu_limit(v2(v1(tmp_path, "300000"), "100000 100000")) == 1


def test_a_quota_never_raises_the_count_above_the_affinity(tmp_path: Path) -> None:
    assert cpu_limit(v2(tmp_path, f"{64 * 100000} 100000")) == CORES
    assert cpu_limit(v1(tmp_path / "v1", "6400000")) == CORES


@pytest.mark.parametrize("text", ["", "garbage", "100000", "0 100000", "100000 0", "-5 100000"])
def test_a_v2_file_it_cannot_read_means_the_affinity(tmp_path: Path, text: str) -> None:
    assert cpu_limit(v2(tmp_path, text)) == CORES
    assert cpu_limit(v1(tmp_path, "200000")) == CORES  # v1 counts only where there is no v2 file


def test_no_cgroup_files_mean_the_affinity(tmp_path: Path) -> None:
    assert cpu_limit(tmp_path / "absent") == CORES
    assert cpu_limit(v1(tmp_path, "not a number")) == CORES


def test_the_real_machine_gets_between_one_core_and_its_affinity(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.undo()  # the real affinity
    assert 1 <= cpu_limit() <= resources.affinity()
    if hasattr(os, "sched_getaffinity"):
        assert resources.affinity() == len(os.sched_getaffinity(0))
