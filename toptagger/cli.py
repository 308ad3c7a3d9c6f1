"""Small helpers that give every CLI the same behaviour on user errors."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from toptagger.errors import TaggerError


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run ``main(argv)``; turn a :class:`TaggerError` into ``error: ...`` and exit status 2."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("numexpr").setLevel(logging.WARNING)  # pandas' import announces its thread count
    try:
        return int(main(argv) or 0)
    except TaggerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1, with a message that names the value."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a number >= 0, with a message that names the value."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value
