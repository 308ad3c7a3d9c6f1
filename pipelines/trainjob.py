"""The train step as a Kubeflow Trainer v2.3.0 ``TrainJob``: what it is, rendered once for all callers.

    python -m pipelines.trainjob render --nodes 2 --gpus-per-node 4 --image REGISTRY/components:TAG \\
        [--namespace NS] [--checkpoint-root s3://bucket/checkpoints] [--run-key KEY] [training flags]

prints the TrainJob (``trainer.kubeflow.org/v1alpha1``) that the pipeline's TrainJob launcher
(:mod:`components.train_job`, chosen with ``python -m pipelines.compile --trainjob``) creates,
as YAML for an operator to read or ``kubectl apply -f -``. Both call :func:`render`.

The job runs on the ``torch-distributed`` ClusterTrainingRuntime: ``numNodes`` nodes of
``numProcPerNode`` processes (one per GPU). Its trainer runs
``torchrun -m components.train --data ... --checkpoint-root ... --run-key ... --export-to ... <flags>``
on the components image; torchrun reads nodes, processes, rank and master from the ``PET_*``
variables that the Trainer's torch plugin injects (they are never set here: its webhook rejects
user-set ones). The GPU pool's node selector and toleration go in as a runtime patch of the
runtime's ``node`` job, the S3 and MLflow credentials as env from the same Secrets as the other
steps (``secretKeyRef``, never a value). The jets, the checkpoints and the export live under the
``s3://`` checkpoint root, where every node can read them (:func:`staging`).
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pipelines import cluster
from pipelines.gpu_pool import GpuPool
from toptagger.cli import positive_int, run_cli
from toptagger.errors import ConfigError

GROUP, VERSION, PLURAL, KIND = "trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob"
RUNTIME = "torch-distributed"
NODE = "node"  # the runtime's replicated job, and its container (trainer-v2.3.0-runtime-torch-distributed.yaml)
PATCH_MANAGER = "top-tagger.pipelines/train-job"  # owns our runtime patch (patches are keyed by manager)
KEEP = ("never", "on-failure", "always")
RUN_KEY_ANNOTATION = "top-tagger/run-key"
_NOT_DNS = re.compile(r"[^a-z0-9-]+")


@dataclass(frozen=True)
class TrainJobShape:
    """What ``python -m pipelines.compile --trainjob`` fixes: the job's size, where it runs, whether it stays."""

    nodes: int = 1
    gpus_per_node: int = 1
    pool: GpuPool = field(default_factory=GpuPool)
    namespace: str = ""  # empty: the launcher's own namespace
    keep: str = "on-failure"  # delete the finished TrainJob: never, on failure, always

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise ConfigError(f"--nodes must be at least 1, got {self.nodes}")
        if self.gpus_per_node < 1:
            raise ConfigError(f"--gpus-per-node must be at least 1, got {self.gpus_per_node}")
        if self.keep not in KEEP:
            raise ConfigError(f"keep the TrainJob: one of {', '.join(KEEP)}, got {self.keep!r}")


@dataclass(frozen=True)
class Staging:
    """Where a run's TrainJob reads its jets and writes its export (beside, not in, the checkpoint folder)."""

    data: str
    export: str


def staging(checkpoint_root: str, run_key: str) -> Staging:
    """``<root>/<run key>.trainjob/{fit_jets.npz,export}``: the checkpoint folder ``<root>/<run key>/``
    is deleted once the export is written, so the export must not live inside it."""
    if not checkpoint_root.startswith("s3://"):
        raise ConfigError(
            f"checkpoint_root {checkpoint_root!r}: a TrainJob needs an s3:// prefix that all its nodes can reach"
        )
    if not run_key:
        raise ConfigError("a TrainJob needs a run key (the pipeline run's id by default)")
    prefix = f"{checkpoint_root.rstrip('/')}/{run_key}.trainjob"
    return Staging(data=f"{prefix}/fit_jets.npz", export=f"{prefix}/export")


def trainjob_name(run_key: str) -> str:
    """A DNS-1035 name that depends on the run key only, so that a retried launcher finds its job again.

    Short (at most 40 characters): JobSet builds pod and host names from it.
    """
    readable = _NOT_DNS.sub("-", run_key.lower()).strip("-")[:20].strip("-")
    digest = hashlib.sha256(run_key.encode()).hexdigest()[:8]
    return f"top-tagger-{readable}-{digest}" if readable else f"top-tagger-{digest}"


def _secret_env(secret: str, keys: dict[str, str], optional: bool) -> list[dict[str, Any]]:
    ref = {"name": secret, **({"optional": True} if optional else {})}
    return [{"name": env, "valueFrom": {"secretKeyRef": {**ref, "key": key}}} for key, env in keys.items()]


def trainer_env() -> list[dict[str, Any]]:
    """The trainer's environment: the S3 and MLflow Secrets' keys (as the other steps get them), unbuffered logs."""
    return [
        *_secret_env(cluster.S3_SECRET, cluster.S3_KEYS, optional=False),
        *_secret_env(cluster.S3_SECRET, cluster.S3_OPTIONAL_KEYS, optional=True),
        *_secret_env(cluster.MLFLOW_SECRET, cluster.MLFLOW_KEYS, optional=False),  # as the train task has them
        *_secret_env(cluster.MLFLOW_SECRET, cluster.MLFLOW_OPTIONAL_KEYS, optional=True),
        {"name": "PYTHONUNBUFFERED", "value": "1"},  # log lines reach the launcher as they are printed
    ]


def _runtime_patches(pool: GpuPool) -> list[dict[str, Any]]:
    pod: dict[str, Any] = {}
    if pool.node_selector:
        pod["nodeSelector"] = dict([pool.node_selector])
    if pool.toleration:
        pod["tolerations"] = [pool.toleration.as_kfp()]  # the Kubernetes Toleration fields
    if not pod:
        return []
    node_job = {"name": NODE, "template": {"spec": {"template": {"spec": pod}}}}
    return [{"manager": PATCH_MANAGER, "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [node_job]}}}}]


def render(
    shape: TrainJobShape,
    image: str,
    *,
    run_key: str,
    checkpoint_root: str,
    config_args: Sequence[str],
    data_uri: str | None = None,
    namespace: str | None = None,
) -> dict[str, Any]:
    """The TrainJob that trains ``run_key`` on ``shape``: a plain manifest (dict), ready to create.

    ``config_args`` are the trainer's TrainConfig flags (``toptagger.training.config.to_arguments``);
    ``data_uri`` defaults to the staged copy of the jets (:func:`staging`); ``namespace``
    overrides the shape's (empty in both: the manifest names none).
    """
    if not image.strip():
        raise ConfigError("the TrainJob needs the components image (--image)")
    where = staging(checkpoint_root, run_key)
    data_uri = data_uri or where.data
    if not data_uri.startswith("s3://"):
        raise ConfigError(f"the TrainJob's jets must be on s3://, got {data_uri!r}")
    args = ["--data", data_uri, "--checkpoint-root", checkpoint_root, "--run-key", run_key]
    args += ["--export-to", where.export, "--no-progress", *config_args]
    metadata: dict[str, Any] = {"name": trainjob_name(run_key)}
    if namespace or shape.namespace:
        metadata["namespace"] = namespace or shape.namespace
    metadata["labels"] = {"app.kubernetes.io/name": "top-tagger", "app.kubernetes.io/component": "train"}
    metadata["annotations"] = {RUN_KEY_ANNOTATION: run_key}
    spec: dict[str, Any] = {
        "runtimeRef": {"name": RUNTIME, "apiGroup": GROUP, "kind": "ClusterTrainingRuntime"},
        "trainer": {
            "image": image,
            "command": ["torchrun", "-m", "components.train"],
            "args": args,
            "env": trainer_env(),
            "numNodes": shape.nodes,
            "numProcPerNode": shape.gpus_per_node,
            "resourcesPerNode": {
                "requests": {"cpu": cluster.TRAIN_CPU, "memory": cluster.TRAIN_MEMORY},
                "limits": {shape.pool.resource: str(shape.gpus_per_node)},
            },
        },
    }
    patches = _runtime_patches(shape.pool)
    if patches:
        spec["runtimePatches"] = patches
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "metadata": metadata, "spec": spec}


def pool_flags(pool: GpuPool) -> dict[str, str]:
    """The pool as the text ``GpuPool.parse`` reads back (how the compiled pipeline hands it to the launcher)."""
    toleration = "none"
    if pool.toleration:
        value = f"={pool.toleration.value}" if pool.toleration.value is not None else ""
        toleration = f"{pool.toleration.key}{value}:{pool.toleration.effect}"
    selector = "=".join(pool.node_selector) if pool.node_selector else "none"
    return {"gpu_resource": pool.resource, "gpu_node_selector": selector, "gpu_toleration": toleration}


# --------------------------------------------------------------------------------------------
# python -m pipelines.trainjob


def build_parser() -> argparse.ArgumentParser:
    from pipelines.compile import add_gpu_pool_arguments
    from toptagger.training import config

    parser = argparse.ArgumentParser(prog="python -m pipelines.trainjob", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    render_parser = sub.add_parser(
        "render",
        help="print the TrainJob as YAML (kubectl apply -f - creates it)",
        description="Print the TrainJob that the pipeline's launcher creates, as YAML.",
    )
    job = render_parser.add_argument_group("the job")
    job.add_argument("--nodes", type=positive_int, required=True, help="nodes (numNodes)")
    job.add_argument("--gpus-per-node", type=positive_int, required=True, help="GPUs and processes per node")
    job.add_argument("--image", required=True, help="the components image (REGISTRY/components:TAG)")
    job.add_argument("--namespace", help="namespace of the TrainJob (default: none in the manifest)")
    job.add_argument(
        "--checkpoint-root",
        default="s3://top-tagger/checkpoints",
        help="s3:// prefix of checkpoints, staged jets and export (default s3://top-tagger/checkpoints)",
    )
    job.add_argument("--run-key", default="manual", help="names the checkpoint and the job (default manual)")
    job.add_argument("--data", help="the preprocess step's fit jets on s3:// (default: <root>/<run key>.trainjob/)")
    add_gpu_pool_arguments(render_parser, count=False)
    config.add_arguments(render_parser.add_argument_group("training settings (python -m components.train's)"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    import yaml

    from pipelines.compile import gpu_pool_from
    from toptagger.training.config import from_arguments, to_arguments

    args = build_parser().parse_args(argv)
    shape = TrainJobShape(args.nodes, args.gpus_per_node, gpu_pool_from(args))
    manifest = render(
        shape,
        args.image,
        run_key=args.run_key,
        checkpoint_root=args.checkpoint_root,
        config_args=to_arguments(from_arguments(args)),
        data_uri=args.data,
        namespace=args.namespace,
    )
    sys.stdout.write(yaml.safe_dump(manifest, sort_keys=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
