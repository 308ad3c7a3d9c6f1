"""A pytest plugin that fails tests which draw from an unseeded global random number generator.

A test (its setup, session fixtures included, or its body) that changes the state of the global
torch RNG (``torch.rand``, ``torch.randn``, ``nn.init``, a ``DataLoader`` without a generator, ...)
or of numpy's global legacy RNG (``np.random.rand``, ``np.random.normal``, ...) must have seeded that
RNG first, in the same test, with ``torch.manual_seed`` / ``np.random.seed``; otherwise its inputs
depend on which tests ran before it, and so do its results (a CI failure came from exactly that).
Local generators (``np.random.default_rng(seed)``, ``torch.Generator().manual_seed(seed)``) leave the
global states alone and always pass. Python's ``random`` module is not guarded: retry jitter in the
clients uses it legitimately.

How: the seed functions are wrapped to record that the RNG was seeded in the current test, and
whether its state had already moved (been drawn from) before the seed; the hooks snapshot both
states before the setup and the call phase of every test and compare them afterwards. A fixture of
a wider scope (session, module, ...) is set up inside the setup of the first test that uses it and
is guarded there on its own: it must seed before it draws, and its seed does not count as the
test's (the tests after it would not get it). Teardown is not guarded. Enabled for the suite by
``tests/conftest.py``; elsewhere ``-p tests.rng_guard``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch

HOW_TO_FIX = {
    "torch": (
        "call torch.manual_seed(n) at the start of {where} (before anything draws: tensors, "
        "model initialisation, DataLoader shuffling), or draw from a local generator: "
        "g = torch.Generator().manual_seed(n); torch.randn(..., generator=g)"
    ),
    "numpy": (
        "draw from a local generator instead: rng = np.random.default_rng(n); rng.normal(...) "
        "(or call np.random.seed(n) at the start of {where})"
    ),
}
NAMES = {
    "torch": "the global torch RNG (torch.rand/randn/randint/randperm, nn.init, ...)",
    "numpy": "numpy's global legacy RNG (np.random.rand/randn/normal/uniform/choice/shuffle, ...)",
}


def _torch_state() -> torch.Tensor:
    return torch.random.get_rng_state()


def _numpy_state() -> tuple[Any, ...]:
    return np.random.get_state(legacy=True)


def _same_torch(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a, b)


def _same_numpy(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    # ('MT19937', key[624], pos, has_gauss, cached_gaussian)
    return a[0] == b[0] and np.array_equal(a[1], b[1]) and a[2:] == b[2:]


SNAPSHOT: dict[str, Callable[[], Any]] = {"torch": _torch_state, "numpy": _numpy_state}
SAME: dict[str, Callable[[Any, Any], bool]] = {"torch": _same_torch, "numpy": _same_numpy}


@dataclass
class _Watch:
    """What the current test did to the global RNGs."""

    active: bool = False
    start: dict[str, Any] = field(default_factory=dict)  # state at the start of the current phase
    seeded: set[str] = field(default_factory=set)  # seeded (before any draw) in this test
    drew_before_seed: set[str] = field(default_factory=set)  # drawn from before its seed in this test
    pending: list[str] = field(default_factory=list)  # found inside shared fixtures of this phase

    def reset(self) -> None:
        self.seeded.clear()
        self.drew_before_seed.clear()

    def begin(self) -> None:
        self.start = {rng: SNAPSHOT[rng]() for rng in SNAPSHOT}
        self.pending = []
        self.active = True

    def moved(self, rng: str) -> bool:
        return not SAME[rng](self.start[rng], SNAPSHOT[rng]())


WATCH = _Watch()
_ORIGINALS: dict[tuple[Any, str], Callable[..., Any]] = {}


def _seed_wrapper(rng: str, original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def seed(*args: Any, **kwargs: Any) -> Any:
        # np.random.seed() without a value seeds from the OS: not reproducible, so not a seed here
        value = args[0] if args else kwargs.get("seed")
        if WATCH.active and rng not in WATCH.seeded and value is not None:
            if WATCH.moved(rng):
                WATCH.drew_before_seed.add(rng)
            WATCH.seeded.add(rng)
        return original(*args, **kwargs)

    seed.__rng_guard__ = True  # type: ignore[attr-defined]
    return seed


def _install() -> None:
    targets = [(torch, "manual_seed", "torch"), (torch.random, "manual_seed", "torch"), (np.random, "seed", "numpy")]
    for owner, name, rng in targets:
        current = getattr(owner, name)
        if getattr(current, "__rng_guard__", False):
            continue
        _ORIGINALS[(owner, name)] = current
        setattr(owner, name, _seed_wrapper(rng, current))


def _uninstall() -> None:
    for (owner, name), original in _ORIGINALS.items():
        setattr(owner, name, original)
    _ORIGINALS.clear()


def pytest_configure(config: pytest.Config) -> None:
    # Before any test module is imported, so that module-level seeds are wrapped too.
    _install()


def pytest_unconfigure(config: pytest.Config) -> None:
    _uninstall()


def _violations(phase: str, where: str = "this test") -> list[str]:
    found = []
    for rng in SNAPSHOT:
        if rng in WATCH.drew_before_seed:
            found.append(
                f"{phase} drew from {NAMES[rng]} before seeding it (the seed came too late: the values drawn "
                f"before it depend on the tests that ran earlier); {HOW_TO_FIX[rng].format(where=where)}"
            )
        elif rng not in WATCH.seeded and WATCH.moved(rng):
            found.append(
                f"{phase} drew from {NAMES[rng]} without seeding it first in {where}; "
                + HOW_TO_FIX[rng].format(where=where)
            )
    return found


def _guard(item: pytest.Item, phase: str) -> Generator[None, Any, Any]:
    WATCH.begin()
    failed = False
    try:
        return (yield)
    except BaseException:
        failed = True  # the test's own failure is the news; do not pile the RNG report on top
        raise
    finally:
        problems = WATCH.pending + _violations(phase)
        WATCH.active = False
        WATCH.drew_before_seed.clear()  # reported once, not again in the next phase (the rng counts as seeded)
        if problems and not failed:
            pytest.fail(f"unseeded random numbers in {item.nodeid}:\n  " + "\n  ".join(problems), pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(
    fixturedef: pytest.FixtureDef[Any], request: pytest.FixtureRequest
) -> Generator[None, Any, Any]:
    """A fixture of a wider scope than the test is guarded on its own: it must seed what it draws,
    and its seeds do not count for the test that happens to set it up first (they would not for
    the tests after it)."""
    if not WATCH.active or fixturedef.scope == "function":
        return (yield)
    WATCH.pending += _violations(f"setup before fixture {fixturedef.argname!r}")
    WATCH.drew_before_seed.clear()
    outer_seeded = set(WATCH.seeded)
    WATCH.start = {rng: SNAPSHOT[rng]() for rng in SNAPSHOT}
    WATCH.seeded.clear()
    try:
        return (yield)
    finally:
        WATCH.pending += _violations(f"{fixturedef.scope}-scoped fixture {fixturedef.argname!r}", "this fixture")
        WATCH.drew_before_seed.clear()
        WATCH.seeded = outer_seeded
        WATCH.start = {rng: SNAPSHOT[rng]() for rng in SNAPSHOT}


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, Any, Any]:
    WATCH.reset()
    return (yield from _guard(item, "setup (fixtures)"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, Any, Any]:
    return (yield from _guard(item, "the test body"))
