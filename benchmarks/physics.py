"""Physics benchmark: generate, train, and evaluate against the mass window on a separate sample.

Generated jets (no detector smearing) make the jet mass alone a strong tagger: |m - 175 GeV|
reaches 1/eps_B of about 330 at eps_S = 0.3. The benchmark passes when the network's 1/eps_B at
eps_S = 0.3 exceeds the mass window's by more than their combined bootstrap uncertainty, on a test
sample generated with another seed and holding at least 5k QCD jets (so that the rejection rests
on more than a handful of background jets).

Default: 24k training jets, 40x40 images, 8 epochs; about an hour on 2 CPU cores. Generated
samples are kept in --out and reused by a rerun with the same sizes and seeds.

    python -m benchmarks.physics --out runs/physics
    python -m benchmarks.physics --out /tmp/demo --train-jets 2000 \\
        --test-signal 500 --test-background 500 --epochs 1 --image-size 32   # a 3-minute smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

from toptagger.cli import positive_int, run_cli
from toptagger.errors import ConfigError
from toptagger.evaluation.evaluate import evaluate_model
from toptagger.jets.dataset import JetBatch, read_jets, write_jets
from toptagger.jets.generator import generate_jets
from toptagger.model import load_model
from toptagger.training import config as train_config
from toptagger.training.config import DEFAULT_IMAGE, TrainConfig
from toptagger.training.trainer import MODEL_DIR, train

log = logging.getLogger(__name__)
MIN_TEST_BACKGROUND = 5000
# The benchmark's training: 40x40 images, 8 epochs of 64 jets; the separate test sample replaces
# the held-out split, so all generated training jets are used (test_fraction 0).
DEFAULTS = TrainConfig(
    image=dataclasses.replace(DEFAULT_IMAGE, image_size=40), epochs=8, batch_size=64, test_fraction=0.0
)
TRAINING_FLAGS = (
    "image_size",
    "center",
    "rotate",
    "flip",
    "normalize",
    "weights",
    "epochs",
    "batch_size",
    "lr",
    "patience",
)
RESULT_FILE = "physics_benchmark.json"


def sample(path: Path, n_signal: int, n_background: int, seed: int, workers: int | None) -> JetBatch:
    """Generate a sample once; a later run with the same request reads it back."""
    if path.exists():
        jets = read_jets(path)
        if len(jets) == n_signal + n_background and int(jets.labels.sum()) == n_signal:
            log.info("reusing %s (%d jets)", path, len(jets))
            return jets
    jets = generate_jets(n_signal, n_background, seed=seed, workers=workers, progress=True)
    write_jets(path, jets)
    return jets


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.physics",
        description="Generate jets, train the ResNet-50 tagger, and compare it with the mass window.",
    )
    parser.add_argument("--out", required=True, type=Path, help="folder for samples, the run and the results")
    parser.add_argument("--train-jets", type=positive_int, default=24_000, help="generated jets for train + val")
    parser.add_argument("--test-signal", type=positive_int, default=5_000)
    parser.add_argument("--test-background", type=positive_int, default=10_000)
    parser.add_argument("--train-seed", type=int, default=101)
    parser.add_argument("--test-seed", type=int, default=202)
    train_config.add_arguments(parser, DEFAULTS, only=TRAINING_FLAGS)
    parser.add_argument("--bootstrap", type=positive_int, default=200)
    parser.add_argument("--workers", type=positive_int, default=None, help="generator processes (default: all cores)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--allow-small-test", action="store_true", help="permit < 5k QCD test jets (smoke runs)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.test_background < MIN_TEST_BACKGROUND and not args.allow_small_test:
        raise ConfigError(
            f"--test-background {args.test_background}: the benchmark needs >= {MIN_TEST_BACKGROUND} QCD test jets "
            "(pass --allow-small-test for a smoke run)"
        )
    if args.train_seed == args.test_seed:
        raise ConfigError("--train-seed and --test-seed must differ: the test sample must be independent")
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    n_top = args.train_jets // 2
    train_jets = sample(
        args.out / f"train_{args.train_jets}_s{args.train_seed}.h5",
        n_top,
        args.train_jets - n_top,
        args.train_seed,
        args.workers,
    )
    test_jets = sample(
        args.out / f"test_{args.test_signal}_{args.test_background}_s{args.test_seed}.h5",
        args.test_signal,
        args.test_background,
        args.test_seed,
        args.workers,
    )
    generated = time.perf_counter()
    config = dataclasses.replace(train_config.from_arguments(args, DEFAULTS), seed=args.train_seed)
    summary = train(config, train_jets, args.out / "run", device=args.device)
    trained = time.perf_counter()
    result = evaluate_model(
        load_model(args.out / "run" / MODEL_DIR), test_jets, args.out / "eval", n_bootstrap=args.bootstrap
    )
    verdict = result["network_vs_mass_window"]["rejection_0.3"]
    report = {
        "passed": verdict["network_beats_baseline"],
        "criterion": "network 1/eps_B(0.3) - mass window 1/eps_B(0.3) > combined bootstrap error",
        "network": result["network"],
        "mass_window": result["mass_window"],
        "comparison": result["network_vs_mass_window"],
        "best_val_auc": summary["best_val_auc"],
        "epochs_run": len(summary["history"]),
        "n_train": summary["n_train"],
        "n_val": summary["n_val"],
        "n_test_top": result["n_top"],
        "n_test_qcd": result["n_qcd"],
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "minutes": {
            "generation": (generated - started) / 60,
            "training": (trained - generated) / 60,
            "evaluation": (time.perf_counter() - trained) / 60,
        },
    }
    (args.out / RESULT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    net, base = result["network"]["rejection_0.3"], result["mass_window"]["rejection_0.3"]
    print(
        f"1/eps_B at eps_S = 0.3: network {net['value']} ± {net['error']}, "
        f"mass window {base['value']} ± {base['error']}"
    )
    print(
        f"AUC: network {result['network']['auc']['value']:.4f}, mass window {result['mass_window']['auc']['value']:.4f}"
    )
    print(f"{'PASSED' if report['passed'] else 'NOT PASSED'}: {report['criterion']}; see {args.out / RESULT_FILE}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
