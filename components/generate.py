"""Generate top and QCD jets with Pythia8 + FastJet and write them in the reference layout.

    python -m components.generate --signal 500 --background 500 --out jets.h5 --seed 1

The command-line form of the pipeline's generation (:mod:`toptagger.jets.generator` does the
physics; the data step calls the same function).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence

from toptagger import storage
from toptagger.cli import positive_int, run_cli
from toptagger.jets.dataset import write_jets
from toptagger.jets.generator import generate_jets


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m components.generate",
        description="Generate top (signal) and QCD (background) jets with Pythia8 + FastJet anti-kT R=0.8 "
        "and write them in the Top Quark Tagging Reference Dataset layout.",
    )
    parser.add_argument("--signal", type=positive_int, required=True, help="number of top jets")
    parser.add_argument("--background", type=positive_int, required=True, help="number of QCD jets")
    parser.add_argument("--out", required=True, help="output .h5 path or s3:// URI (written atomically)")
    parser.add_argument("--seed", type=int, default=1, help="random seed; the same seed gives the same file")
    parser.add_argument(
        "--workers", type=positive_int, default=os.cpu_count() or 1, help="parallel processes (default: all cores)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    storage.check_writable(args.out)  # before minutes of generation, not after
    batch = generate_jets(args.signal, args.background, args.seed, args.workers, progress=not args.no_progress)
    write_jets(args.out, batch)
    print(f"wrote {len(batch)} jets ({args.signal} top, {args.background} QCD) to {args.out}")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(run_cli(main))
