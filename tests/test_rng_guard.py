"""tests/rng_guard.py: an inner pytest session (a subprocess, with the guard as its only plugin of ours)
runs tests that draw from the global RNGs with and without seeding them first."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

CASES = """
import random

import numpy as np
import pytest
import torch


@pytest.fixture(scope="session")
def seeded_model():
    torch.manual_seed(0)  # seeds, then initialises from the global RNG, like fpga_runtime.synthetic
    return torch.nn.Linear(4, 2)


@pytest.fixture(scope="module")
def unseeded_shared():
    return np.random.rand(3)


@pytest.fixture
def unseeded_input():
    return torch.rand(3)


@pytest.fixture
def seeding_fixture():
    np.random.seed(7)


def test_unseeded_torch():
    torch.randn(3)


def test_unseeded_numpy():
    np.random.normal(size=3)


def test_unseeded_torch_init():
    torch.nn.Linear(4, 2)


def test_seeded_torch():
    torch.manual_seed(0)
    torch.randn(3)


def test_seeded_torch_random_module():
    torch.random.manual_seed(0)
    torch.rand(3)


def test_seeded_numpy():
    np.random.seed(0)
    np.random.normal(size=3)


def test_local_generators():
    np.random.default_rng(0).normal(size=3)
    torch.randn(3, generator=torch.Generator().manual_seed(0))


def test_python_random_is_not_guarded():
    random.random()


def test_seed_without_a_value_is_not_a_seed():
    np.random.seed()
    np.random.rand(3)


def test_seeds_after_drawing_torch():
    torch.randn(3)
    torch.manual_seed(0)
    torch.randn(3)


def test_seeds_after_drawing_numpy():
    np.random.rand(3)
    np.random.seed(0)
    np.random.rand(3)


def test_unseeded_fixture(unseeded_input):
    pass


def test_fixture_seeds_for_the_body(seeding_fixture):
    np.random.normal(size=3)


def test_shared_fixture_seed_does_not_seed_the_body(seeded_model):
    torch.randn(3)  # passes only when this test happens to set the session fixture up: not allowed


def test_unseeded_shared_fixture(unseeded_shared):
    pass


def test_session_fixture_a(seeded_model):
    pass


def test_session_fixture_b(seeded_model):
    pass


def test_own_failure_is_reported_not_the_rng():
    torch.randn(3)
    assert 1 == 2, "the test's own failure"
"""

TORCH, NUMPY = "the global torch RNG", "numpy's global legacy RNG"
FAIL = {
    "test_unseeded_torch": ["the test body drew from " + TORCH, "without seeding it first in this test"],
    "test_unseeded_numpy": ["the test body drew from " + NUMPY, "without seeding it first in this test"],
    "test_unseeded_torch_init": ["the test body drew from " + TORCH],
    "test_seeds_after_drawing_torch": ["the test body drew from " + TORCH, "before seeding it"],
    "test_seeds_after_drawing_numpy": ["the test body drew from " + NUMPY, "before seeding it"],
    "test_shared_fixture_seed_does_not_seed_the_body": ["the test body drew from " + TORCH],
    "test_seed_without_a_value_is_not_a_seed": ["the test body drew from " + NUMPY, "without seeding it first"],
}
ERROR = {
    "test_unseeded_fixture": ["setup (fixtures) drew from " + TORCH, "without seeding it first in this test"],
    "test_unseeded_shared_fixture": [
        "module-scoped fixture 'unseeded_shared' drew from " + NUMPY,
        "without seeding it first in this fixture",
    ],
}
PASS = [
    "test_seeded_torch",
    "test_seeded_torch_random_module",
    "test_seeded_numpy",
    "test_local_generators",
    "test_python_random_is_not_guarded",
    "test_fixture_seeds_for_the_body",
    "test_session_fixture_a",
    "test_session_fixture_b",
]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, str]]:
    """name -> (passed | failure | error, message) of every case, from one inner session."""
    folder = tmp_path_factory.mktemp("rng_guard")
    (folder / "test_cases.py").write_text(textwrap.dedent(CASES))
    report = folder / "report.xml"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "tests.rng_guard",
            "-p",
            "no:cacheprovider",
            "-o",
            "addopts=",
            "--rootdir",
            str(folder),
            f"--junitxml={report}",
            "test_cases.py",
        ],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert report.exists(), proc.stdout + proc.stderr
    result: dict[str, tuple[str, str]] = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        kind, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                kind, message = child.tag, f"{child.get('message', '')}\n{child.text or ''}"
        result[case.get("name", "")] = (kind, message)
    assert set(result) == {*FAIL, *ERROR, *PASS, "test_own_failure_is_reported_not_the_rng"}, proc.stdout
    return result


@pytest.mark.parametrize("name", sorted(FAIL))
def test_unseeded_draws_fail_the_test(outcomes: dict[str, tuple[str, str]], name: str) -> None:
    kind, message = outcomes[name]
    assert kind == "failure"
    assert "unseeded random numbers in test_cases.py::" + name in message
    assert all(part in message for part in FAIL[name]), message
    assert ("torch.manual_seed(n)" if TORCH in FAIL[name][0] else "np.random.default_rng(n)") in message


@pytest.mark.parametrize("name", sorted(ERROR))
def test_unseeded_fixtures_error_in_setup(outcomes: dict[str, tuple[str, str]], name: str) -> None:
    kind, message = outcomes[name]
    assert kind == "error" and all(part in message for part in ERROR[name]), message


@pytest.mark.parametrize("name", PASS)
def test_seeded_or_local_draws_pass(outcomes: dict[str, tuple[str, str]], name: str) -> None:
    assert outcomes[name] == ("passed", "")


def test_a_failing_test_keeps_its_own_message(outcomes: dict[str, tuple[str, str]]) -> None:
    kind, message = outcomes["test_own_failure_is_reported_not_the_rng"]
    assert kind == "failure" and "the test's own failure" in message and "unseeded" not in message
