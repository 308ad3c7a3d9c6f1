"""What every component body shares: ``with step("train"):`` maps user errors, and records the time.

A :class:`toptagger.errors.TaggerError` inside the block prints ``error: <step>: <message>`` and
ends the task with exit status 2, without a traceback: the message names the input that is wrong
(the KFP UI shows the task's log). Anything else is a bug and keeps its traceback.

``python -m pipelines.run`` sets ``TOPTAGGER_STEP_EVENTS`` to a JSON-lines file; each step appends
one record (its time and error) there, for the run's summary and docs/pipeline.md's overhead
figures. Heavy imports belong inside the block, so that a step's time includes them, as a plain
script's would.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

EVENTS_ENV = "TOPTAGGER_STEP_EVENTS"
CODE_VERSION_ENV = "TOPTAGGER_CODE_VERSION"
REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("pipelines")


@contextlib.contextmanager
def step(name: str) -> Iterator[None]:
    """Run a component body: a user error ends the task with one line; the time goes to the events file."""
    from toptagger.errors import TaggerError

    started = time.perf_counter()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    try:
        yield
    except TaggerError as exc:
        _record(name, started, error=str(exc))
        print(f"error: {name}: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    _record(name, started)


def _record(name: str, started: float, error: str | None = None) -> None:
    path = os.environ.get(EVENTS_ENV)
    if not path:
        return
    record = {"step": name, "seconds": round(time.perf_counter() - started, 3), "error": error}
    with Path(path).open("a") as fh:  # one short line per append: safe across task processes
        fh.write(json.dumps(record) + "\n")


def code_version() -> str:
    """The git commit of the code: ``$TOPTAGGER_CODE_VERSION`` (images), else read from ``.git``."""
    if os.environ.get(CODE_VERSION_ENV):
        return os.environ[CODE_VERSION_ENV]
    git = REPO / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head
        ref = head[len("ref: ") :]
        if (git / ref).is_file():
            return (git / ref).read_text().strip()
        for line in (git / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0]
    except OSError:
        pass
    return "unknown"
