"""Plain, testable functions behind the pipeline's components (one module per step).

Each step takes KFP artifact objects (anything with ``.path`` and ``.metadata``; ``Metrics`` also
``log_metric``) and plain values, so a test can call it with ``kfp.dsl`` artifacts on a tmp
folder, and the ``@dsl.component`` bodies in :mod:`pipelines.tasks` stay one call long:
``run_step("train", "pipelines.steps.train:run", ...)``.

This module imports nothing heavy: :func:`run_step` imports the step's module itself, so that the
step's own time (what ``docs/pipeline.md`` compares the pipeline's overhead with) includes
importing torch and MLflow, as a plain script would.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

# pipelines.run sets this to a JSON-lines file: one record per finished step (time, error).
EVENTS_ENV = "TOPTAGGER_STEP_EVENTS"


def run_step(name: str, target: str, /, **kwargs: Any) -> Any:
    """Import ``module:function`` and call it; a user error ends the task with one line.

    A :class:`components.errors.TaggerError` prints ``error: <step>: <message>`` and exits with
    status 2, without a traceback: the message names the input that is wrong. Anything else is
    a bug and keeps its traceback.
    """
    started = time.perf_counter()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    from components.errors import TaggerError

    module, _, function = target.partition(":")
    try:
        result = getattr(importlib.import_module(module), function)(**kwargs)
    except TaggerError as exc:
        _record(name, started, error=str(exc))
        print(f"error: {name}: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    _record(name, started)
    return result


def _record(name: str, started: float, error: str | None = None) -> None:
    path = os.environ.get(EVENTS_ENV)
    if not path:
        return
    record = {"step": name, "seconds": round(time.perf_counter() - started, 3), "error": error}
    with Path(path).open("a") as fh:  # one short line per append: safe across task processes
        fh.write(json.dumps(record) + "\n")
