"""The TrainJob form of the train step: the rendered TrainJob, its CLI, and the launcher against a fake API.

Real parts: the v2.3.0 TrainJob CRD's own schema (``../shared/schemas``), the ``kubernetes``
client over HTTP, S3 on loopback (moto), and in the last test the real trainer command of the
rendered job, run by ``torchrun`` with the ``PET_*`` variables the Trainer's torch plugin injects.
The one stand-in is ``FakeTrainerAPI``: a loopback server speaking the TrainJob custom-objects
endpoints (GET, POST, DELETE), the pods list and the pod log endpoints, with a scripted controller
(the Kubernetes API server and Kubeflow Trainer cannot exist here).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from kfp import dsl

from components import train as train_component
from components import train_job as launcher
from pipelines import trainjob
from pipelines.gpu_pool import GpuPool, Toleration
from tests.components.artifacts import artifact
from tests.toptagger.deploy.test_kserve import TOKEN
from tests.toptagger.deploy.test_kserve import _Handler as KubeHandler
from toptagger import storage
from toptagger.cli import run_cli
from toptagger.deploy.trainjob import TrainJobFailed, run_trainjob
from toptagger.errors import ConfigError
from toptagger.training.config import TrainConfig, from_arguments, to_arguments

REPO = Path(__file__).resolve().parents[2]
CRD = REPO.parent / "shared" / "schemas" / "trainer-v2.3.0-crd-trainjobs.yaml"
IMAGE = "registry.example.com/top-tagger/components:0.1.0"
ROOT = "s3://bucket/checkpoints"
CONFIG = TrainConfig.from_pipeline(
    image_size=32, epochs=1, batch_size=8, learning_rate=1e-3, seed=3, base_model_uri="", val_fraction=0.15,
    test_fraction=0.15, max_steps_per_epoch=2, patience=2,
)  # fmt: skip
POOL = GpuPool.parse(None, None, "cloud.google.com/gke-accelerator=nvidia-h100-80gb", "dedicated=gpu:NoSchedule")


def render(shape: trainjob.TrainJobShape | None = None, **kwargs: Any) -> dict[str, Any]:
    options = {"run_key": "3f2a9c1e-0b7d-4c55-9e61-2f0d5a7b8c90", "checkpoint_root": ROOT,
               "config_args": to_arguments(CONFIG)} | kwargs  # fmt: skip
    return trainjob.render(shape or trainjob.TrainJobShape(2, 4, POOL), IMAGE, **options)


# ---------------------------------------------------------------------------------------------
# The rendered TrainJob against the CRD


def _strict(schema: Any) -> Any:
    """The CRD schema with unknown fields refused, as the API server's strict field validation does.

    A structural schema leaves ``additionalProperties`` out, and the server prunes (or, with
    ``kubectl apply --validate=strict``, refuses) what it does not declare; plain jsonschema would
    accept a misspelt field silently. ``metadata`` is left open: the CRD declares only its type.
    """
    if isinstance(schema, dict):
        out = {key: _strict(value) for key, value in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    return schema


@pytest.fixture(scope="module")
def crd_validator() -> jsonschema.Draft7Validator:
    if not CRD.is_file():
        pytest.skip(f"the Trainer v2.3.0 CRD is not at {CRD} (expected ../shared/schemas beside the checkout)")
    crd = yaml.safe_load(CRD.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    assert (crd["spec"]["group"], crd["spec"]["names"]["kind"]) == ("trainer.kubeflow.org", "TrainJob")
    schema = _strict(version["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = {"type": "object"}
    return jsonschema.Draft7Validator(schema)


def errors(validator: jsonschema.Draft7Validator, doc: dict[str, Any]) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


@pytest.mark.parametrize(
    "shape",
    [
        trainjob.TrainJobShape(2, 4, POOL),
        trainjob.TrainJobShape(1, 1, GpuPool(), namespace="team-a"),
        trainjob.TrainJobShape(3, 8, GpuPool.parse("amd.com/gpu", None, "none", "none")),
    ],
    ids=["2x4-own-pool", "1x1-nvidia", "3x8-no-selector"],
)
def test_the_rendered_trainjob_validates_against_the_v2_3_crd(
    crd_validator: jsonschema.Draft7Validator, shape: trainjob.TrainJobShape
) -> None:
    assert errors(crd_validator, render(shape)) == []


def test_crd_validation_catches_mistakes(crd_validator: jsonschema.Draft7Validator) -> None:
    broken = render()
    broken["spec"]["trainer"]["numProcsPerNode"] = 4  # misspelt
    broken["spec"]["trainer"]["numNodes"] = "2"  # a string
    patch = broken["spec"]["runtimePatches"][0]
    del patch["manager"]  # required: patches are keyed by manager
    pod = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]
    pod["spec"]["priorityClassName"] = "high"  # not a field a runtime patch may set
    found = errors(crd_validator, broken)
    assert any("'numProcsPerNode' was unexpected" in e for e in found), found
    assert any(e.startswith("spec/trainer/numNodes: '2' is not of type 'integer'") for e in found), found
    assert any("'manager' is a required property" in e for e in found), found
    assert any("'priorityClassName' was unexpected" in e for e in found), found


def test_the_trainjob_runs_the_trainers_command_on_the_pool_with_secrets_only() -> None:
    job = render()
    spec, trainer = job["spec"], job["spec"]["trainer"]
    assert (job["apiVersion"], job["kind"]) == ("trainer.kubeflow.org/v1alpha1", "TrainJob")
    assert spec["runtimeRef"]["name"] == "torch-distributed"
    assert (trainer["numNodes"], trainer["numProcPerNode"], trainer["image"]) == (2, 4, IMAGE)
    assert trainer["resourcesPerNode"]["limits"] == {"nvidia.com/gpu": "4"}
    assert trainer["command"] == ["torchrun", "-m", "components.train"]
    # The trainer's own parser reads the arguments back into the same job and the same config.
    args = train_component.build_parser().parse_args(trainer["args"])
    key = "3f2a9c1e-0b7d-4c55-9e61-2f0d5a7b8c90"
    assert args.data == f"{ROOT}/{key}.trainjob/fit_jets.npz"
    assert (args.checkpoint_root, args.run_key, args.export_to) == (ROOT, key, f"{ROOT}/{key}.trainjob/export")
    assert args.out is None and from_arguments(args) == CONFIG
    # torchrun takes nodes, processes, rank and master from the PET_* the torch plugin injects.
    env = {e["name"]: e for e in trainer["env"]}
    assert not [name for name in env if name.startswith("PET_")]
    assert not [a for a in trainer["command"] + trainer["args"] if a.startswith(("--nnodes", "--nproc", "--node"))]
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_PASSWORD"):
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert "value" not in env[name] and ref["key"] == name
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "top-tagger-s3"
    assert env["AWS_ENDPOINT_URL"]["valueFrom"]["secretKeyRef"]["optional"] is True
    # The pool: a runtime patch of the runtime's node job, with our own manager key.
    (patch,) = spec["runtimePatches"]
    assert patch["manager"] == trainjob.PATCH_MANAGER
    (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    pod = node["template"]["spec"]["template"]["spec"]
    assert node["name"] == "node"
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    assert pod["tolerations"] == [{"key": "dedicated", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}]
    # A pool without selector and taint needs no patch.
    bare = render(trainjob.TrainJobShape(1, 1, GpuPool.parse(None, None, "none", "none")))
    assert "runtimePatches" not in bare["spec"]


def test_names_and_staging_follow_the_run_key_and_bad_inputs_are_named() -> None:
    name = trainjob.trainjob_name("3f2a9c1e-0b7d-4c55-9e61-2f0d5a7b8c90")
    assert name == trainjob.trainjob_name("3f2a9c1e-0b7d-4c55-9e61-2f0d5a7b8c90")  # a retry finds it again
    assert name != trainjob.trainjob_name("3f2a9c1e-0b7d-4c55-9e61-2f0d5a7b8c91")
    for key in ("3f2a9c1e-0b7d-4c55-9e61-2f0d5a7b8c90", "Local_Run 2026/12/02", "---", "x" * 300):
        made = trainjob.trainjob_name(key)
        assert len(made) <= 40 and made[0].isalpha() and made[-1].isalnum()
        assert set(made) <= set("abcdefghijklmnopqrstuvwxyz0123456789-"), made
    with pytest.raises(ConfigError, match="a TrainJob needs an s3:// prefix that all its nodes can reach"):
        render(checkpoint_root="/tmp/checkpoints")
    with pytest.raises(ConfigError, match="the TrainJob's jets must be on s3://"):
        render(data_uri="/tmp/fit.npz")
    with pytest.raises(ConfigError, match="--gpus-per-node must be at least 1, got 0"):
        trainjob.TrainJobShape(1, 0)
    with pytest.raises(ConfigError, match="keep the TrainJob: one of never, on-failure, always, got 'sometimes'"):
        trainjob.TrainJobShape(keep="sometimes")


def test_pool_flags_read_back_to_the_same_pool() -> None:
    for pool in (POOL, GpuPool(), GpuPool.parse("amd.com/gpu", None, "none", "none"),
                 GpuPool(toleration=Toleration("gpu", "NoExecute", "a100"))):  # fmt: skip
        flags = trainjob.pool_flags(pool)
        back = GpuPool.parse(flags["gpu_resource"], None, flags["gpu_node_selector"], flags["gpu_toleration"])
        assert back == dataclasses.replace(pool, count=GpuPool().count)


def test_cli_prints_what_render_gives(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["render", "--nodes", "2", "--gpus-per-node", "4", "--image", IMAGE, "--namespace", "team-a",
            "--epochs", "3", "--gpu-node-selector", "pool=h100"]  # fmt: skip
    assert run_cli(trainjob.main, argv) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    config = dataclasses.replace(TrainConfig(), epochs=3)
    shape = trainjob.TrainJobShape(2, 4, GpuPool.parse(None, None, "pool=h100", None))
    expected = trainjob.render(shape, IMAGE, run_key="manual", checkpoint_root="s3://top-tagger/checkpoints",
                               config_args=to_arguments(config), namespace="team-a")  # fmt: skip
    assert printed == expected and printed["metadata"]["namespace"] == "team-a"
    assert run_cli(trainjob.main, ["render", "--nodes", "1", "--gpus-per-node", "1", "--image", IMAGE,
                                   "--gpu-toleration", "bad key"]) == 2  # fmt: skip
    assert "--gpu-toleration 'bad key' is not KEY[=VALUE][:EFFECT]" in capsys.readouterr().err


def test_cli_help_runs_as_a_module() -> None:
    result = subprocess.run([sys.executable, "-m", "pipelines.trainjob", "render", "--help"], cwd=REPO,
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr
    for flag in ("--nodes", "--gpus-per-node", "--image", "--namespace", "--gpu-toleration", "--epochs"):
        assert flag in result.stdout, flag


# ---------------------------------------------------------------------------------------------
# The launcher against a fake API server (see the module docstring)

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


@pytest.fixture
def fake_api() -> Iterator[Callable[..., FakeTrainerAPI]]:
    servers = []

    def start(controller: Callable) -> FakeTrainerAPI:
        server = FakeTrainerAPI(controller)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


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


SHAPE = trainjob.TrainJobShape(2, 4, POOL, namespace="kubeflow")


def test_run_trainjob_reports_as_it_goes_and_deletes_a_completed_job(fake_api: Callable) -> None:
    server = fake_api(scripted())
    said: list[str] = []
    manifest = render(SHAPE)
    job = run_trainjob(manifest, kube_client(server), keep="on-failure", poll_s=0.01, emit=said.append)
    name = manifest["metadata"]["name"]
    assert server.created == [manifest] and job["metadata"]["name"] == name
    text = "\n".join(said)
    assert f"created TrainJob kubeflow/{name}" in text
    assert f"pod {name}-node-0-1: Pending (Unschedulable: 0/4 nodes available)" in text
    assert f"TrainJob kubeflow/{name}: job node: active 2, ready 2, succeeded 0, failed 0" in text
    assert f"TrainJob kubeflow/{name}: Complete=True (JobSetCompleted: the JobSet completed)" in text
    # Every log line of every pod, once each, in order, and the last one before the verdict.
    for pod in (f"{name}-node-0-0", f"{name}-node-0-1"):
        assert said.count(f"[{pod}] epoch 1/1: train_loss 0.69") == 1
    assert said.index(f"[{name}-node-0-0] best validation AUC 0.9") < said.index(f"TrainJob kubeflow/{name} complete")
    assert server.jobs == {} and ("DELETE", f"{TJ_PREFIX}kubeflow/trainjobs/{name}") in server.requests
    # A pod's log is read whole once, then only its recent part.
    reads = [q for q in server.queries if q.startswith(f"{CORE_PREFIX}kubeflow/pods/{name}-node-0-0/log")]
    assert len(reads) >= 2 and "sinceSeconds" not in reads[0] and all("sinceSeconds=" in q for q in reads[1:])


def test_a_failed_trainjob_fails_with_its_own_reason_and_is_kept_or_deleted(fake_api: Callable) -> None:
    server = fake_api(scripted(fail=True))
    manifest = render(SHAPE)
    said: list[str] = []
    with pytest.raises(TrainJobFailed, match=r"failed: FailedJobs: jobset failed: job node-0 failed \(BackoffLimit"):
        run_trainjob(manifest, kube_client(server), keep="on-failure", poll_s=0.01, emit=said.append)
    assert f"[{manifest['metadata']['name']}-node-0-0] RuntimeError: CUDA out of memory" in said
    assert len(server.jobs) == 1 and "kept TrainJob" in said[-1]  # kept, to read the failure
    # A retried launcher replaces the failed job (the new one resumes the checkpoint); "never" deletes it.
    with pytest.raises(TrainJobFailed, match="FailedJobs"):
        run_trainjob(manifest, kube_client(server), keep="never", poll_s=0.01, emit=said.append)
    assert "of an earlier attempt failed: replacing it" in " ".join(said)
    assert len(server.created) == 2 and server.jobs == {}


def test_a_retry_follows_the_running_job_and_keep_always_keeps_it(fake_api: Callable) -> None:
    server = fake_api(scripted())
    manifest = render(SHAPE)
    client = kube_client(server)
    server.jobs[("kubeflow", manifest["metadata"]["name"])] = copy.deepcopy(manifest)  # an earlier attempt's
    said: list[str] = []
    run_trainjob(manifest, client, keep="always", poll_s=0.01, emit=said.append)
    assert server.created == [] and "exists (an earlier attempt created it): following it" in said[0]
    assert len(server.jobs) == 1 and said[-1].startswith("kept TrainJob")


def test_a_stopped_launcher_deletes_its_job_unless_kept(fake_api: Callable) -> None:
    for keep, left in (("on-failure", 0), ("always", 1)):
        server = fake_api(scripted())

        def stop_when_running(line: str) -> None:
            if "epoch 1/1" in line:  # SIGTERM of a terminated run, as the component maps it
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            run_trainjob(render(SHAPE), kube_client(server), keep=keep, poll_s=0.01, emit=stop_when_running)
        assert len(server.jobs) == left, keep


def test_missing_rbac_is_named(fake_api: Callable) -> None:
    server = fake_api(scripted())
    server.forbidden = True
    with pytest.raises(TrainJobFailed, match=r"not allowed \(403\); bind the top-tagger-trainer Role"):
        run_trainjob(render(SHAPE), kube_client(server), poll_s=0.01, emit=lambda line: None)


def fake_export(uri: str, folder: Path, world_size: int) -> dict[str, Any]:
    """What rank 0 uploads (components.train.export_to): a model folder and summary.json."""
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "tagger.json").write_text('{"image": {"image_size": 32}}')
    (folder / "training.json").write_text("{}")
    summary = {"history": [{"epoch": 0}], "best_epoch": 0, "best_val_auc": 0.875, "n_train": 84, "n_val": 18,
               "world_size": world_size, "training_seconds": 12.5, "resumed": True}  # fmt: skip
    storage.upload_dir(folder, uri)
    (folder.parent / "summary.json").write_text(json.dumps(summary))
    storage.upload(folder.parent / "summary.json", f"{uri}/summary.json")  # last, as export_to does
    return summary


def test_the_launcher_stages_jets_runs_the_job_and_fills_the_model_as_the_train_step(
    fake_api: Callable, s3_env: str, tmp_path: Path
) -> None:
    root = f"{s3_env}/checkpoints"
    exported: dict[str, Any] = {}

    def finish(job: dict[str, Any]) -> None:  # the trainer's rank 0, at the end of the job
        args = train_component.build_parser().parse_args(job["spec"]["trainer"]["args"])
        assert storage.exists(args.data)  # the launcher staged the jets before creating the job
        exported.update(fake_export(args.export_to, tmp_path / "export", 8))

    server = fake_api(scripted(finish))
    fit = tmp_path / "fit_jets"
    fit.write_bytes(b"compact jets")
    fit_jets = artifact(dsl.Dataset, fit)
    model, metrics = artifact(dsl.Model, tmp_path / "out" / "model"), artifact(dsl.Metrics, tmp_path / "out" / "m")
    summary = launcher.train_job_step(fit_jets, model, metrics, CONFIG, root, "run-7", SHAPE, IMAGE,
                                      client=kube_client(server), poll_s=0.01)  # fmt: skip
    assert summary == exported
    (created,) = server.created
    assert created["metadata"]["name"] == trainjob.trainjob_name("run-7")
    assert created == render(SHAPE, run_key="run-7", checkpoint_root=root)  # the CLI's rendering, exactly
    out = Path(model.path)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "model/tagger.json", "training.json"]  # fmt: skip
    # Metadata and metrics as the train step records them (components.train.record_outputs).
    expected_model, expected_metrics = artifact(dsl.Model, tmp_path / "m2"), artifact(dsl.Metrics, tmp_path / "x2")
    train_component.record_outputs(exported, expected_model, expected_metrics, CONFIG, 12.5, True)
    assert model.metadata == expected_model.metadata and metrics.metadata == expected_metrics.metadata
    assert metrics.metadata["world_size"] == 8 and metrics.metadata["resumed"] == 1.0
    assert server.jobs == {}  # completed, keep=on-failure


def test_the_launcher_refuses_a_local_checkpoint_root(tmp_path: Path) -> None:
    fit_jets = artifact(dsl.Dataset, tmp_path / "fit")
    model, metrics = artifact(dsl.Model, tmp_path / "model"), artifact(dsl.Metrics, tmp_path / "metrics")
    with pytest.raises(ConfigError, match="checkpoint_root '/tmp/ck': a TrainJob needs an s3:// prefix"):
        launcher.train_job_step(fit_jets, model, metrics, CONFIG, "/tmp/ck", "run-7", SHAPE, IMAGE, client=object())


def test_the_launcher_component_takes_the_train_components_parameters() -> None:
    import inspect

    train = inspect.signature(train_component.train).parameters
    launch = inspect.signature(launcher.train_job).parameters
    shared = {name: p.annotation for name, p in train.items()}
    assert {name: launch[name].annotation for name in shared} == shared
    assert set(launch) - set(train) == {"image", "nodes", "gpus_per_node", "gpu_resource", "gpu_node_selector",
                                        "gpu_toleration", "namespace", "keep"}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The rendered command itself: the real trainer under torchrun, as a TrainJob's node would run it


@pytest.mark.slow
def test_the_rendered_trainer_command_trains_under_torchrun_and_the_launcher_takes_its_model(
    fake_api: Callable, s3_env: str, tiny_file: Path, tmp_path: Path
) -> None:
    """One node of the rendered job, two processes, on CPU (gloo): what the torch plugin's PET_* say."""
    from serving.process import free_port
    from toptagger.jets.compact import save_jets
    from toptagger.jets.dataset import read_jets

    root = f"{s3_env}/checkpoints"
    shape = trainjob.TrainJobShape(1, 2, GpuPool.parse(None, None, "none", "none"), namespace="kubeflow")
    secrets = {key: os.environ[key] for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL")}
    runs: list[subprocess.CompletedProcess] = []

    def finish(job: dict[str, Any]) -> None:
        trainer = job["spec"]["trainer"]
        env = {**os.environ, "PYTHONPATH": str(REPO), "AWS_DEFAULT_REGION": "us-east-1"}
        for item in trainer["env"]:  # the kubelet resolves secretKeyRef from the Secret
            if "value" in item:
                env[item["name"]] = item["value"]
            elif item["valueFrom"]["secretKeyRef"]["key"] in secrets:
                env[item["name"]] = secrets[item["valueFrom"]["secretKeyRef"]["key"]]
        env |= {"PET_NNODES": str(trainer["numNodes"]), "PET_NPROC_PER_NODE": str(trainer["numProcPerNode"]),
                "PET_NODE_RANK": "0", "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(free_port()),
                "OMP_NUM_THREADS": "1"}  # fmt: skip
        command = [str(Path(sys.executable).with_name(trainer["command"][0])), *trainer["command"][1:]]
        runs.append(subprocess.run(command + trainer["args"] + ["--device", "cpu"], cwd=REPO, env=env,
                                   capture_output=True, text=True, timeout=600))  # fmt: skip

    server = fake_api(scripted(finish))
    fit = tmp_path / "fit_jets.npz"
    save_jets(fit, read_jets(tiny_file))
    model, metrics = artifact(dsl.Model, tmp_path / "out" / "model"), artifact(dsl.Metrics, tmp_path / "out" / "m")
    launcher.train_job_step(artifact(dsl.Dataset, fit), model, metrics, CONFIG, root, "e2e", shape, IMAGE,
                            client=kube_client(server), poll_s=0.05)  # fmt: skip
    (run,) = runs
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = Path(model.path)
    for name in ("model/model.safetensors", "model/tagger.json", "model/model.onnx", "model/opencl/plan.json",
                 "state_dict.pt", "training.json"):  # fmt: skip
        assert (out / name).is_file(), name
    assert not (out / "summary.json").exists()
    assert metrics.metadata["world_size"] == 2 and metrics.metadata["resumed"] == 0.0
    assert model.metadata["image_size"] == 32 and 0 <= model.metadata["best_val_auc"] <= 1


def test_the_component_body_runs_the_job_of_its_parameters(
    fake_api: Callable, s3_env: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The KFP component function itself: its parameters become the config, the pool and the shape."""
    import signal

    def finish(job: dict[str, Any]) -> None:
        args = train_component.build_parser().parse_args(job["spec"]["trainer"]["args"])
        fake_export(args.export_to, tmp_path / "export", 2)

    server = fake_api(scripted(finish))
    config_file = tmp_path / "kubeconfig"
    config_file.write_text(yaml.safe_dump(kubeconfig(server)))
    monkeypatch.setenv("KUBECONFIG", str(config_file))
    monkeypatch.setattr("toptagger.deploy.trainjob.time.sleep", lambda seconds: None)  # the 10 s polls
    previous = signal.getsignal(signal.SIGTERM)
    fit = tmp_path / "fit_jets"
    fit.write_bytes(b"compact jets")
    model, metrics = artifact(dsl.Model, tmp_path / "model"), artifact(dsl.Metrics, tmp_path / "metrics")
    try:
        launcher.train_job(
            fit_jets=artifact(dsl.Dataset, fit), image_size=32, epochs=1, batch_size=8, learning_rate=1e-3, seed=3,
            base_model_uri="", val_fraction=0.15, test_fraction=0.15, max_steps_per_epoch=2, patience=2,
            checkpoint_root=f"{s3_env}/checkpoints", run_key="", pipeline_run_id="run-uuid", image=IMAGE, nodes=1,
            gpus_per_node=2, gpu_resource="nvidia.com/gpu", gpu_node_selector="none",
            gpu_toleration="nvidia.com/gpu:NoSchedule", namespace="team-a", keep="always", model=model,
            metrics=metrics,
        )  # fmt: skip
    finally:
        signal.signal(signal.SIGTERM, previous)
    shape = trainjob.TrainJobShape(1, 2, GpuPool.parse(None, None, "none", None), namespace="team-a", keep="always")
    assert server.created == [render(shape, run_key="run-uuid", checkpoint_root=f"{s3_env}/checkpoints")]
    assert len(server.jobs) == 1 and metrics.metadata["world_size"] == 2  # kept, as compiled
