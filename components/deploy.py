"""The deploy step: serve the registry's champion (``models:/<name>@champion``).

``deploy`` is the Kubeflow component; :func:`deploy_step` the plain function it runs; and
``python -m components.deploy`` deploys any model URI by hand (``main``):

- ``none``: nothing (tests, or when serving is someone else's job);
- ``local``: the predictor as a local process (:mod:`serving.process`); it outlives the task,
  and ``python -m pipelines.run`` stops it at the end unless ``--keep-serving``;
- ``cluster``: create or patch the InferenceService of a kustomize overlay and wait for Ready
  (:mod:`toptagger.deploy.kserve`).

    python -m components.deploy render  --model-uri s3://mlflow/1/models/m-abc/artifacts --overlay fpga
    python -m components.deploy cluster --model-uri models:/top-tagger@champion --overlay fpga
    python -m components.deploy local   --model-uri ./champion --http-port 8080 --grpc-port 8081

A local predictor serves what the cpu overlay serves (``--backend auto --precision auto``, torch as
the fallback) where the version carries ``model.onnx``, torch fp32 otherwise, saying which and why
(:mod:`toptagger.deploy.local`); ``--backend``/``--precision`` or ``BACKEND``/``PRECISION`` override it.
"""

# No `from __future__ import annotations`: KFP reads the component's annotations as objects.
import argparse
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from toptagger.constants import GRPC_PORT, HTTP_PORT

TARGETS = ("none", "local", "cluster")


def deploy(
    target: str, model_name: str, overlay: str, namespace: str, http_port: int, grpc_port: int, version: str
) -> NamedTuple("Deployment", [("url", str), ("details", str)]):
    """Serve the champion: none, a local predictor process, or the InferenceService of an overlay."""
    import json

    from components.step import step

    with step("deploy"):
        from components.deploy import deploy_step

        d = deploy_step(target, model_name, overlay, namespace, http_port, grpc_port, version)
    return (d["url"], json.dumps(d))


def deploy_step(
    target: str, model_name: str, overlay: str, namespace: str, http_port: int, grpc_port: int, version: str
) -> dict[str, Any]:
    """Serve ``model_name``'s champion (``version`` is what the register step made, for the log)."""
    from components.step import log
    from toptagger import registry
    from toptagger.constants import CHAMPION
    from toptagger.errors import ConfigError

    if target not in TARGETS:
        raise ConfigError(f"deploy_target must be one of {', '.join(TARGETS)}, got {target!r}")
    if target == "none":
        log.info("deploy_target=none: not serving %s version %s", model_name, version)
        return {"target": target, "url": "", "model_uri": ""}
    from toptagger.deploy.kserve import CLUSTER_SCHEMES, deploy_to_cluster, kserve_client, render
    from toptagger.model_uri import resolve

    registry.check_tracking()
    model_uri = resolve(f"models:/{model_name}@{CHAMPION}")
    if target == "local":
        from serving.process import start_local
        from toptagger.deploy.local import local_serving
        from toptagger.model_uri import fetch_model_dir

        # What the cpu overlay serves where the version carries the graphs (BACKEND/PRECISION override it).
        serving = local_serving(fetch_model_dir(model_uri))
        log.info("serving with %s: %s", " ".join(serving.args()), serving.reason)
        predictor = start_local(model_uri, http_port=http_port, grpc_port=grpc_port, extra_args=serving.args())
        log.info("serving %s@%s at %s (pid %d)", model_name, CHAMPION, predictor.url, predictor.process.pid)
        return {
            "target": target,
            "url": predictor.url,
            "grpc": predictor.grpc_target,
            "pid": predictor.process.pid,
            "log": str(predictor.log_path),
            "model_uri": model_uri,
            "serving": " ".join(serving.args()),
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


# --------------------------------------------------------------------------------------------
# python -m components.deploy


def build_parser() -> argparse.ArgumentParser:
    from serving.backends import BACKENDS, PRECISIONS
    from toptagger.cli import positive_int
    from toptagger.deploy.kserve import MANIFESTS_DIR, OVERLAYS

    parser = argparse.ArgumentParser(
        prog="python -m components.deploy", description="Deploy a model: InferenceService, or a local predictor."
    )
    sub = parser.add_subparsers(dest="mode", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--model-uri", required=True, help="s3://... artifact URI, or models:/NAME/VERSION | models:/NAME@ALIAS"
    )
    kube = argparse.ArgumentParser(add_help=False)
    kube.add_argument("--overlay", choices=OVERLAYS, default="cpu", help="manifests/overlays/<overlay> (default cpu)")
    kube.add_argument("--namespace", help="deploy here instead of the overlay's namespace")
    kube.add_argument("--manifests", type=Path, default=MANIFESTS_DIR, help=f"kustomize tree (default {MANIFESTS_DIR})")

    sub.add_parser("render", parents=[common, kube], help="print the InferenceService as YAML")
    cluster = sub.add_parser("cluster", parents=[common, kube], help="create or patch it, wait for Ready")
    cluster.add_argument("--timeout", type=positive_int, default=600, help="seconds to wait for Ready (default 600)")
    cluster.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster, else $KUBECONFIG/~/.kube/config)")
    cluster.add_argument("--context", help="kubeconfig context")
    cluster.add_argument("--url-file", type=Path, help="also write the service URL to this file (pipeline output)")

    local = sub.add_parser("local", parents=[common], help="run the predictor here until interrupted")
    local.add_argument("--http-port", type=positive_int, default=HTTP_PORT)
    local.add_argument("--grpc-port", type=positive_int, default=GRPC_PORT)
    local.add_argument(
        "--backend",
        choices=list(BACKENDS),
        help="default: BACKEND, else the cpu overlay's (auto where the version has model.onnx, else torch)",
    )
    local.add_argument(
        "--precision",
        choices=list(PRECISIONS),
        help="default: PRECISION, else auto (the fastest admitted) for the graph backends",
    )
    local.add_argument("--timeout", type=positive_int, default=300, help="seconds to wait for ready (default 300)")
    return parser


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _serve_until_interrupted(predictor: Any) -> int:
    # SIGTERM (e.g. from a pipeline runner) stops the predictor as Ctrl-C does.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        while predictor.process.poll() is None:
            time.sleep(0.5)
        print(f"predictor exited with status {predictor.process.returncode} (log {predictor.log_path})")
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        predictor.stop()


def main(argv: Sequence[str] | None = None) -> int:
    import yaml

    from serving.process import start_local
    from toptagger.deploy.k8s_models import to_dict
    from toptagger.deploy.kserve import CLUSTER_SCHEMES, deploy_to_cluster, kserve_client, render
    from toptagger.deploy.local import local_serving
    from toptagger.errors import ConfigError
    from toptagger.model_uri import fetch_model_dir, resolve

    args = build_parser().parse_args(argv)
    model_uri = resolve(args.model_uri)
    if args.mode == "local":
        serving = local_serving(fetch_model_dir(model_uri), args.backend, args.precision)
        print(f"serving with {' '.join(serving.args())}: {serving.reason}", flush=True)
        predictor = start_local(
            model_uri,
            http_port=args.http_port,
            grpc_port=args.grpc_port,
            extra_args=serving.args(),
            timeout_s=args.timeout,
        )
        print(f"ready: {predictor.url} (v2 REST)  {predictor.grpc_target} (gRPC)  log {predictor.log_path}")
        print("stop with Ctrl-C", flush=True)
        return _serve_until_interrupted(predictor)
    if args.mode == "cluster" and not model_uri.startswith(CLUSTER_SCHEMES):
        raise ConfigError(
            f"{model_uri}: a cluster cannot read this machine's files; give an s3:// URI "
            "(upload with toptagger.storage, or register the model in MLflow with S3 artifacts)"
        )
    isvc = render(model_uri, args.overlay, namespace=args.namespace, manifests_dir=args.manifests)
    if args.mode == "render":
        sys.stdout.write(yaml.safe_dump(to_dict(isvc), sort_keys=False))
        return 0
    deployed = deploy_to_cluster(isvc, kserve_client(args.kubeconfig, args.context), timeout_s=args.timeout)
    url = deployed.url or deployed.address or ""
    print(f"ready: InferenceService {deployed.namespace}/{deployed.name} generation {deployed.generation} at {url}")
    if args.url_file:
        args.url_file.parent.mkdir(parents=True, exist_ok=True)
        args.url_file.write_text(url)
    return 0


if __name__ == "__main__":
    from toptagger.cli import run_cli

    sys.exit(run_cli(main))
