"""The GPU pool of the training pods: its defaults, parsing the ``--gpu-*`` options, and naming bad ones.

What the compiled pipeline then asks for: ``tests/pipelines/test_compile.py``.
"""

from __future__ import annotations

import argparse

import pytest

from toptagger.deploy.gpu_pool import GpuPool, Toleration, add_gpu_pool_arguments, gpu_pool_from
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


def test_the_options_read_back_into_the_pool() -> None:
    parser = argparse.ArgumentParser()
    add_gpu_pool_arguments(parser)
    args = parser.parse_args(["--gpu-resource", "amd.com/gpu", "--gpu-count", "2", "--gpu-toleration", "none"])
    assert gpu_pool_from(args) == GpuPool.parse("amd.com/gpu", 2, None, "none")
    assert gpu_pool_from(parser.parse_args([])) == GpuPool()
    single = argparse.ArgumentParser()
    add_gpu_pool_arguments(single, count=False)  # a TrainJob's nodes take --gpus-per-node instead
    assert "--gpu-count" not in single.format_help()
    assert gpu_pool_from(single.parse_args(["--gpu-node-selector", "pool=h100"])).node_selector == ("pool", "h100")
