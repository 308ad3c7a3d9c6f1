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
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from components.deploy import TARGETS
from pipelines.compile import cluster_only_settings
from pipelines.report import ExecutorDumpFilter, events, print_table, summary_rows
from serving.process import free_port
from toptagger.cli import positive_int, run_cli
from toptagger.constants import GRPC_PORT, HTTP_PORT, OVERLAYS
from toptagger.errors import ConfigError, TaggerError
from toptagger.mlflow_store import state_dir
from toptagger.precision.gate import check_max_auc_loss
from toptagger.training.config import PIPELINE_PARAMETERS, TrainConfig

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("pipelines.run")


class PipelineFailed(TaggerError, RuntimeError):
    """A task of the local run failed; the message is the task's own."""


# --------------------------------------------------------------------------------------------
# Arguments


# The pipeline's parameters as flags: (group, parameter, flag, argparse settings that differ).
# Type, default and help come from the pipeline itself (its signature and docstring), so this
# runner cannot drift from what a Kubeflow user sees; checkpoint_root comes from --state.
FLAGS: tuple[tuple[str, str, str, dict[str, Any]], ...] = (
    (
        "data",
        "dataset_uri",
        "--dataset",
        {"default": os.environ.get("DATASET", ""), "help": "the default comes from $DATASET"},
    ),
    ("data", "n_signal", "--signal", {"type": positive_int}),
    ("data", "n_background", "--background", {"type": positive_int}),
    ("data", "n_shards", "--n-shards", {"type": positive_int}),
    ("data", "generator_workers", "--workers", {}),
    ("data", "val_fraction", "--val-fraction", {}),
    ("data", "test_fraction", "--test-fraction", {}),
    ("training", "image_size", "--image-size", {"type": positive_int}),
    ("training", "epochs", "--epochs", {"type": positive_int}),
    ("training", "batch_size", "--batch-size", {"type": positive_int}),
    ("training", "learning_rate", "--lr", {}),
    ("training", "seed", "--seed", {}),
    ("training", "patience", "--patience", {"type": positive_int}),
    ("training", "max_steps_per_epoch", "--max-steps-per-epoch", {}),
    ("training", "base_model_uri", "--base-model", {}),
    ("training", "n_bootstrap", "--bootstrap", {}),
    ("precision", "max_auc_loss", "--max-auc-loss", {}),
    ("precision", "calibration_jets", "--calibration-jets", {"type": positive_int}),
    ("precision", "quantize_validation_jets", "--quantize-validation-jets", {"type": positive_int}),
    ("registry and serving", "mlflow_experiment", "--experiment", {}),
    ("registry and serving", "model_name", "--model-name", {}),
    ("registry and serving", "deploy_target", "--deploy", {"choices": TARGETS, "default": "local"}),
    ("registry and serving", "deploy_overlay", "--overlay", {"choices": OVERLAYS}),
    ("registry and serving", "deploy_namespace", "--namespace", {}),
    ("registry and serving", "http_port", "--http-port", {"type": positive_int, "default": None}),
    ("registry and serving", "grpc_port", "--grpc-port", {"type": positive_int, "default": None}),
    ("run", "run_key", "--run-key", {}),
)
_TYPES = {"String": str, "Integer": int, "Float": float, "Boolean": bool}
_LOCAL_HELP = {
    "deploy_target": "serve the champion: local predictor process (default here), cluster, or none",
    "http_port": "local predictor (default: a free port)",
    "grpc_port": "local predictor (default: a free port)",
}


def build_parser() -> argparse.ArgumentParser:
    from pipelines.top_tagging import top_tagging

    parser = argparse.ArgumentParser(
        prog="python -m pipelines.run",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    inputs = top_tagging.component_spec.inputs
    groups: dict[str, argparse._ArgumentGroup] = {}
    for group, name, flag, settings in FLAGS:
        spec = inputs[name]
        description = " ".join((spec.description or "").split()).replace("%", "%%")
        note = settings.get("help")
        metavar = flag.removeprefix("--").upper().replace("-", "_")
        options = {"dest": name, "type": _TYPES[spec.type], "default": spec.default, "metavar": metavar}
        options |= {key: value for key, value in settings.items() if key != "help"}
        if "choices" in options:
            del options["metavar"]  # argparse then lists the choices
        options["help"] = f"{description} ({note})" if note else _LOCAL_HELP.get(name, description)
        if group not in groups:
            groups[group] = parser.add_argument_group(group)
        groups[group].add_argument(flag, **options)
    run = groups["run"]
    run.add_argument(
        "--state",
        type=Path,
        default=state_dir(),
        help="local state folder (default .state)",
    )
    run.add_argument("--no-cache", action="store_true", help="run every task, even the cached data steps")
    run.add_argument("--keep-serving", action="store_true", help="leave the local predictor running")
    run.add_argument("--summary-json", type=Path, help="also write the summary as JSON")
    run.add_argument("--verbose", action="store_true", help="also print KFP's executor input/output dumps")
    return parser


def pipeline_arguments(args: argparse.Namespace, state: Path) -> dict[str, Any]:
    """The pipeline's parameters from the command line, checked before any task starts."""
    arguments = {name: getattr(args, name) for _, name, _, _ in FLAGS}
    TrainConfig.from_pipeline(**{name: arguments[name] for name in PIPELINE_PARAMETERS})  # names a bad value
    check_max_auc_loss(args.max_auc_loss)
    if not 0 < args.test_fraction < 1:
        raise ConfigError(f"--test-fraction must be in (0, 1), got {args.test_fraction}")
    if args.n_bootstrap < 0:
        raise ConfigError(f"--bootstrap must be >= 0, got {args.n_bootstrap}")
    if args.generator_workers < 0:
        raise ConfigError(f"--workers must be >= 0 (0: all cores), got {args.generator_workers}")
    dataset = args.dataset_uri
    if dataset and not dataset.startswith("s3://") and not Path(dataset).is_file():
        raise ConfigError(f"--dataset {dataset}: no such file")
    if dataset and not dataset.startswith("s3://"):
        dataset = str(Path(dataset).resolve())  # tasks run with another working directory in a cluster
    # A key known before the run starts, so that an interrupted run can be resumed with --run-key.
    run_key = args.run_key or f"local-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    http_port, grpc_port = args.http_port, args.grpc_port
    if args.deploy_target == "local":
        http_port, grpc_port = http_port or free_port(), grpc_port or free_port()
    return arguments | {
        "dataset_uri": dataset,
        "checkpoint_root": str(state / "checkpoints"),
        "run_key": run_key,
        "http_port": http_port or HTTP_PORT,
        "grpc_port": grpc_port or GRPC_PORT,
    }


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

    from components.step import CODE_VERSION_ENV, EVENTS_ENV, code_version
    from pipelines.top_tagging import build_pipeline
    from toptagger import registry

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
    log.info(
        "run key %s: after an interruption, run again with --run-key %s to resume its training",
        arguments["run_key"],
        arguments["run_key"],
    )
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
        "data": {
            "n_jets": int(fit["n_jets"] + test["n_jets"]),
            "n_fit": int(fit["n_jets"]),
            "n_test": int(test["n_jets"]),
            "source": fit.get("source", ""),
            "dataset_sha256": fit.get("dataset_sha256", ""),
        },
        "training": dict(outputs["training"].metadata),
        "evaluation": dict(outputs["evaluation"].metadata),
        "model_name": arguments["model_name"],
        "experiment": arguments["mlflow_experiment"],
        "tracking_uri": tracking,
        **{key: outputs[key] for key in ("run_id", "version", "aliases", "decision", "reason", "model_uri", "url")},
        "deployment": json.loads(outputs["deployment"]),
        # The train task is never cached, so its output lives in this run's own folder.
        "pipeline_root": str(Path(outputs["training"].uri).parents[1]),
        "seconds": seconds,
        "steps": steps,
        "steps_seconds": steps_seconds,
        "cached": [s for s in ("data", "preprocess") if s not in steps],
        "overhead_seconds": seconds - steps_seconds,
        "overhead_fraction": (seconds - steps_seconds) / seconds,
    }
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
