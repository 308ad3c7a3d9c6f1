"""python -m components.generate: writes the reference layout, refuses bad arguments before generating."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from toptagger.jets.dataset import COLUMNS

REPO = Path(__file__).resolve().parents[2]


def test_cli_writes_the_reference_layout(tmp_path: Path) -> None:
    out = tmp_path / "jets.h5"
    result = _cli("--signal", "20", "--background", "20", "--out", str(out), "--seed", "5")
    assert result.returncode == 0, result.stderr
    frame = pd.read_hdf(out, "table")
    assert list(frame.columns) == list(COLUMNS) and len(frame) == 40
    assert frame["is_signal_new"].sum() == 20
    assert [p.name for p in tmp_path.iterdir()] == ["jets.h5"], "no temporary files left behind"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--signal", "0", "--background", "5"], "argument --signal: must be at least 1, got 0"),
        (["--signal", "5", "--background", "-3"], "argument --background: must be at least 1, got -3"),
        (["--signal", "x", "--background", "5"], "expected a whole number"),
    ],
)
def test_cli_rejects_bad_counts(tmp_path: Path, args: list[str], message: str) -> None:
    result = _cli(*args, "--out", str(tmp_path / "j.h5"))
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_fails_before_generating_on_an_unwritable_path(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    for out, message in (
        (tmp_path / "missing" / "j.h5", "does not exist"),
        (locked, "is a directory"),
    ):
        result = _cli("--signal", "5", "--background", "5", "--out", str(out))
        assert result.returncode == 2
        assert message in result.stderr
        assert "generating" not in result.stderr, "generation must not start"
        assert "Traceback" not in result.stderr


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "components.generate", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )
