"""Where training runs on a cluster: the accelerator resource and the GPU node pool.

The defaults are NVIDIA's: the ``nvidia.com/gpu`` extended resource, the
``nvidia.com/gpu.present=true`` label of GPU feature discovery and the ``nvidia.com/gpu`` taint the
GPU operator's docs use. Other clusters give their own at compile time:

    python -m pipelines.compile --gpu-resource amd.com/gpu --gpu-count 2 \\
        --gpu-node-selector cloud.google.com/gke-accelerator=nvidia-l4 \\
        --gpu-toleration dedicated=gpu:NoSchedule

``none`` drops the node selector or the toleration (GPU nodes without a label or taint of their own).
The same ``--gpu-*`` options (:func:`add_gpu_pool_arguments`, read back by :func:`gpu_pool_from`)
place the TrainJob's nodes (``python -m toptagger.deploy.trainjob render``).
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass

from toptagger.errors import ConfigError

EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")
# Kubernetes label keys: an optional DNS-subdomain prefix and "/", then a name of at most 63
# characters; values: at most 63 characters, the same alphabet, or empty.
_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_KEY = re.compile(rf"^([a-z0-9]([-a-z0-9.]{{0,251}}[a-z0-9])?/)?{_NAME}$")
_VALUE = re.compile(rf"^({_NAME})?$")
_RESOURCE = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")


@dataclass(frozen=True)
class Toleration:
    key: str
    effect: str
    value: str | None = None  # None: operator Exists (any value of the taint)

    def as_kfp(self) -> dict[str, str]:
        """Keyword arguments of ``kfp.kubernetes.add_toleration``."""
        if self.value is None:
            return {"key": self.key, "operator": "Exists", "effect": self.effect}
        return {"key": self.key, "operator": "Equal", "value": self.value, "effect": self.effect}


@dataclass(frozen=True)
class GpuPool:
    resource: str = "nvidia.com/gpu"
    count: int = 1
    node_selector: tuple[str, str] | None = ("nvidia.com/gpu.present", "true")
    toleration: Toleration | None = Toleration("nvidia.com/gpu", "NoSchedule")

    @classmethod
    def parse(
        cls,
        resource: str | None = None,
        count: int | None = None,
        node_selector: str | None = None,
        toleration: str | None = None,
    ) -> GpuPool:
        """The pool from command-line text; anything not given keeps its default. Names what is wrong."""
        default = cls()
        return cls(
            resource=_resource(resource) if resource is not None else default.resource,
            count=_count(count) if count is not None else default.count,
            node_selector=_node_selector(node_selector) if node_selector is not None else default.node_selector,
            toleration=_toleration(toleration) if toleration is not None else default.toleration,
        )


def _resource(text: str) -> str:
    if not _RESOURCE.match(text):
        raise ConfigError(f"--gpu-resource {text!r} is not an extended resource name like nvidia.com/gpu")
    return text


def _count(count: int) -> int:
    if count < 1:
        raise ConfigError(f"--gpu-count must be at least 1, got {count}")
    return count


def _node_selector(text: str) -> tuple[str, str] | None:
    if text.strip().lower() == "none":
        return None
    key, sep, value = text.partition("=")
    if not sep or not _KEY.match(key) or not _VALUE.match(value):
        raise ConfigError(f"--gpu-node-selector {text!r} is not KEY=VALUE with a Kubernetes label key and value")
    return key, value


def _toleration(text: str) -> Toleration | None:
    if text.strip().lower() == "none":
        return None
    taint, _, effect = text.partition(":")
    key, sep, value = taint.partition("=")
    effect = effect or "NoSchedule"
    if not _KEY.match(key) or (sep and not _VALUE.match(value)) or effect not in EFFECTS:
        raise ConfigError(
            f"--gpu-toleration {text!r} is not KEY[=VALUE][:EFFECT] with a Kubernetes taint key, "
            f"and EFFECT one of {', '.join(EFFECTS)}"
        )
    return Toleration(key, effect, value if sep else None)


def add_gpu_pool_arguments(parser: argparse.ArgumentParser, count: bool = True) -> None:
    """The ``--gpu-*`` options (read back by :func:`gpu_pool_from`); ``count=False`` leaves out ``--gpu-count``."""
    pool = parser.add_argument_group("GPU pool of the training pods (defaults: NVIDIA's)")
    pool.add_argument("--gpu-resource", help="extended resource to request (default nvidia.com/gpu)")
    if count:
        pool.add_argument("--gpu-count", type=int, help="how many for the single train pod (default 1)")
    pool.add_argument(
        "--gpu-node-selector", help="KEY=VALUE node label of the pool, or none (default nvidia.com/gpu.present=true)"
    )
    pool.add_argument(
        "--gpu-toleration",
        help="KEY[=VALUE][:EFFECT] taint of the pool to tolerate, or none (default nvidia.com/gpu:NoSchedule)",
    )


def gpu_pool_from(args: argparse.Namespace) -> GpuPool:
    """The pool of parsed :func:`add_gpu_pool_arguments` options (names a bad one)."""
    count = getattr(args, "gpu_count", None)
    return GpuPool.parse(args.gpu_resource, count, args.gpu_node_selector, args.gpu_toleration)
