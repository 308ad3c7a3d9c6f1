"""The compiled pipeline: committed YAML is fresh, its structure, and the containerized components' entry."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipelines import compile as compile_module
from pipelines import top_tagging
from toptagger.deploy.gpu_pool import GpuPool
from toptagger.deploy.trainjob.render import TrainJobShape
from toptagger.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
COMMITTED = REPO / "manifests" / "pipelines" / "top_tagging.yaml"
# The component functions and their files (the data module holds the generation's fan-out too).
STEPS = ["plan_shards", "generate_shard", "data", "preprocess", "train", "trainjob", "quantize", "evaluate",
         "register", "deploy"]  # fmt: skip
SINGLE_POD = [s for s in STEPS if s != "trainjob"]  # trainjob replaces train in the TrainJob form
FILES = {step: f"components/{step}.py" for step in STEPS} | {
    "plan_shards": "components/data.py",
    "generate_shard": "components/data.py",
}


@pytest.fixture(scope="module")
def compiled() -> tuple[dict[str, Any], dict[str, Any]]:
    spec, platform = yaml.safe_load_all(compile_module.compile_yaml())
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def test_committed_files_equal_a_fresh_compile() -> None:
    assert COMMITTED.read_text() == compile_module.compile_yaml(), "run: python -m pipelines.compile"
    assert compile_module.KFP_CONFIG.read_text() == compile_module.kfp_config(), "run: python -m pipelines.compile"


def test_check_flag_fails_on_a_stale_file(tmp_path: Path) -> None:
    stale = tmp_path / "top_tagging.yaml"
    stale.write_text(COMMITTED.read_text().replace("top-tagging", "top-tagging-old", 1))
    assert compile_module.main(["--check", "--out", str(stale)]) == 1
    assert compile_module.main(["--check"]) == 0


def test_parameters_have_defaults_and_descriptions(compiled: tuple[dict[str, Any], dict[str, Any]]) -> None:
    spec, _ = compiled
    params = spec["root"]["inputDefinitions"]["parameters"]
    expected = {
        "dataset_uri": "", "n_signal": 3000, "n_background": 3000, "image_size": 40, "epochs": 5,
        "batch_size": 32, "learning_rate": 0.001, "seed": 1, "base_model_uri": "",
        "mlflow_experiment": "top-tagging", "model_name": "top-tagger", "deploy_target": "none",
        "max_auc_loss": 0.001, "calibration_jets": 300, "quantize_validation_jets": 500,
    }  # fmt: skip
    for name, default in expected.items():
        assert params[name]["defaultValue"] == default, name
    assert [name for name, p in params.items() if not p.get("description")] == []
    assert "Pythia8" in params["dataset_uri"]["description"]
    assert spec["pipelineInfo"]["name"] == "top-tagging"


def test_components_are_containerized_on_the_components_image(compiled: tuple[dict[str, Any], dict[str, Any]]) -> None:
    spec, _ = compiled
    executors = spec["deploymentSpec"]["executors"]
    assert sorted(executors) == sorted(f"exec-{s.replace('_', '-')}" for s in SINGLE_POD)
    for name, executor in executors.items():
        container = executor["container"]
        assert container["image"] == top_tagging.COMPONENTS_IMAGE, name
        assert container["command"] == ["python3", "-m", "kfp.dsl.executor_main"], name
        assert container["args"][-2:] == ["--function_to_execute", name.removeprefix("exec-").replace("-", "_")]
        assert "pip install" not in json.dumps(container), name  # everything is in the image


def test_training_asks_for_the_gpu_pool(compiled: tuple[dict[str, Any], dict[str, Any]]) -> None:
    spec, k8s = compiled
    resources = spec["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"]
    assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert resources["accelerator"]["resourceCount"] == "1"
    assert k8s["exec-train"]["nodeSelector"] == {"labels": {"nvidia.com/gpu.present": "true"}}
    assert k8s["exec-train"]["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    others = ("exec-plan-shards", "exec-generate-shard", "exec-data", "exec-preprocess", "exec-quantize",
              "exec-evaluate", "exec-register", "exec-deploy")  # fmt: skip
    for other in others:
        assert "accelerator" not in spec["deploymentSpec"]["executors"][other]["container"].get("resources", {})
        assert "nodeSelector" not in k8s.get(other, {}) and "tolerations" not in k8s.get(other, {})


def test_credentials_come_from_secrets_as_env(compiled: tuple[dict[str, Any], dict[str, Any]]) -> None:
    spec, k8s = compiled

    def secret_env(executor: str) -> dict[str, tuple[str, bool]]:
        return {
            item["envVar"]: (secret["secretNameParameter"]["runtimeValue"]["constant"], bool(secret.get("optional")))
            for secret in k8s.get(executor, {}).get("secretAsEnv", [])
            for item in secret["keyToEnv"]
        }

    for executor in ("exec-data", "exec-train", "exec-register", "exec-deploy"):
        env = secret_env(executor)
        assert env["AWS_ACCESS_KEY_ID"] == (top_tagging.S3_SECRET, False), executor
        assert env["AWS_SECRET_ACCESS_KEY"] == (top_tagging.S3_SECRET, False), executor
        assert env["MLFLOW_S3_ENDPOINT_URL"] == (top_tagging.S3_SECRET, True), executor
    for executor in ("exec-train", "exec-register", "exec-deploy"):
        env = secret_env(executor)
        assert env["MLFLOW_TRACKING_URI"] == (top_tagging.MLFLOW_SECRET, False), executor
        assert env["MLFLOW_TRACKING_PASSWORD"] == (top_tagging.MLFLOW_SECRET, True), executor
    # Never a literal: no container sets these variables itself.
    for executor in spec["deploymentSpec"]["executors"].values():
        literal = {e["name"] for e in executor["container"].get("env", [])}
        assert not literal & {"AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "MLFLOW_TRACKING_PASSWORD"}


def test_only_the_data_steps_are_cached_and_retries_are_set(compiled: tuple[dict[str, Any], dict[str, Any]]) -> None:
    spec, _ = compiled
    dag = spec["root"]["dag"]["tasks"]
    cached = {name: task.get("cachingOptions", {}).get("enableCache", False) for name, task in dag.items()}
    assert cached == {"plan-shards": True, "for-loop-1": False, "data": True, "preprocess": True, "train": False,
                      "quantize": False, "evaluate": False, "register": False, "deploy": False}  # fmt: skip
    # The loop's tasks (the shards' generation) are cached as well: same seed, same jets.
    (loop,) = [name for name, task in dag.items() if "parameterIterator" in task]
    inner = spec["components"][dag[loop]["componentRef"]["name"]]["dag"]["tasks"]
    assert {name: task["cachingOptions"]["enableCache"] for name, task in inner.items()} == {"generate-shard": True}
    assert dag["train"]["retryPolicy"]["maxRetryCount"] == 2
    assert dag["register"]["retryPolicy"]["maxRetryCount"] == 2
    # The run key defaults to the pipeline run's own id.
    for step in ("train", "register"):
        value = dag[step]["inputs"]["parameters"]["pipeline_run_id"]["runtimeValue"]["constant"]
        assert value == "{{$.pipeline_job_uuid}}"


def test_the_components_run_containerized_as_in_the_image(tmp_path: Path) -> None:
    """KFP's executor in containerized mode, in a folder laid out like the image's /app."""
    app = tmp_path / "app"
    app.mkdir()
    from tests.serving.test_image import copied_paths

    for package in copied_paths(REPO / "components" / "Dockerfile"):  # the folders it copies
        if "/" not in package:
            (app / package).symlink_to(REPO / package)
    shutil.copyfile(compile_module.KFP_CONFIG, app / "kfp_config.ini")  # components/Dockerfile does this copy
    out = tmp_path / "out"
    executor_input = {
        "inputs": {"parameterValues": {"target": "none", "model_name": "top-tagger", "overlay": "cpu",
                                       "namespace": "", "http_port": 8080, "grpc_port": 8081, "version": "3"}},
        "outputs": {"parameters": {"url": {"outputFile": str(out / "url")},
                                   "details": {"outputFile": str(out / "details")}},
                    "outputFile": str(out / "executor_output.json")},
    }  # fmt: skip
    spec = yaml.safe_load(COMMITTED.read_text().split("\n---\n")[0])
    container = spec["deploymentSpec"]["executors"]["exec-deploy"]["container"]
    args = [json.dumps(executor_input) if a == "{{$}}" else a for a in container["args"]]
    command = [sys.executable if part == "python3" else part for part in container["command"]]
    env = {**os.environ, "PYTHONPATH": str(app)}
    result = subprocess.run(command + args, cwd=app, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    written = json.loads((out / "executor_output.json").read_text())["parameterValues"]
    assert json.loads(written["details"]) == {"target": "none", "url": "", "model_uri": ""}


def test_every_kfp_config_entry_names_a_component_function() -> None:
    import configparser

    config = configparser.ConfigParser()
    config.optionxform = str
    config.read(compile_module.KFP_CONFIG)
    assert dict(config["Components"]) == FILES
    assert [s.__name__ for s in top_tagging.STEPS] == STEPS


# ---------------------------------------------------------------------------------------------
# The TrainJob form (python -m pipelines.compile --trainjob)

TRAINJOB_2X4 = REPO / "manifests" / "pipelines" / "top_tagging_trainjob_2x4.yaml"


@pytest.fixture(scope="module")
def trainjob_compiled() -> tuple[dict[str, Any], dict[str, Any]]:
    spec, platform = yaml.safe_load_all(TRAINJOB_2X4.read_text())
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def test_the_committed_trainjob_pipeline_equals_a_fresh_compile() -> None:
    shape = TrainJobShape(nodes=2, gpus_per_node=4)
    assert compile_module.trainjob_out(shape) == TRAINJOB_2X4
    fresh = compile_module.compile_yaml(trainjob=shape)
    assert TRAINJOB_2X4.read_text() == fresh, "run: python -m pipelines.compile --trainjob --nodes 2 --gpus-per-node 4"
    assert compile_module.main(["--trainjob", "--nodes", "2", "--gpus-per-node", "4", "--check"]) == 0


def test_the_trainjob_launcher_replaces_the_train_task(
    trainjob_compiled: tuple[dict[str, Any], dict[str, Any]],
) -> None:
    spec, k8s = trainjob_compiled
    dag = spec["root"]["dag"]["tasks"]
    assert "train" not in dag and "trainjob" in dag
    launcher = dag["trainjob"]
    constants = {name: value["runtimeValue"]["constant"] for name, value in launcher["inputs"]["parameters"].items()
                 if "runtimeValue" in value}  # fmt: skip
    assert constants == {"nodes": 2, "gpus_per_node": 4, "image": top_tagging.COMPONENTS_IMAGE, "namespace": "",
                         "keep": "on-failure", "gpu_resource": "nvidia.com/gpu",
                         "gpu_node_selector": "nvidia.com/gpu.present=true",
                         "gpu_toleration": "nvidia.com/gpu:NoSchedule",
                         "pipeline_run_id": "{{$.pipeline_job_uuid}}"}  # fmt: skip
    assert launcher["retryPolicy"]["maxRetryCount"] == 2 and not launcher.get("cachingOptions", {}).get("enableCache")
    # The evaluate and register steps take the launcher's model, as they take the train step's.
    for step in ("evaluate", "register"):
        assert dag[step]["inputs"]["artifacts"]["model"]["taskOutputArtifact"]["producerTask"] == "trainjob"
    # The launcher waits; the TrainJob's nodes hold the GPUs (its runtime patch, not the launcher pod).
    executor = spec["deploymentSpec"]["executors"]["exec-trainjob"]["container"]
    assert "accelerator" not in executor.get("resources", {})
    assert "nodeSelector" not in k8s["exec-trainjob"] and "tolerations" not in k8s["exec-trainjob"]
    env = {item["envVar"] for secret in k8s["exec-trainjob"]["secretAsEnv"] for item in secret["keyToEnv"]}
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"} <= env
    assert executor["args"][-2:] == ["--function_to_execute", "trainjob"]


def test_compile_help_and_trainjob_options_are_checked(capsys: pytest.CaptureFixture[str]) -> None:
    from toptagger.cli import run_cli

    result = subprocess.run([sys.executable, "-m", "pipelines.compile", "--help"], cwd=REPO, capture_output=True,
                            text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr
    for flag in ("--trainjob", "--nodes", "--gpus-per-node", "--trainjob-namespace", "--keep-trainjob"):
        assert flag in result.stdout, flag
    assert run_cli(compile_module.main, ["--trainjob", "--gpu-count", "2", "--check"]) == 2
    assert "a TrainJob takes --gpus-per-node" in capsys.readouterr().err
    assert run_cli(compile_module.main, ["--nodes", "2", "--check"]) == 2
    assert "need --trainjob" in capsys.readouterr().err


def test_compiled_train_task_asks_for_the_given_pool() -> None:
    pool = GpuPool.parse("amd.com/gpu", 2, "cloud.google.com/gke-nodepool=gpu-pool", "dedicated=gpu:NoSchedule")
    spec, platform = yaml.safe_load_all(compile_module.compile_yaml(gpu_pool=pool))
    resources = spec["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"]
    assert resources["accelerator"]["resourceType"] == "amd.com/gpu"
    assert resources["accelerator"]["resourceCount"] == "2"
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-train"]
    assert k8s["nodeSelector"] == {"labels": {"cloud.google.com/gke-nodepool": "gpu-pool"}}
    assert k8s["tolerations"] == [{"key": "dedicated", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}]

    bare = GpuPool.parse(node_selector="none", toleration="none")
    spec, platform = yaml.safe_load_all(compile_module.compile_yaml(gpu_pool=bare))
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-train"]
    assert "nodeSelector" not in k8s and "tolerations" not in k8s
    assert spec["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"]["accelerator"]


def test_compile_cli_rejects_a_bad_pool_before_writing(tmp_path: Path) -> None:
    out = tmp_path / "pipeline.yaml"
    with pytest.raises(ConfigError, match="--gpu-node-selector"):
        compile_module.main(["--out", str(out), "--gpu-node-selector", "no-equals-sign"])
    assert not out.exists()
