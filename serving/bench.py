"""``python -m serving.bench``: the serving benchmark, whose code lives with the others in :mod:`benchmarks.serving`.

    python -m serving.bench --model-uri DIR [--clients 1,2,4,8,16,32,64] [--batch-sizes 1,4,16] ...

The predictor's image does not carry ``benchmarks/``; the benchmark runs where the clients run.
"""

from __future__ import annotations

import sys

from benchmarks.serving import main

if __name__ == "__main__":
    from toptagger.cli import run_cli

    sys.exit(run_cli(main))
