"""Deploy a model as a KServe InferenceService: render the overlay, create or patch it, wait for Ready.

The kustomize overlays under ``manifests/`` are the one description of the service. ``render``
builds an overlay with ``kubectl kustomize``, turns the InferenceService into the kserve SDK's
``V1beta1InferenceService`` and sets the model's storage URI on it (``STORAGE_URI`` of
``kserve-container``, which KServe's storage initializer downloads to ``/mnt/models``). So the
pipeline deploys exactly what ``kubectl apply -k manifests/overlays/<overlay>`` would, with the
champion's URI. The command line is ``python -m components.deploy`` (the pipeline's deploy step).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from kserve import V1beta1InferenceService, constants

from toptagger.constants import OVERLAYS
from toptagger.deploy.k8s_models import from_dict, to_dict
from toptagger.errors import ConfigError, TaggerError

REPO = Path(__file__).resolve().parents[2]
# The image of the pipeline components carries the manifests at the same place (components/Dockerfile).
MANIFESTS_DIR = Path(os.environ.get("TOPTAGGER_MANIFESTS", REPO / "manifests"))
CONTAINER = "kserve-container"
STORAGE_ENV = "STORAGE_URI"
# Schemes that KServe's storage initializer downloads; a cluster cannot read this machine's disk.
CLUSTER_SCHEMES = ("s3://", "gs://", "https://", "http://", "pvc://", "hdfs://", "webhdfs://", "hf://", "oci://")


class DeployError(TaggerError, RuntimeError):
    """The cluster refused the InferenceService, or it did not become ready in time."""


@dataclass(frozen=True)
class ClusterDeployment:
    """Where a ready InferenceService answers."""

    name: str
    namespace: str
    url: str | None  # external URL (status.url), e.g. through the ingress or gateway
    address: str | None  # in-cluster address (status.address.url)
    generation: int


# --------------------------------------------------------------------------------------------
# Rendering


def kubectl() -> str:
    """The kubectl binary: ``$KUBECTL`` or the first one on PATH."""
    found = os.environ.get("KUBECTL") or shutil.which("kubectl")
    if not found:
        raise ConfigError("kubectl is not on PATH (set KUBECTL=/path/to/kubectl); it builds the kustomize overlays")
    return found


def kustomize(directory: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """``kubectl kustomize DIRECTORY``, as a list of manifests."""
    path = Path(directory)
    if not (path / "kustomization.yaml").is_file():
        raise ConfigError(f"{path}: not a kustomize directory (no kustomization.yaml)")
    result = subprocess.run([kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise ConfigError(f"kubectl kustomize {path} failed: {result.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def _overlay_dir(overlay: str, manifests_dir: Path) -> Path:
    if overlay not in OVERLAYS:
        raise ConfigError(f"unknown overlay {overlay!r}; choose one of {', '.join(OVERLAYS)}")
    return manifests_dir / "overlays" / overlay


def render(
    storage_uri: str,
    overlay: str = "cpu",
    *,
    namespace: str | None = None,
    manifests_dir: str | os.PathLike[str] = MANIFESTS_DIR,
) -> V1beta1InferenceService:
    """The overlay's InferenceService, with ``storage_uri`` as the model to serve."""
    if not storage_uri:
        raise ConfigError("a storage URI is needed (e.g. s3://bucket/path/to/model)")
    docs = kustomize(_overlay_dir(overlay, Path(manifests_dir)))
    found = [doc for doc in docs if doc.get("kind") == constants.KSERVE_KIND_INFERENCESERVICE]
    if len(found) != 1:
        raise ConfigError(f"overlay {overlay!r} holds {len(found)} InferenceServices; expected exactly one")
    isvc = from_dict(found[0], "V1beta1InferenceService", "InferenceService")
    containers = [c for c in isvc.spec.predictor.containers or [] if c.name == CONTAINER]
    if not containers:
        raise ConfigError(f"overlay {overlay!r}: the predictor has no container named {CONTAINER}")
    env = [e for e in containers[0].env or [] if e.name == STORAGE_ENV]
    if len(env) != 1:
        raise ConfigError(f"overlay {overlay!r}: {CONTAINER} must set {STORAGE_ENV} exactly once")
    env[0].value = storage_uri
    if namespace:
        isvc.metadata.namespace = namespace
    return isvc


# --------------------------------------------------------------------------------------------
# Cluster


def kserve_client(kubeconfig: str | None = None, context: str | None = None) -> Any:
    """A ``KServeClient``: in-cluster credentials in a pod, else the kubeconfig."""
    from kserve import KServeClient
    from kubernetes.config import ConfigException

    try:
        return KServeClient(config_file=kubeconfig, context=context)
    except (ConfigException, OSError) as exc:
        raise ConfigError(f"no usable Kubernetes configuration ({exc}); set KUBECONFIG or pass --kubeconfig") from None


def merge_patch(current: Any, desired: Any) -> Any:
    """An RFC 7386 merge patch that turns ``current`` into ``desired``.

    A merge patch keeps map keys it does not mention, so every key that ``current`` has and
    ``desired`` lacks is sent as null: switching overlays then removes e.g. the FPGA nodeSelector
    instead of leaving it behind. Lists are replaced whole, as merge patches do anyway.
    """
    if not (isinstance(current, dict) and isinstance(desired, dict)):
        return desired
    patch: dict[str, Any] = {key: None for key in current if key not in desired}
    for key, value in desired.items():
        patch[key] = merge_patch(current[key], value) if key in current else value
    return patch


def _api_error(action: str, exc: Exception) -> DeployError:
    status = getattr(exc, "status", None)
    reason = getattr(exc, "body", None) or exc
    if status in (401, 403):
        return DeployError(
            f"{action}: not allowed ({status}); bind the top-tagger-deployer Role (manifests/base/deployer-rbac.yaml) "
            f"to this ServiceAccount: {reason}"
        )
    return DeployError(f"{action}: {reason}")


def apply(isvc: V1beta1InferenceService, client: Any) -> dict[str, Any]:
    """Create the InferenceService, or patch the existing one to match; returns the server's object."""
    from kubernetes.client.rest import ApiException

    name, namespace = isvc.metadata.name, isvc.metadata.namespace or "default"
    version = isvc.api_version.split("/")[1]
    where = f"InferenceService {namespace}/{name}"
    api = client.api_instance  # the KServeClient's CustomObjectsApi
    args = (constants.KSERVE_GROUP, version, namespace, constants.KSERVE_PLURAL_INFERENCESERVICE)
    try:
        current = api.get_namespaced_custom_object(*args, name)
    except ApiException as exc:
        if exc.status != 404:
            raise _api_error(f"reading {where}", exc) from None
        current = None
    desired = to_dict(isvc)
    if current is None:
        try:
            return client.create(isvc, namespace=namespace)
        except RuntimeError as exc:  # KServeClient wraps every ApiException in a RuntimeError
            raise DeployError(f"creating {where}: {exc}") from None
    body = {
        # Optimistic concurrency: the server answers 409 if someone changed the object meanwhile.
        "metadata": {
            "resourceVersion": current["metadata"]["resourceVersion"],
            "labels": desired["metadata"].get("labels") or {},
            "annotations": desired["metadata"].get("annotations") or {},
        },
        "spec": merge_patch(current.get("spec", {}), desired["spec"]),
    }
    try:
        # KServeClient.patch() takes an SDK object, whose serialization drops the nulls a merge
        # patch needs to remove keys; so the patch goes through its CustomObjectsApi directly.
        return api.patch_namespaced_custom_object(*args, name, body)
    except ApiException as exc:
        raise _api_error(f"patching {where}", exc) from None


def _unready_reasons(status: dict[str, Any]) -> str:
    reasons = [
        f"{c.get('type')}={c.get('status')} ({c.get('reason', '')}: {c.get('message', '')})"
        for c in status.get("conditions", [])
        if str(c.get("status")).lower() != "true"
    ]
    return "; ".join(reasons) or "no conditions reported yet"


def wait_ready(
    client: Any, name: str, namespace: str, generation: int, timeout_s: float = 600, poll_s: float = 5
) -> ClusterDeployment:
    """Poll until the InferenceService's Ready condition is True for ``generation`` (or later)."""
    deadline = time.monotonic() + timeout_s
    status: dict[str, Any] = {}
    while True:
        try:
            obj = client.get(name, namespace=namespace)
        except RuntimeError as exc:
            raise DeployError(f"reading InferenceService {namespace}/{name}: {exc}") from None
        status = obj.get("status") or {}
        ready = any(
            c.get("type") == "Ready" and str(c.get("status")).lower() == "true" for c in status.get("conditions", [])
        )
        # Ready from the previous generation says nothing about the model just deployed.
        if ready and int(status.get("observedGeneration", 0)) >= generation:
            return ClusterDeployment(
                name, namespace, status.get("url"), (status.get("address") or {}).get("url"), generation
            )
        if time.monotonic() + poll_s > deadline:
            raise DeployError(
                f"InferenceService {namespace}/{name} (generation {generation}) not ready after {timeout_s:.0f} s: "
                f"{_unready_reasons(status)}. Look at: kubectl -n {namespace} describe isvc {name}"
            )
        time.sleep(poll_s)


def deploy_to_cluster(
    isvc: V1beta1InferenceService, client: Any, *, timeout_s: float = 600, poll_s: float = 5
) -> ClusterDeployment:
    """Create or patch ``isvc`` and wait until it serves."""
    result = apply(isvc, client)
    meta = result["metadata"]
    return wait_ready(client, meta["name"], meta["namespace"], int(meta.get("generation", 1)), timeout_s, poll_s)
