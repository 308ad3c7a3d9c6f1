"""Run the pipeline on this machine with Kubeflow's own local runner (``kfp.local``).

    python -m pipelines.run [--dataset PATH-OR-S3-URI | --signal N --background N] [--epochs N] ...
                            [--deploy none|local|cluster] [--no-cache] [--run-key KEY] [--keep-serving]

The same pipeline function as on a cluster, run by ``kfp.local.SubprocessRunner(use_venv=False)``:
each task is a subprocess of this venv (a fresh venv per task with torch would take minutes).
Local stand-ins: the task outputs go under ``.state/kfp/`` (the pipeline root), MLflow is the
embedded SQLite store ``.state/mlflow/`` unless ``MLFLOW_TRACKING_URI`` is set, checkpoints live
in ``.state/checkpoints/<run key>``. Data and preprocessing are cached (``--no-cache`` turns the
cache off); the cluster-only settings (GPU node pool, Secrets) are listed as skipped.
The run ends with a summary table; ``--summary-json`` also writes it as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from components.cli import positive_int, run_cli
from components.errors import ConfigError, TaggerError
from pipelines.compile import cluster_only_settings
from pipelines.report import ExecutorDumpFilter, events, print_table, summary_rows

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("pipelines.run")

# Small enough for 2 CPU cores: about 5 minutes, test AUC 0.9735 (docs/pipeline.md).
DEMO = {"n_signal": 3000, "n_background": 3000, "image_size": 40, "epochs": 5, "batch_size": 32}


class PipelineFailed(TaggerError, RuntimeError):
    """A task of the local run failed; the message is the task's own."""


# --------------------------------------------------------------------------------------------
# Arguments


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipelines.run", description=__doc__.split("\n\n")[0])
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default=os.environ.get("DATASET", ""),
                      help="reference-format jets (path or s3://); default $DATASET, else generate")  # fmt: skip
    data.add_argument("--signal", type=positive_int, default=DEMO["n_signal"], help="top jets to generate")
    data.add_argument("--background", type=positive_int, default=DEMO["n_background"], help="QCD jets to generate")
    data.add_argument("--workers", type=int, default=0, help="generator processes (0: all cores)")
    data.add_argument("--val-fraction", type=float, default=0.15)
    data.add_argument("--test-fraction", type=float, default=0.15)
    train = parser.add_argument_group("training")
    train.add_argument("--image-size", type=positive_int, default=DEMO["image_size"])
    train.add_argument("--epochs", type=positive_int, default=DEMO["epochs"])
    train.add_argument("--batch-size", type=positive_int, default=DEMO["batch_size"])
    train.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    train.add_argument("--seed", type=int, default=1)
    train.add_argument("--patience", type=positive_int, default=3)
    train.add_argument("--max-steps-per-epoch", type=int, default=0, help="0: whole epochs")
    train.add_argument("--base-model", default="", help="weights to fine-tune from (file, s3://, models:/...)")
    train.add_argument("--bootstrap", type=int, default=200, help="bootstrap replicas for the test metrics")
    registry = parser.add_argument_group("registry and serving")
    registry.add_argument("--experiment", default="top-tagging", help="MLflow experiment")
    registry.add_argument("--model-name", default="top-tagger", help="registered model name")
    registry.add_argument("--deploy", choices=("none", "local", "cluster"), default="local",
                          help="serve the champion: local predictor process (default), cluster, or none")  # fmt: skip
    registry.add_argument("--overlay", choices=("cpu", "gpu", "fpga"), default="cpu", help="with --deploy cluster")
    registry.add_argument("--namespace", default="", help="with --deploy cluster (default: the overlay's)")
    registry.add_argument("--http-port", type=positive_int, help="local predictor (default: a free port)")
    registry.add_argument("--grpc-port", type=positive_int, help="local predictor (default: a free port)")
    registry.add_argument("--keep-serving", action="store_true", help="leave the local predictor running")
    run = parser.add_argument_group("run")
    run.add_argument("--state", type=Path, default=Path(os.environ.get("STATE", REPO / ".state")),
                     help="local state folder (default .state)")  # fmt: skip
    run.add_argument("--no-cache", action="store_true", help="run every task, even the cached data steps")
    run.add_argument("--run-key", default="", help="resume the run with this key (printed at the start)")
    run.add_argument("--summary-json", type=Path, help="also write the summary as JSON")
    run.add_argument("--verbose", action="store_true", help="also print KFP's executor input/output dumps")
    return parser


def pipeline_arguments(args: argparse.Namespace, state: Path) -> dict[str, Any]:
    """The pipeline's parameters from the command line, checked before any task starts."""
    from pipelines.steps.deploy import TARGETS
    from pipelines.steps.train import train_config

    train = {
        "image_size": args.image_size, "epochs": args.epochs, "batch_size": args.batch_size,
        "learning_rate": args.lr, "seed": args.seed, "base_model_uri": args.base_model,
        "val_fraction": args.val_fraction, "test_fraction": args.test_fraction,
        "max_steps_per_epoch": args.max_steps_per_epoch, "patience": args.patience,
    }  # fmt: skip
    train_config(**train)  # raises ConfigError naming the bad value
    if not 0 < args.test_fraction < 1:
        raise ConfigError(f"--test-fraction must be in (0, 1), got {args.test_fraction}")
    if args.bootstrap < 0:
        raise ConfigError(f"--bootstrap must be >= 0, got {args.bootstrap}")
    if args.workers < 0:
        raise ConfigError(f"--workers must be >= 0 (0: all cores), got {args.workers}")
    if args.deploy not in TARGETS:
        raise ConfigError(f"--deploy must be one of {TARGETS}")
    if args.dataset and not args.dataset.startswith("s3://") and not Path(args.dataset).is_file():
        raise ConfigError(f"--dataset {args.dataset}: no such file")
    # A key known before the run starts, so that an interrupted run can be resumed with --run-key.
    run_key = args.run_key or f"local-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    http_port, grpc_port = args.http_port, args.grpc_port
    if args.deploy == "local":
        http_port, grpc_port = http_port or free_port(), grpc_port or free_port()
    dataset = args.dataset
    if dataset and not dataset.startswith("s3://"):
        dataset = str(Path(dataset).resolve())  # tasks run with another working directory in a cluster
    return train | {
        "dataset_uri": dataset, "n_signal": args.signal, "n_background": args.background,
        "generator_workers": args.workers, "n_bootstrap": args.bootstrap,
        "checkpoint_root": str(state / "checkpoints"), "run_key": run_key,
        "mlflow_experiment": args.experiment, "model_name": args.model_name, "deploy_target": args.deploy,
        "deploy_overlay": args.overlay, "deploy_namespace": args.namespace,
        "http_port": http_port or 8080, "grpc_port": grpc_port or 8081,
    }  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --------------------------------------------------------------------------------------------
# Running


def stop_predictor(details: dict[str, Any], timeout_s: float = 15.0) -> None:
    """SIGTERM the predictor the deploy step started (by its pid), SIGKILL if it lingers."""
    pid = details.get("pid")
    if not pid:
        return
    try:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            os.kill(pid, 0)
            time.sleep(0.2)
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_pipeline(arguments: dict[str, Any], state: Path, cache: bool = True, verbose: bool = False) -> dict[str, Any]:
    """Run the pipeline through kfp.local; returns the summary (raises PipelineFailed with the task's message)."""
    from kfp import local

    from components import registry
    from pipelines.steps import EVENTS_ENV
    from pipelines.steps.common import CODE_VERSION_ENV, code_version
    from pipelines.top_tagging import build_pipeline

    state = state.resolve()
    runs = state / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    tracking = registry.use_local_store_unless_configured(state)
    registry.check_tracking()  # fail in a second, not after training
    stamp = time.strftime("%Y%m%d-%H%M%S")
    events_file = runs / f"{stamp}-{os.getpid()}.events.jsonl"
    # The tasks are subprocesses: they import this repository and report their time and errors here.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    os.environ[EVENTS_ENV] = str(events_file)
    os.environ.setdefault(CODE_VERSION_ENV, code_version())
    os.environ.setdefault("MPLBACKEND", "Agg")
    log.info("run key %s: after an interruption, run again with --run-key %s to resume its training",
             arguments["run_key"], arguments["run_key"])  # fmt: skip
    for line in cluster_only_settings():  # what kfp.local ignores without a word
        log.info("skipped locally (kfp.local ignores it): %s", line)
    pipeline_root = state / "kfp"
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(pipeline_root),
        enable_caching=cache,
        cache_root=str(state / "kfp-cache"),
        raise_on_error=True,
    )
    pipeline = build_pipeline(local=True)
    stdout = sys.stdout
    started = time.perf_counter()
    try:
        if not verbose:
            sys.stdout = ExecutorDumpFilter(stdout)  # type: ignore[assignment]
        with warnings.catch_warnings():
            # The components image is not a "python" image name; locally this venv runs the tasks anyway.
            warnings.filterwarnings("ignore", message="You may be attemping to run a task", category=RuntimeWarning)
            outputs = pipeline(**arguments).outputs
    except RuntimeError as exc:
        failed = [e for e in events(events_file) if e.get("error")]
        message = f"{failed[-1]['step']}: {failed[-1]['error']}" if failed else str(exc)
        raise PipelineFailed(message) from None
    finally:
        sys.stdout = stdout
    seconds = time.perf_counter() - started
    steps = {e["step"]: e["seconds"] for e in events(events_file) if not e.get("error")}
    fit, test = outputs["fit_jets"].metadata, outputs["test_jets"].metadata
    steps_seconds = sum(steps.values())
    summary = {
        "data": {"n_jets": int(fit["n_jets"] + test["n_jets"]), "n_fit": int(fit["n_jets"]),
                 "n_test": int(test["n_jets"]), "source": fit.get("source", ""),
                 "dataset_sha256": fit.get("dataset_sha256", "")},
        "training": dict(outputs["training"].metadata),
        "evaluation": dict(outputs["evaluation"].metadata),
        "model_name": arguments["model_name"], "experiment": arguments["mlflow_experiment"],
        "tracking_uri": tracking,
        **{key: outputs[key] for key in ("run_id", "version", "aliases", "decision", "reason", "model_uri", "url")},
        "deployment": json.loads(outputs["deployment"]),
        # The train task is never cached, so its output lives in this run's own folder.
        "pipeline_root": str(Path(outputs["training"].uri).parents[1]),
        "seconds": seconds, "steps": steps, "steps_seconds": steps_seconds,
        "cached": [s for s in ("data", "preprocess") if s not in steps],
        "overhead_seconds": seconds - steps_seconds, "overhead_fraction": (seconds - steps_seconds) / seconds,
    }  # fmt: skip
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    arguments = pipeline_arguments(args, args.state.resolve())
    summary = run_pipeline(arguments, args.state, cache=not args.no_cache, verbose=args.verbose)
    summary["command_seconds"] = time.perf_counter() - started
    try:
        print_table(summary_rows(summary))
        if args.summary_json:
            args.summary_json.write_text(json.dumps(summary, indent=2) + "\n")
    finally:
        if summary["deployment"].get("pid") and not args.keep_serving:
            stop_predictor(summary["deployment"])
            print(f"stopped the predictor at {summary['url']} (--keep-serving leaves it running)")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
