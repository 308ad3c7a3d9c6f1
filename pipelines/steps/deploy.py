"""The deploy step: serve the registry's champion (``models:/<name>@champion``).

- ``none``: nothing (tests, or when serving is someone else's job);
- ``local``: the predictor as a local process (``components.deploy.start_local``); it outlives
  the task, and ``python -m pipelines.run`` stops it at the end unless ``--keep-serving``;
- ``cluster``: create or patch the InferenceService of a kustomize overlay and wait for Ready.
"""

from __future__ import annotations

from typing import Any

from components import registry
from components.errors import ConfigError
from pipelines.steps.common import log

TARGETS = ("none", "local", "cluster")


def run(
    target: str, model_name: str, overlay: str, namespace: str, http_port: int, grpc_port: int, version: str
) -> dict[str, Any]:
    if target not in TARGETS:
        raise ConfigError(f"deploy_target must be one of {', '.join(TARGETS)}, got {target!r}")
    if target == "none":
        log.info("deploy_target=none: not serving %s version %s", model_name, version)
        return {"target": target, "url": "", "model_uri": ""}
    from components.deploy import CLUSTER_SCHEMES, deploy_to_cluster, kserve_client, render, resolve_model_uri

    registry.check_tracking()
    model_uri = resolve_model_uri(f"models:/{model_name}@{registry.CHAMPION}")
    if target == "local":
        from components.deploy import start_local

        predictor = start_local(model_uri, http_port=http_port, grpc_port=grpc_port)
        log.info("serving %s@%s at %s (pid %d)", model_name, registry.CHAMPION, predictor.url, predictor.process.pid)
        return {
            "target": target,
            "url": predictor.url,
            "grpc": predictor.grpc_target,
            "pid": predictor.process.pid,
            "log": str(predictor.log_path),
            "model_uri": model_uri,
        }
    if not model_uri.startswith(CLUSTER_SCHEMES):
        raise ConfigError(
            f"{model_uri}: the champion's files are not where a cluster can read them; "
            "use an MLflow server with S3 artifacts (MLFLOW_TRACKING_URI + MLFLOW_S3_ENDPOINT_URL)"
        )
    isvc = render(model_uri, overlay, namespace=namespace or None)
    deployed = deploy_to_cluster(isvc, kserve_client())
    url = deployed.url or deployed.address or ""
    log.info("InferenceService %s/%s serves %s at %s", deployed.namespace, deployed.name, model_uri, url)
    return {"target": target, "url": url, "model_uri": model_uri, "generation": deployed.generation}
