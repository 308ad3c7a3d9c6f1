"""The train task's GPU pool: parsing the compile options, and what the compiled spec then asks for."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipelines import compile as compile_module
from pipelines.gpu_pool import GpuPool, Toleration
from toptagger.errors import ConfigError


def test_defaults_are_nvidias_and_parse_keeps_what_is_not_given() -> None:
    assert GpuPool.parse() == GpuPool()
    pool = GpuPool.parse(toleration="dedicated=gpu:NoExecute")
    assert pool.resource == "nvidia.com/gpu" and pool.node_selector == ("nvidia.com/gpu.present", "true")
    assert pool.toleration == Toleration("dedicated", "NoExecute", "gpu")
    assert pool.toleration.as_kfp() == {"key": "dedicated", "operator": "Equal", "value": "gpu", "effect": "NoExecute"}
    assert GpuPool.parse(toleration="example.com/gpu").toleration.as_kfp() == {
        "key": "example.com/gpu",
        "operator": "Exists",
        "effect": "NoSchedule",
    }
    assert GpuPool.parse(node_selector="none", toleration="None").node_selector is None
    assert GpuPool.parse(node_selector="none", toleration="None").toleration is None


@pytest.mark.parametrize(
    ("option", "text", "message"),
    [
        ("resource", "gpu", "not an extended resource name"),
        ("resource", "nvidia.com/", "not an extended resource name"),
        ("node_selector", "nvidia.com/gpu.present", "not KEY=VALUE"),
        ("node_selector", "a b=c", "not KEY=VALUE"),
        ("node_selector", "pool=" + "x" * 64, "not KEY=VALUE"),
        ("toleration", "dedicated=gpu:Sometimes", "EFFECT one of NoSchedule"),
        ("toleration", "=gpu", "not KEY"),
    ],
)
def test_bad_options_name_the_problem(option: str, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        GpuPool.parse(**{option: text})
    with pytest.raises(ConfigError, match="--gpu-count must be at least 1"):
        GpuPool.parse(count=0)


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
