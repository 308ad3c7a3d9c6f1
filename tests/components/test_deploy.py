"""python -m components.deploy: the CLI over rendering, the cluster path and local mode."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from components import deploy
from toptagger.cli import run_cli
from toptagger.deploy import kserve
from toptagger.deploy.k8s_models import to_dict

REPO = Path(__file__).resolve().parents[2]
URI = "s3://mlflow/3/models/m-0123456789abcdef/artifacts"
needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")


@needs_kubectl
def test_render_sets_namespace_and_cli_prints_the_same_yaml(capsys: pytest.CaptureFixture[str]) -> None:
    assert kserve.render(URI, "cpu", namespace="team-a").metadata.namespace == "team-a"
    assert run_cli(deploy.main, ["render", "--model-uri", URI, "--overlay", "fpga"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == to_dict(kserve.render(URI, "fpga"))


def test_cluster_mode_refuses_local_paths(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(deploy.main, ["cluster", "--model-uri", "/home/me/model"]) == 2
    assert "a cluster cannot read this machine's files" in capsys.readouterr().err


def test_cli_help_runs_as_a_module() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "components.deploy", "cluster", "--help"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "--overlay" in result.stdout and "--timeout" in result.stdout
