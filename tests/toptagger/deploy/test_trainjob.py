"""The TrainJob of the train step: rendered (against the Trainer v2.3.0 CRD), its CLI, and run against a fake API.

Real parts: the v2.3.0 TrainJob CRD's own schema (``../shared/schemas``), the ``kubernetes``
client over HTTP, and the trainer's own parser reading the rendered arguments back. The one
stand-in is ``FakeTrainerAPI`` (``tests/toptagger/deploy/fake_trainer.py``): a loopback server
speaking the TrainJob custom-objects endpoints, the pods list and the pod log endpoints, with a
scripted controller. The launcher component that uses all this: ``tests/components/test_trainjob.py``.
"""

from __future__ import annotations

import copy
import dataclasses
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.toptagger.deploy.fake_trainer import (
    CONFIG,
    CORE_PREFIX,
    IMAGE,
    POOL,
    ROOT,
    SHAPE,
    TJ_PREFIX,
    kube_client,
    render,
    scripted,
)
from toptagger.cli import run_cli
from toptagger.deploy.gpu_pool import GpuPool, Toleration
from toptagger.deploy.trainjob import __main__ as cli
from toptagger.deploy.trainjob import render as trainjob
from toptagger.deploy.trainjob.run import TrainJobFailed, run_trainjob
from toptagger.errors import ConfigError
from toptagger.training.__main__ import build_parser as trainer_parser
from toptagger.training.config import TrainConfig, from_arguments, to_arguments

REPO = Path(__file__).resolve().parents[3]
CRD = REPO.parent / "shared" / "schemas" / "trainer-v2.3.0-crd-trainjobs.yaml"


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
    assert trainer["command"] == ["torchrun", "-m", "toptagger.training"]
    # The trainer's own parser reads the arguments back into the same job and the same config.
    args = trainer_parser().parse_args(trainer["args"])
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
    assert run_cli(cli.main, argv) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    config = dataclasses.replace(TrainConfig(), epochs=3)
    shape = trainjob.TrainJobShape(2, 4, GpuPool.parse(None, None, "pool=h100", None))
    expected = trainjob.render(shape, IMAGE, run_key="manual", checkpoint_root="s3://top-tagger/checkpoints",
                               config_args=to_arguments(config), namespace="team-a")  # fmt: skip
    assert printed == expected and printed["metadata"]["namespace"] == "team-a"
    assert run_cli(cli.main, ["render", "--nodes", "1", "--gpus-per-node", "1", "--image", IMAGE,
                                   "--gpu-toleration", "bad key"]) == 2  # fmt: skip
    assert "--gpu-toleration 'bad key' is not KEY[=VALUE][:EFFECT]" in capsys.readouterr().err


def test_cli_help_runs_as_a_module() -> None:
    result = subprocess.run([sys.executable, "-m", "toptagger.deploy.trainjob", "render", "--help"], cwd=REPO,
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr
    for flag in ("--nodes", "--gpus-per-node", "--image", "--namespace", "--gpu-toleration", "--epochs"):
        assert flag in result.stdout, flag


# ---------------------------------------------------------------------------------------------
# The runner against a fake API server (see the module docstring)


def test_run_trainjob_reports_as_it_goes_and_deletes_a_completed_job(trainer_api: Callable) -> None:
    server = trainer_api(scripted())
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


def test_a_failed_trainjob_fails_with_its_own_reason_and_is_kept_or_deleted(trainer_api: Callable) -> None:
    server = trainer_api(scripted(fail=True))
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


def test_a_retry_follows_the_running_job_and_keep_always_keeps_it(trainer_api: Callable) -> None:
    server = trainer_api(scripted())
    manifest = render(SHAPE)
    client = kube_client(server)
    server.jobs[("kubeflow", manifest["metadata"]["name"])] = copy.deepcopy(manifest)  # an earlier attempt's
    said: list[str] = []
    run_trainjob(manifest, client, keep="always", poll_s=0.01, emit=said.append)
    assert server.created == [] and "exists (an earlier attempt created it): following it" in said[0]
    assert len(server.jobs) == 1 and said[-1].startswith("kept TrainJob")


def test_a_stopped_launcher_deletes_its_job_unless_kept(trainer_api: Callable) -> None:
    for keep, left in (("on-failure", 0), ("always", 1)):
        server = trainer_api(scripted())

        def stop_when_running(line: str) -> None:
            if "epoch 1/1" in line:  # SIGTERM of a terminated run, as the component maps it
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            run_trainjob(render(SHAPE), kube_client(server), keep=keep, poll_s=0.01, emit=stop_when_running)
        assert len(server.jobs) == left, keep


def test_missing_rbac_is_named(trainer_api: Callable) -> None:
    server = trainer_api(scripted())
    server.forbidden = True
    with pytest.raises(TrainJobFailed, match=r"not allowed \(403\); bind the top-tagger-trainer Role"):
        run_trainjob(render(SHAPE), kube_client(server), poll_s=0.01, emit=lambda line: None)
