"""A fake Kubeflow Trainer API on loopback, and what the TrainJob tests share (config, pool, shape).

``FakeTrainerAPI`` speaks the TrainJob custom-objects endpoints (GET, POST, DELETE), the pods list
and the pod log endpoints, with a scripted controller (:func:`scripted`) that plays Kubeflow
Trainer: the Kubernetes API server and Kubeflow Trainer cannot exist here. The real ``kubernetes``
client talks to it over HTTP (:func:`kube_client`). The ``trainer_api`` fixture of
``tests/conftest.py`` starts and stops these servers; the runner's tests
(``tests/toptagger/deploy/test_trainjob.py``) and the launcher's (``tests/components/test_trainjob.py``)
use them.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from http.server import ThreadingHTTPServer
from typing import Any

from tests.toptagger.deploy.test_kserve import TOKEN
from tests.toptagger.deploy.test_kserve import _Handler as KubeHandler
from toptagger.deploy.gpu_pool import GpuPool
from toptagger.deploy.trainjob.render import TrainJobShape
from toptagger.deploy.trainjob.render import render as render_trainjob
from toptagger.training.config import TrainConfig, to_arguments

IMAGE = "registry.example.com/top-tagger/components:0.1.0"
ROOT = "s3://bucket/checkpoints"
CONFIG = TrainConfig.from_pipeline(
    image_size=32, epochs=1, batch_size=8, learning_rate=1e-3, seed=3, base_model_uri="", val_fraction=0.15,
    test_fraction=0.15, max_steps_per_epoch=2, patience=2,
)  # fmt: skip
POOL = GpuPool.parse(None, None, "cloud.google.com/gke-accelerator=nvidia-h100-80gb", "dedicated=gpu:NoSchedule")


def render(shape: TrainJobShape | None = None, **kwargs: Any) -> dict[str, Any]:
    options = {"run_key": "3f2a9c1e-0b7d-4c55-9e61-2f0d5a7b8c90", "checkpoint_root": ROOT,
               "config_args": to_arguments(CONFIG)} | kwargs  # fmt: skip
    return render_trainjob(shape or TrainJobShape(2, 4, POOL), IMAGE, **options)


SHAPE = TrainJobShape(2, 4, POOL, namespace="kubeflow")

TJ_PREFIX = "/apis/trainer.kubeflow.org/v1alpha1/namespaces/"
CORE_PREFIX = "/api/v1/namespaces/"


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclasses.dataclass
class FakePod:
    phase: str = "Pending"
    waiting: str = ""
    log: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (RFC 3339 time, line)

    def say(self, line: str) -> None:
        self.log.append((_now(), line))


class FakeTrainerAPI(ThreadingHTTPServer):
    """TrainJobs, their pods and logs; ``controller(server, job)`` plays Kubeflow Trainer on each GET."""

    def __init__(self, controller: Callable[[FakeTrainerAPI, dict[str, Any]], None]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.controller = controller
        self.jobs: dict[tuple[str, str], dict[str, Any]] = {}
        self.pods: dict[str, FakePod] = {}
        self.requests: list[tuple[str, str]] = []
        self.queries: list[str] = []  # the full request paths, query included
        self.created: list[dict[str, Any]] = []
        self.forbidden = False
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def condition(self, job: dict[str, Any], kind: str, reason: str, message: str) -> None:
        conditions = job.setdefault("status", {}).setdefault("conditions", [])
        conditions[:] = [c for c in conditions if c["type"] != kind]
        conditions.append({"type": kind, "status": "True", "reason": reason, "message": message,
                           "lastTransitionTime": _now()})  # fmt: skip


class _Handler(KubeHandler):  # its JSON replies (_send, _status), quiet log, GET and POST; our own routes
    server: FakeTrainerAPI  # type: ignore[assignment]

    def _send_text(self, text: str) -> None:  # pod logs are plain text
        data = text.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        server, path = self.server, self.path.split("?")[0]
        server.requests.append((method, path))
        server.queries.append(self.path)
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self._status(401, "Unauthorized", "no credentials")
        if server.forbidden:
            return self._status(403, "Forbidden", 'trainjobs.trainer.kubeflow.org is forbidden: User "x" cannot create')
        with server.lock:
            if path.startswith(TJ_PREFIX):
                return self._trainjobs(method, path[len(TJ_PREFIX) :].split("/"), body)
            if path.startswith(CORE_PREFIX):
                return self._pods(path[len(CORE_PREFIX) :].split("/"))
        return self._status(404, "NotFound", "the server could not find the requested resource")

    def _trainjobs(self, method: str, parts: list[str], body: Any) -> None:
        server = self.server
        namespace, name = parts[0], (parts[2] if len(parts) > 2 else body["metadata"]["name"])
        job = server.jobs.get((namespace, name))
        if method == "POST":
            if job is not None:
                return self._status(409, "AlreadyExists", f'trainjobs.trainer.kubeflow.org "{name}" already exists')
            server.created.append(copy.deepcopy(body))
            job = {**body, "metadata": {**body["metadata"], "namespace": namespace, "uid": str(len(server.created))}}
            server.jobs[(namespace, name)] = job
            return self._send(201, job)
        if job is None:
            return self._status(404, "NotFound", f'trainjobs.trainer.kubeflow.org "{name}" not found')
        if method == "DELETE":
            del server.jobs[(namespace, name)]
            return self._send(200, {"kind": "Status", "status": "Success"})
        server.controller(server, job)
        return self._send(200, job)

    def _pods(self, parts: list[str]) -> None:
        server = self.server
        if len(parts) == 2 and parts[1] == "pods":
            items = [
                {"metadata": {"name": name, "namespace": parts[0]},
                 "status": {"phase": pod.phase, "containerStatuses": [
                     {"name": "node", "ready": False, "restartCount": 0, "image": IMAGE, "imageID": "",
                      "state": {"waiting": {"reason": pod.waiting, "message": "0/4 nodes available"}}}
                 ] if pod.waiting else []}}
                for name, pod in server.pods.items()
            ]  # fmt: skip
            return self._send(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items})
        if len(parts) == 4 and parts[3] == "log":
            pod = server.pods.get(parts[2])
            if pod is None or pod.phase == "Pending":
                return self._status(400, "BadRequest", "container node is waiting to start")
            return self._send_text("".join(f"{ts} {line}\n" for ts, line in pod.log))
        return self._status(404, "NotFound", "the server could not find the requested resource")

    def do_DELETE(self) -> None:
        self._handle("DELETE")


def scripted(finish: Callable[[dict[str, Any]], None] | None = None, fail: bool = False) -> Callable:
    """A controller: pods pending, then running and logging, then Complete (``finish(job)`` first) or Failed."""

    def controller(server: FakeTrainerAPI, job: dict[str, Any]) -> None:
        status = job.setdefault("status", {})
        step = status.setdefault("_step", 0)  # the fake's own bookkeeping
        pods = [f"{job['metadata']['name']}-node-0-{i}" for i in range(job["spec"]["trainer"]["numNodes"])]
        if step == 0:
            server.condition(job, "Created", "JobSetCreated", "the JobSet was created")
            server.pods |= {name: FakePod(waiting="Unschedulable") for name in pods}
        elif step == 1:
            for name in pods:
                server.pods[name] = FakePod(phase="Running")
                server.pods[name].say("epoch 1/1: train_loss 0.69")
            status["jobsStatus"] = [{"name": "node", "active": len(pods), "ready": len(pods), "succeeded": 0,
                                     "failed": 0}]  # fmt: skip
        elif fail:
            server.pods[pods[0]].say("RuntimeError: CUDA out of memory")
            server.pods[pods[0]].phase = "Failed"
            server.condition(job, "Failed", "FailedJobs", "jobset failed: job node-0 failed (BackoffLimitExceeded)")
        else:
            if finish and step == 2:
                finish(job)
            server.pods[pods[0]].say("best validation AUC 0.9")
            for name in pods:
                server.pods[name].phase = "Succeeded"
            server.condition(job, "Complete", "JobSetCompleted", "the JobSet completed")
        status["_step"] = step + 1

    return controller


def kubeconfig(server: FakeTrainerAPI) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": server.url}}],
        "users": [{"name": "pipeline-runner", "user": {"token": TOKEN}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "pipeline-runner"}}],
    }  # fmt: skip


def kube_client(server: FakeTrainerAPI) -> Any:
    from kubernetes.config import new_client_from_config_dict

    return new_client_from_config_dict(kubeconfig(server))
