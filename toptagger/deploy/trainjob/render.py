"""The train step as a Kubeflow Trainer v2.3.0 ``TrainJob``: what it is, rendered once for all callers.

:func:`render` gives the TrainJob (``trainer.kubeflow.org/v1alpha1``) that the pipeline's TrainJob
launcher (:mod:`components.trainjob`, compiled with ``python -m pipelines.compile --trainjob``)
creates, and that ``python -m toptagger.deploy.trainjob render`` prints for an operator to read
or ``kubectl apply -f -``.

The job runs on the ``torch-distributed`` ClusterTrainingRuntime: ``numNodes`` nodes of
``numProcPerNode`` processes (one per GPU). Its trainer runs
``torchrun -m toptagger.training --data ... --checkpoint-root ... --run-key ... --export-to ... <flags>``
on the components image; torchrun reads nodes, processes, rank and master from the ``PET_*``
variables that the Trainer's torch plugin injects (they are never set here: its webhook rejects
user-set ones). The GPU pool's node selector and toleration go in as a runtime patch of the
runtime's ``node`` job, the S3 and MLflow credentials as env from the same Secrets as the other
steps (``secretKeyRef``, never a value; :mod:`toptagger.deploy.cluster`). The jets, the
checkpoints and the export live under the ``s3://`` checkpoint root, where every node can read
them (:func:`staging`).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from toptagger.deploy import cluster
from toptagger.deploy.gpu_pool import GpuPool
from toptagger.errors import ConfigError

GROUP, VERSION, PLURAL, KIND = "trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob"
RUNTIME = "torch-distributed"
NODE = "node"  # the runtime's replicated job, and its container (trainer-v2.3.0-runtime-torch-distributed.yaml)
PATCH_MANAGER = "top-tagger/trainjob-launcher"  # owns our runtime patch (patches are keyed by manager)
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
            "command": ["torchrun", "-m", "toptagger.training"],
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
