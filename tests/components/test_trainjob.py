"""The TrainJob launcher component: stages the jets, runs the rendered TrainJob, fills the model as the train step.

Real parts: the ``kubernetes`` client over HTTP, S3 on loopback (moto), and in the slow test the
real trainer command of the rendered job (``torchrun -m toptagger.training``), run by ``torchrun``
with the ``PET_*`` variables the Trainer's torch plugin injects. The one stand-in is the fake
Trainer API (``tests/toptagger/deploy/fake_trainer.py``, started by the ``trainer_api`` fixture).
The TrainJob itself (CRD schema, CLI, runner): ``tests/toptagger/deploy/test_trainjob.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from kfp import dsl

from components import train as train_component
from components import trainjob as launcher
from tests.components.artifacts import artifact
from tests.toptagger.deploy.fake_trainer import CONFIG, IMAGE, SHAPE, kube_client, kubeconfig, render, scripted
from toptagger import storage
from toptagger.deploy.gpu_pool import GpuPool
from toptagger.deploy.trainjob import render as trainjob
from toptagger.errors import ConfigError
from toptagger.training.__main__ import build_parser as trainer_parser

REPO = Path(__file__).resolve().parents[2]


def fake_export(uri: str, folder: Path, world_size: int) -> dict[str, Any]:
    """What rank 0 uploads (toptagger.training.export.export_to): a model folder and summary.json."""
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
    trainer_api: Callable, s3_env: str, tmp_path: Path
) -> None:
    root = f"{s3_env}/checkpoints"
    exported: dict[str, Any] = {}

    def finish(job: dict[str, Any]) -> None:  # the trainer's rank 0, at the end of the job
        args = trainer_parser().parse_args(job["spec"]["trainer"]["args"])
        assert storage.exists(args.data)  # the launcher staged the jets before creating the job
        exported.update(fake_export(args.export_to, tmp_path / "export", 8))

    server = trainer_api(scripted(finish))
    fit = tmp_path / "fit_jets"
    fit.write_bytes(b"compact jets")
    fit_jets = artifact(dsl.Dataset, fit)
    model, metrics = artifact(dsl.Model, tmp_path / "out" / "model"), artifact(dsl.Metrics, tmp_path / "out" / "m")
    summary = launcher.trainjob_step(fit_jets, model, metrics, CONFIG, root, "run-7", SHAPE, IMAGE,
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
        launcher.trainjob_step(fit_jets, model, metrics, CONFIG, "/tmp/ck", "run-7", SHAPE, IMAGE, client=object())


def test_the_launcher_component_takes_the_train_components_parameters() -> None:
    import inspect

    train = inspect.signature(train_component.train).parameters
    launch = inspect.signature(launcher.trainjob).parameters
    shared = {name: p.annotation for name, p in train.items()}
    assert {name: launch[name].annotation for name in shared} == shared
    assert set(launch) - set(train) == {"image", "nodes", "gpus_per_node", "gpu_resource", "gpu_node_selector",
                                        "gpu_toleration", "namespace", "keep"}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The rendered command itself: the real trainer under torchrun, as a TrainJob's node would run it


@pytest.mark.slow
def test_the_rendered_trainer_command_trains_under_torchrun_and_the_launcher_takes_its_model(
    trainer_api: Callable, s3_env: str, tiny_file: Path, tmp_path: Path
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

    server = trainer_api(scripted(finish))
    fit = tmp_path / "fit_jets.npz"
    save_jets(fit, read_jets(tiny_file))
    model, metrics = artifact(dsl.Model, tmp_path / "out" / "model"), artifact(dsl.Metrics, tmp_path / "out" / "m")
    launcher.trainjob_step(artifact(dsl.Dataset, fit), model, metrics, CONFIG, root, "e2e", shape, IMAGE,
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
    trainer_api: Callable, s3_env: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The KFP component function itself: its parameters become the config, the pool and the shape."""
    import signal

    def finish(job: dict[str, Any]) -> None:
        args = trainer_parser().parse_args(job["spec"]["trainer"]["args"])
        fake_export(args.export_to, tmp_path / "export", 2)

    server = trainer_api(scripted(finish))
    config_file = tmp_path / "kubeconfig"
    config_file.write_text(yaml.safe_dump(kubeconfig(server)))
    monkeypatch.setenv("KUBECONFIG", str(config_file))
    monkeypatch.setattr("toptagger.deploy.trainjob.run.time.sleep", lambda seconds: None)  # the 10 s polls
    previous = signal.getsignal(signal.SIGTERM)
    fit = tmp_path / "fit_jets"
    fit.write_bytes(b"compact jets")
    model, metrics = artifact(dsl.Model, tmp_path / "model"), artifact(dsl.Metrics, tmp_path / "metrics")
    try:
        launcher.trainjob(
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
