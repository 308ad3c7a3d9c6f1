"""``--precision`` on the exported-graph backends: refused by name unless carried and admitted; ``auto``."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest

from serving import precision as serving_precision
from serving.backends import load_backend
from tests.predictor import start_server, stop_server
from tests.quantized import copy_model
from toptagger.errors import ConfigError
from toptagger.jets.dataset import JetBatch
from toptagger.precision.cpu import has_units
from toptagger.precision.files import ADMISSION_FILE, write_admission
from toptagger.precision.gate import admission_record

# What the evaluate step would have measured: OpenVINO int8 and bf16 within the gate, ONNX
# Runtime's int8 graph beyond it.
MEASURED = {
    "openvino/fp32": {"auc": 0.90},
    "openvino/bf16": {"auc": 0.9001},
    "openvino/int8": {"auc": 0.8995},
    "onnxruntime/fp32": {"auc": 0.90},
    "onnxruntime/int8": {"auc": 0.85},
}


@pytest.fixture(scope="module")
def admitted_model(quantized_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = copy_model(quantized_model_dir, tmp_path_factory.mktemp("admitted"))
    write_admission(folder / ADMISSION_FILE, admission_record({"auc": 0.90}, MEASURED, 0.001, "test"))
    return folder


@pytest.fixture
def quick_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(serving_precision, "MEASURE_SECONDS", 0.2)  # the shared cores: a short measurement


def test_a_precision_not_carried_is_refused_by_name(onnx_model_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"precision int8 is not carried by this version: no quantized/openvino_int8"):
        load_backend(str(onnx_model_dir), "openvino", precision="int8")


def test_a_precision_without_admission_record_is_refused(quantized_model_dir: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"precision int8 is not admitted for this version \(it has no precision\.json"
    ):
        load_backend(str(quantized_model_dir), "onnxruntime", precision="int8")


def test_a_precision_the_gate_refused_is_refused_with_the_gates_reason(admitted_model: Path) -> None:
    with pytest.raises(ConfigError, match=r"int8 on onnxruntime was not admitted .*AUC loss \+0.0500"):
        load_backend(str(admitted_model), "onnxruntime", precision="int8")
    with pytest.raises(ConfigError, match=r"the onnxruntime backend runs fp32, int8 .* not .bf16."):
        load_backend(str(admitted_model), "onnxruntime", precision="bf16")


@pytest.mark.skipif(not has_units("int8"), reason="this CPU has no int8 units (VNNI/AMX)")
def test_an_admitted_precision_serves(admitted_model: Path, small_jets: JetBatch) -> None:
    backend = load_backend(str(admitted_model), "openvino", precision="int8")
    assert (backend.kind, backend.precision) == ("openvino", "int8")
    assert "openvino/int8 (asked for)" in backend.description
    probabilities = backend.predict(backend.render(small_jets.constituents[:4]))
    assert probabilities.shape == (4, 2) and np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)


def test_auto_picks_an_admitted_precision_and_says_so(admitted_model: Path, quick_auto: None) -> None:
    backend = load_backend(str(admitted_model), "auto", precision="auto")
    allowed = {("openvino", "fp32"), ("onnxruntime", "fp32")}
    allowed |= {("openvino", p) for p in ("int8", "bf16") if has_units(p)}
    assert (backend.kind, backend.precision) in allowed
    assert f"{backend.kind}/{backend.precision} (auto, fastest in img/s" in backend.description
    assert "onnxruntime/int8" not in backend.selection  # refused by the gate: never measured


def test_model_config_names_the_precision_auto_picked(admitted_model: Path, quick_auto: None) -> None:
    from serving.predictor import TopTagger
    from serving.triton.extensions import model_config

    tagger = TopTagger(str(admitted_model), backend="auto", precision="auto")
    tagger.load()
    try:
        parameters = model_config(tagger).parameters
        assert parameters["precision"].string_value == tagger.backend.precision
        assert "(auto, fastest in img/s" in parameters["selection"].string_value
    finally:
        tagger.stop()


def test_auto_on_a_version_without_quantized_graphs_serves_fp32(onnx_model_dir: Path, quick_auto: None) -> None:
    backend = load_backend(str(onnx_model_dir), "openvino", precision="auto")
    assert (backend.kind, backend.precision) == ("openvino", "fp32")


def test_the_server_is_not_ready_with_the_refusal(onnx_model_dir: Path) -> None:
    server = start_server(onnx_model_dir, "--backend", "openvino", "--precision", "int8", wait_ready=False)
    try:
        ready = httpx.get(f"{server.url}/v2/health/ready")
        assert ready.status_code == 503, ready.text
        assert "precision int8 is not carried by this version" in ready.json()["reason"]
    finally:
        stop_server(server)
