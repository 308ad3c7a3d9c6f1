"""A local deploy serves what the cpu overlay serves where the version carries the graphs (toptagger.deploy.local)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.quantized import copy_model
from toptagger.cli import run_cli
from toptagger.deploy import local
from toptagger.deploy.local import CPU_OVERLAY, local_serving
from toptagger.precision.files import ADMISSION_FILE, write_admission
from toptagger.precision.gate import admission_record

REPO = Path(__file__).resolve().parents[2]


def test_the_local_default_is_the_cpu_overlays_environment() -> None:
    patch = yaml.safe_load((REPO / "manifests" / "overlays" / "cpu" / "runtime.yaml").read_text())
    env = {op["value"]["name"]: op["value"]["value"] for op in patch if op["path"].endswith("/env/-")}
    assert {name: env[name] for name in CPU_OVERLAY} == CPU_OVERLAY


def test_a_version_with_the_graphs_is_served_as_the_cpu_overlay_serves_it(onnx_model_dir: Path) -> None:
    serving = local_serving(onnx_model_dir, env={})
    assert serving.args() == ["--backend", "auto", "--precision", "auto", "--fallback", "torch"]
    assert "openvino/fp32" in serving.reason and f"no {ADMISSION_FILE}" in serving.reason


def test_the_reason_names_what_the_evaluate_step_admitted(quantized_model_dir: Path, tmp_path: Path) -> None:
    folder = copy_model(quantized_model_dir, tmp_path)
    measured = {"openvino/int8": {"auc": 0.8995}, "onnxruntime/int8": {"auc": 0.85}}
    write_admission(folder / ADMISSION_FILE, admission_record({"auc": 0.90}, measured, 0.001, "test"))
    serving = local_serving(folder, env={})
    assert (serving.backend, serving.precision) == ("auto", "auto")
    assert "openvino/int8" in serving.reason and "admitted by the evaluate step: openvino/int8)" in serving.reason


def test_a_version_without_the_graph_falls_back_to_torch_and_says_why(model_dir: Path) -> None:
    serving = local_serving(model_dir, env={})
    assert serving.args() == ["--backend", "torch", "--precision", "fp32"]
    assert "carries no model.onnx" in serving.reason and "python -m toptagger.onnx_export" in serving.reason


def test_flags_and_environment_override_the_default(onnx_model_dir: Path) -> None:
    assert local_serving(onnx_model_dir, "torch", env={}).args() == ["--backend", "torch", "--precision", "fp32"]
    assert local_serving(onnx_model_dir, "openvino", env={}).precision == "auto"  # its fastest admitted
    assert local_serving(onnx_model_dir, precision="int8", env={}).args()[:2] == ["--backend", "auto"]
    from_env = local_serving(onnx_model_dir, env={"BACKEND": "torch", "PRECISION": "bf16"})
    assert (from_env.backend, from_env.precision, from_env.reason) == ("torch", "bf16", "as asked for")
    assert local_serving(onnx_model_dir, "onnxruntime", "fp32", env={"BACKEND": "torch"}).backend == "onnxruntime"


def test_the_cli_prints_the_flags_and_says_why(
    model_dir: Path, onnx_model_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in CPU_OVERLAY:
        monkeypatch.delenv(name, raising=False)
    assert run_cli(local.main, [str(model_dir)]) == 0
    out, err = capsys.readouterr()
    assert out.split() == ["--backend", "torch", "--precision", "fp32"]
    assert "carries no model.onnx" in err
    assert run_cli(local.main, ["--env", str(onnx_model_dir)]) == 0  # what make demo evals
    assert capsys.readouterr().out == "export BACKEND=auto PRECISION=auto FALLBACK=torch\n"


@pytest.mark.slow
def test_local_mode_serves_auto_and_the_server_says_what_it_picked(
    onnx_model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import httpx

    from components import deploy
    from serving.process import free_port

    for name in CPU_OVERLAY:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("METRICS_PORT", str(free_port()))  # Triton's 8002 may be another server's here
    seen: dict = {}

    def look_then_stop(predictor: object) -> int:
        seen["metadata"] = httpx.get(f"{predictor.url}/v2", timeout=30).json()  # type: ignore[attr-defined]
        predictor.stop()  # type: ignore[attr-defined]
        return 0

    monkeypatch.setattr(deploy, "_serve_until_interrupted", look_then_stop)
    ports = ["--http-port", str(free_port()), "--grpc-port", str(free_port())]
    assert run_cli(deploy.main, ["local", "--model-uri", str(onnx_model_dir), *ports]) == 0
    assert (
        "serving with --backend auto --precision auto --fallback torch: as the cpu overlay" in capsys.readouterr().out
    )
    _, backend, precision = seen["metadata"]["extensions"]
    assert backend in ("backend:openvino", "backend:onnxruntime") and precision == "precision:fp32"
