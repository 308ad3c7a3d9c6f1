"""Every benchmark is a CLI with --help (benchmarks are scripts, not tests: no timed assertions)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "module",
    [
        "benchmarks.data",
        "benchmarks.ml",
        "benchmarks.physics",
        "benchmarks.opencl",
        "benchmarks.opencl_accuracy",
        "benchmarks.stock_kserve",
        "benchmarks.limits",
        "benchmarks.serving",
        "benchmarks.precision",
    ],
)
def test_help(module: str) -> None:
    result = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0 and "usage:" in result.stdout, result.stderr
