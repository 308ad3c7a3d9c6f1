"""components.deploy: rendering the overlays, the cluster path against a fake API server, local mode.

The Kubernetes API server cannot exist here (no cluster, no network), so the cluster tests run
the real ``KServeClient`` and ``kubernetes`` client over HTTP against ``FakeKubeAPI``: a small
loopback server that speaks the custom-objects endpoints for InferenceServices (GET, POST, merge
PATCH with resourceVersion checks, 404/403/409 answers as the real server gives them) and plays a
controller that marks each generation Ready. That fake is the only stand-in in this file.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from toptagger.deploy import kserve
from toptagger.deploy.k8s_models import from_dict, to_dict
from toptagger.errors import ConfigError

REPO = Path(__file__).resolve().parents[3]
MANIFESTS = REPO / "manifests"
URI = "s3://mlflow/3/models/m-0123456789abcdef/artifacts"

needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")


def kustomize_with_uri(overlay: str, uri: str, tmp_path: Path) -> dict[str, Any]:
    """The overlay's InferenceService with ``uri`` set by kustomize itself (an overlay of the overlay)."""
    base_isvc = next(d for d in kserve.kustomize(MANIFESTS / "overlays" / overlay) if d["kind"] == "InferenceService")
    env = base_isvc["spec"]["predictor"]["containers"][0]["env"]
    index = next(i for i, e in enumerate(env) if e["name"] == "STORAGE_URI")
    outer = tmp_path / f"with-uri-{overlay}"
    outer.mkdir()
    patch = [
        {"op": "test", "path": f"/spec/predictor/containers/0/env/{index}/name", "value": "STORAGE_URI"},
        {"op": "replace", "path": f"/spec/predictor/containers/0/env/{index}/value", "value": uri},
    ]
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(MANIFESTS / "overlays" / overlay, outer)],
        "patches": [{"target": {"kind": "InferenceService", "name": "top-tagger"}, "patch": yaml.safe_dump(patch)}],
    }
    (outer / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return next(d for d in kserve.kustomize(outer) if d["kind"] == "InferenceService")


# ---------------------------------------------------------------------------------------------
# Rendering


@needs_kubectl
@pytest.mark.parametrize("overlay", kserve.OVERLAYS)
def test_render_equals_the_overlay_built_with_that_uri(overlay: str, tmp_path: Path) -> None:
    rendered = to_dict(kserve.render(URI, overlay))
    assert rendered == kustomize_with_uri(overlay, URI, tmp_path)
    env = {e["name"]: e.get("value") for e in rendered["spec"]["predictor"]["containers"][0]["env"]}
    assert env["STORAGE_URI"] == URI


@needs_kubectl
def test_render_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown overlay 'tpu'"):
        kserve.render(URI, "tpu")
    with pytest.raises(ConfigError, match="storage URI is needed"):
        kserve.render("", "cpu")
    with pytest.raises(ConfigError, match="not a kustomize directory"):
        kserve.render(URI, "cpu", manifests_dir=tmp_path)
    # A tree whose predictor container was renamed: the deploy step refuses it.
    tree = tmp_path / "manifests"
    shutil.copytree(MANIFESTS, tree)
    isvc_file = tree / "base" / "inferenceservice.yaml"
    isvc_file.write_text(isvc_file.read_text().replace("name: kserve-container", "name: predictor"))
    # The overlays' own patches guard containers/0 with a JSON-patch test, which kustomize reports ...
    with pytest.raises(ConfigError, match="testing value /spec/predictor/containers/0/name failed"):
        kserve.render(URI, "cpu", manifests_dir=tree)
    # ... and an overlay without patches reaches the deploy step's own check.
    cpu = tree / "overlays" / "cpu" / "kustomization.yaml"
    cpu.write_text(
        cpu.read_text().replace(
            "patches:\n  - path: runtime.yaml\n    target: {kind: InferenceService, name: top-tagger}\n", ""
        )
    )
    with pytest.raises(ConfigError, match="no container named kserve-container"):
        kserve.render(URI, "cpu", manifests_dir=tree)


def test_model_classes_reject_fields_the_sdk_does_not_know() -> None:
    doc = {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": "x"},
        "spec": {"predictor": {"containers": [{"name": "kserve-container", "imagePullPolicyy": "Always"}]}},
    }
    with pytest.raises(ConfigError, match=r"containers\[0\]: field\(s\) imagePullPolicyy unknown to the V1Container"):
        from_dict(doc, "V1beta1InferenceService")
    doc["spec"]["predictor"]["containers"][0].pop("imagePullPolicyy")
    assert to_dict(from_dict(doc, "V1beta1InferenceService")) == doc


def test_merge_patch_removes_what_the_new_spec_lacks() -> None:
    current = {"predictor": {"nodeSelector": {"pool": "fpga"}, "minReplicas": 1, "containers": [{"name": "a"}]}}
    desired = {"predictor": {"minReplicas": 2, "containers": [{"name": "b"}]}}
    assert kserve.merge_patch(current, desired) == {
        "predictor": {"nodeSelector": None, "minReplicas": 2, "containers": [{"name": "b"}]}
    }


# ---------------------------------------------------------------------------------------------
# Cluster mode against a fake API server (see the module docstring)

TOKEN = "fake-api-token"  # for the fake server only: proves the client sends the kubeconfig's credentials


def merge(target: Any, patch: Any) -> Any:
    """RFC 7386, as the API server applies application/merge-patch+json."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge(result.get(key), value)
    return result


class FakeKubeAPI(ThreadingHTTPServer):
    PREFIX = "/apis/serving.kserve.io/v1beta1/namespaces/"

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.requests: list[tuple[str, str, str, Any]] = []
        self.ready = True  # the controller marks each generation Ready (False: it never does)
        self.forbidden = False  # RBAC says no
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def reconcile(self, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        name, namespace = meta["name"], meta["namespace"]
        if self.ready:
            obj["status"] = {
                "observedGeneration": meta["generation"],
                "url": f"http://{name}-{namespace}.example.com",
                "address": {"url": f"http://{name}-predictor.{namespace}.svc.cluster.local"},
                "conditions": [{"type": "Ready", "status": "True"}],
            }
        else:
            obj["status"] = {
                "observedGeneration": meta["generation"],
                "conditions": [
                    {"type": "PredictorReady", "status": "False", "reason": "Unschedulable", "message": "0/3 nodes"},
                    {"type": "Ready", "status": "False"},
                ],
            }


class _Handler(BaseHTTPRequestHandler):
    server: FakeKubeAPI

    def log_message(self, *args: object) -> None:  # keep pytest output clean
        pass

    def _send(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _status(self, code: int, reason: str, message: str) -> None:
        self._send(code, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason,
                          "message": message, "code": code})  # fmt: skip

    def _handle(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        server = self.server
        server.requests.append((method, self.path, self.headers.get("Content-Type", ""), body))
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self._status(401, "Unauthorized", "no credentials")
        if not self.path.startswith(FakeKubeAPI.PREFIX):
            return self._status(404, "NotFound", self.path)
        parts = self.path[len(FakeKubeAPI.PREFIX) :].split("?")[0].split("/")
        namespace, name = parts[0], (parts[2] if len(parts) > 2 else None)
        if server.forbidden:
            return self._status(403, "Forbidden", f"cannot {method.lower()} inferenceservices in {namespace}")
        with server.lock:
            key = (namespace, name or (body or {}).get("metadata", {}).get("name", ""))
            current = server.objects.get(key)
            if method == "GET":
                if current is None:
                    return self._status(404, "NotFound", f'inferenceservices "{name}" not found')
                server.reconcile(current)
                return self._send(200, current)
            if method == "POST":
                if current is not None:
                    return self._status(409, "AlreadyExists", "exists")
                obj = {**body, "metadata": {**body["metadata"], "namespace": namespace, "generation": 1,
                                            "resourceVersion": "1"}}  # fmt: skip
                server.objects[key] = obj
                return self._send(201, obj)
            if method == "PATCH":
                if self.headers.get("Content-Type") != "application/merge-patch+json":
                    return self._status(415, "UnsupportedMediaType", self.headers.get("Content-Type", ""))
                if current is None:
                    return self._status(404, "NotFound", f'inferenceservices "{name}" not found')
                version = body.get("metadata", {}).get("resourceVersion")
                if version is not None and version != current["metadata"]["resourceVersion"]:
                    return self._status(409, "Conflict", "the object has been modified")
                updated = merge(current, body)
                meta = updated["metadata"]
                if updated.get("spec") != current.get("spec"):
                    meta["generation"] = current["metadata"]["generation"] + 1
                meta["resourceVersion"] = str(int(current["metadata"]["resourceVersion"]) + 1)
                server.objects[key] = updated
                return self._send(200, updated)
        return self._status(405, "MethodNotAllowed", method)

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PATCH(self) -> None:
        self._handle("PATCH")


@pytest.fixture
def fake_api() -> Iterator[FakeKubeAPI]:
    server = FakeKubeAPI()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def kube_client(fake_api: FakeKubeAPI) -> Any:
    from kserve import KServeClient

    kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "fake", "cluster": {"server": fake_api.url}}],
        "users": [{"name": "deployer", "user": {"token": TOKEN}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "deployer", "namespace": "kubeflow"}}],
        "current-context": "fake",
    }
    return KServeClient(config_dict=kubeconfig)


@needs_kubectl
def test_cluster_deploy_creates_then_patches_and_waits_for_ready(fake_api: FakeKubeAPI, kube_client: Any) -> None:
    first = kserve.deploy_to_cluster(kserve.render(URI, "fpga"), kube_client, timeout_s=10, poll_s=0.05)
    assert first.url == "http://top-tagger-kubeflow.example.com"
    assert first.address == "http://top-tagger-predictor.kubeflow.svc.cluster.local"
    assert (first.namespace, first.generation) == ("kubeflow", 1)
    stored = fake_api.objects[("kubeflow", "top-tagger")]
    rendered = to_dict(kserve.render(URI, "fpga"))
    assert stored["spec"] == rendered["spec"]
    assert stored["metadata"]["annotations"] == rendered["metadata"]["annotations"]
    assert [r[0] for r in fake_api.requests][:2] == ["GET", "POST"]

    # A new champion on the CPU overlay: patched in place, FPGA scheduling removed, generation 2.
    new_uri = URI.replace("m-0123456789abcdef", "m-fedcba9876543210")
    second = kserve.deploy_to_cluster(kserve.render(new_uri, "cpu"), kube_client, timeout_s=10, poll_s=0.05)
    assert second.generation == 2
    (patch,) = [r for r in fake_api.requests if r[0] == "PATCH"]
    assert patch[2] == "application/merge-patch+json"
    assert patch[3]["spec"]["predictor"]["nodeSelector"] is None
    stored = fake_api.objects[("kubeflow", "top-tagger")]
    assert stored["spec"] == to_dict(kserve.render(new_uri, "cpu"))["spec"]


@needs_kubectl
def test_cluster_deploy_times_out_with_the_reason(fake_api: FakeKubeAPI, kube_client: Any) -> None:
    fake_api.ready = False
    with pytest.raises(kserve.DeployError, match=r"not ready after 1 s: PredictorReady=False \(Unschedulable: 0/3"):
        kserve.deploy_to_cluster(kserve.render(URI, "fpga"), kube_client, timeout_s=1, poll_s=0.1)


@needs_kubectl
def test_cluster_deploy_explains_missing_rbac(fake_api: FakeKubeAPI, kube_client: Any) -> None:
    fake_api.forbidden = True
    with pytest.raises(kserve.DeployError, match="not allowed \\(403\\); bind the top-tagger-deployer Role"):
        kserve.deploy_to_cluster(kserve.render(URI, "cpu"), kube_client, timeout_s=1, poll_s=0.1)


# ---------------------------------------------------------------------------------------------
# Local mode. The error paths run a stand-in ``serving`` package (a real process that misbehaves
# on purpose) so that they hold whatever the real predictor does; the last test runs the real one.

HAS_SERVING = (REPO / "serving" / "__main__.py").exists()
needs_serving = pytest.mark.skipif(not HAS_SERVING, reason="serving/__main__.py does not exist yet (the predictor)")
