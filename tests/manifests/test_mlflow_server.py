"""manifests/mlflow: the MLflow tracking server's Deployment, run for real from its own settings.

The Deployment configures ``mlflow server`` entirely through environment variables, so the test
starts ``mlflow server`` with exactly that environment (Secrets replaced by test values, S3 by the
loopback moto server, host and port by loopback ones) and talks to it as the pipeline would.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import kubernetes_validate
import pytest
from mlflow.server.security_utils import is_allowed_host_header

from serving.process import free_port
from tests.conftest import wait_for_port
from tests.manifests.test_manifests import K8S_VERSION, MANIFESTS, build


@pytest.fixture(scope="module")
def docs() -> list[dict[str, Any]]:
    return build(MANIFESTS / "mlflow")


def container_of(docs: list[dict[str, Any]]) -> dict[str, Any]:
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def service_names(docs: list[dict[str, Any]]) -> tuple[list[str], int]:
    service = next(d for d in docs if d["kind"] == "Service")
    name, namespace = service["metadata"]["name"], service["metadata"]["namespace"]
    names = [name, f"{name}.{namespace}", f"{name}.{namespace}.svc", f"{name}.{namespace}.svc.cluster.local"]
    return names, service["spec"]["ports"][0]["port"]


def test_builds_and_validates(docs: list[dict[str, Any]]) -> None:
    assert sorted(d["kind"] for d in docs) == ["Deployment", "Service"]
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    container = container_of(docs)
    assert container["command"] == ["mlflow", "server"]
    assert container["image"].startswith("registry.example.com/top-tagger/components:")
    secret_env = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"] if "valueFrom" in e}
    assert secret_env["MLFLOW_BACKEND_STORE_URI"] == "top-tagger-mlflow-server", "the DB password stays in a Secret"
    assert secret_env["AWS_SECRET_ACCESS_KEY"] == "top-tagger-s3"


def test_every_in_cluster_name_of_the_service_is_an_allowed_host(docs: list[dict[str, Any]]) -> None:
    """MLflow 3 answers 403 to Host headers it does not know; the pipeline uses the Service's names."""
    env = {e["name"]: e.get("value") for e in container_of(docs)["env"]}
    allowed = [h.strip() for h in env["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")]
    names, port = service_names(docs)
    for name in names:
        for host in (name, f"{name}:{port}"):
            assert is_allowed_host_header(allowed, host), host
    for host in ("localhost:5000", "10.2.3.4:5000", "172.20.0.7:5000", "192.168.1.9:5000"):  # port-forward, probes
        assert is_allowed_host_header(allowed, host), host
    for host in ("mlflow.attacker.example", "evil.example:5000", "172.32.0.1:5000"):
        assert not is_allowed_host_header(allowed, host), host


def moto_s3(endpoint: str) -> Any:
    keys = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **keys)


@pytest.fixture
def mlflow_server(docs: list[dict[str, Any]], s3_server: str, tmp_path: Path) -> Iterator[str]:
    """``mlflow server`` with the Deployment's environment; returns its loopback URL."""
    secrets = {
        "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "MLFLOW_S3_ENDPOINT_URL": s3_server,
    }
    env = {"PATH": os.environ["PATH"], "AWS_DEFAULT_REGION": "us-east-1"}
    for entry in container_of(docs)["env"]:
        env[entry["name"]] = secrets[entry["name"]] if "valueFrom" in entry else entry["value"]
    port = free_port()
    env.update(MLFLOW_HOST="127.0.0.1", MLFLOW_PORT=str(port), HOME=str(tmp_path), TMPDIR=str(tmp_path))
    bucket = env["MLFLOW_DEFAULT_ARTIFACT_ROOT"].removeprefix("s3://").split("/")[0]
    s3 = moto_s3(s3_server)
    if bucket not in [b["Name"] for b in s3.list_buckets().get("Buckets", [])]:
        s3.create_bucket(Bucket=bucket)
    command = container_of(docs)["command"]
    command = [str(Path(sys.executable).parent / command[0]), *command[1:]]
    log = (tmp_path / "mlflow.log").open("w")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, process, timeout=120)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while httpx.get(f"{url}/health", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, (tmp_path / "mlflow.log").read_text()
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def test_server_from_the_manifest_answers_the_pipeline_and_registers_s3_uris_for_kserve(
    docs: list[dict[str, Any]], mlflow_server: str, s3_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    names, port = service_names(docs)
    search = f"{mlflow_server}/api/2.0/mlflow/experiments/search?max_results=1"
    for name in names:  # what a pod in the cluster sends as Host
        assert httpx.get(search, headers={"Host": f"{name}:{port}"}, timeout=10).status_code == 200, name
    refused = httpx.get(search, headers={"Host": "evil.example:5000"}, timeout=10)
    assert refused.status_code == 403 and "Invalid Host header" in refused.text

    # The pipeline's register step, in miniature, with a task's S3 settings (the top-tagger-s3 Secret):
    # a run, a metric, model files, a registered version.
    from mlflow import MlflowClient

    for name, value in (("MLFLOW_S3_ENDPOINT_URL", s3_server), ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    run = client.create_run(client.create_experiment("top-tagging"))
    client.log_metric(run.info.run_id, "auc", 0.97)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "tagger.json").write_text("{}")
    client.log_artifacts(run.info.run_id, str(tmp_path / "model"), artifact_path="model")
    client.create_registered_model("top-tagger")
    version = client.create_model_version("top-tagger", f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    download = client.get_model_version_download_uri("top-tagger", version.version)
    env = {e["name"]: e.get("value") for e in container_of(docs)["env"]}
    assert download.startswith(env["MLFLOW_DEFAULT_ARTIFACT_ROOT"]), f"KServe cannot fetch {download}"
    bucket, _, prefix = env["MLFLOW_DEFAULT_ARTIFACT_ROOT"].removeprefix("s3://").partition("/")
    keys = [o["Key"] for o in moto_s3(s3_server).list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]
    assert any(key.endswith(f"{run.info.run_id}/artifacts/model/tagger.json") for key in keys), keys
