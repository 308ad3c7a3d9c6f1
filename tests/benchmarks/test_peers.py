"""The peers table: medians over the rounds, ratios of medians, the in-process bound enforced, and the
reduced precisions (issue 20): a graph not measured says why, the targets follow the CPU's units."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import toptagger.precision.cpu as cpu
from benchmarks import common
from benchmarks.peers import CLIENTS, best_graph, markdown, servers, why_not
from serving.triton.repository import write_repository
from tests.quantized import copy_model
from toptagger.constants import MODEL_NAME
from toptagger.precision.files import ADMISSION_FILE, write_admission
from toptagger.precision.gate import admission_record

VNNI = {"int8": True, "bf16": True, "amx": False}
AMX = {"int8": True, "bf16": True, "amx": True}
NOT_ADMITTED = "not admitted: AUC loss +0.0017 vs torch fp32 > max_auc_loss 0.001"


def served(label: str, rows: list[float], single_p50: float) -> dict:
    n = len(rows)
    return {"label": label, "rows_per_s": rows, "p50_ms": [40.0] * n, "single_rows_per_s": [100.0] * n,
            "single_p50_ms": [single_p50] * n, "errors": 0}  # fmt: skip


def result(ours_16: list[float], in_process_16: list[float]) -> dict:
    """A result of before issue 20 (no precisions): it still renders."""
    return {
        "machine": "test CPU, 2 cores",
        "model_uri": "models:/top-tagger@champion",
        "fastest": "onnxruntime",
        "seconds": 6,
        "rounds": len(ours_16),
        "max_latency_ms": 20,
        "in_process": {
            "torch": {1: [40.0, 40.0, 40.0], CLIENTS: [240.0, 240.0, 240.0]},
            "onnxruntime": {1: [170.0, 170.0, 170.0], CLIENTS: in_process_16},
            "openvino": {1: [190.0, 190.0, 190.0], CLIENTS: [400.0, 400.0, 400.0]},
        },
        "served": [
            served("ours, torch", [200.0, 100.0, 210.0], 28.0),
            served("ours, onnxruntime", ours_16, 7.0),
            served("stock KServe, onnxruntime", [110.0, 110.0, 110.0], 8.0),
            served("Triton, onnxruntime, 2000 µs", [300.0, 300.0, 300.0], 9.0),
            served("Triton, onnxruntime, 20000 µs", [350.0, 360.0, 900.0], 28.0),
        ],
    }


def with_precisions(units: dict[str, bool], ours_best: list[float]) -> dict:
    """OpenVINO int8 admitted and fastest, bf16 measured, ONNX Runtime int8 refused by the gate."""
    data = result([360.0] * 3, [430.0] * 3)
    data["cpu"] = {"cpu": "test CPU", "isa": ["AVX-512", "VNNI"], "cores": 2}
    data["units"] = units
    data["best"] = "openvino/int8"
    data["in_process"]["openvino/bf16"] = {1: [300.0] * 3, CLIENTS: [1000.0, 1040.0, 1100.0]}
    data["in_process"]["openvino/int8"] = {1: [500.0] * 3, CLIENTS: [1900.0, 2000.0, 2100.0]}
    data["not_run"] = {"onnxruntime/bf16": "not run: onnxruntime has no bf16 kernels", "onnxruntime/int8": NOT_ADMITTED}
    data["served"] += [
        served("ours, openvino/int8", ours_best, 3.0),
        served("ours, openvino", [350.0] * 3, 7.0),
        served("stock KServe, openvino/int8", [400.0] * 3, 4.0),
        served("Triton, openvino/int8, 2000 µs", [1000.0] * 3, 5.0),
        served("Triton, openvino/int8, 20000 µs", [1400.0] * 3, 22.0),
    ]
    return data


def ratio_row(report: str, start: str) -> str:
    return next(line for line in report.splitlines() if line.startswith(f"| {start}"))


def test_cells_are_medians_with_the_rounds_spread() -> None:
    report = markdown(result([330.0, 400.0, 360.0], [430.0, 420.0, 440.0]))
    assert "| 360 [330–400] |" in report  # ours, onnxruntime: median, slowest and fastest round
    assert "| 430 [420–440] |" in report
    # Ratios of medians: 360 / 200 (ours on torch, one slow round of 100 does not count).
    assert "| 1.80× |" in ratio_row(report, "ours on onnxruntime / ours on torch")
    # The better Triton by median (360, not the 900 of one round) is the one compared.
    assert "20000 µs (the better Triton), 16 clients | 1.00× |" in report
    assert "| 0.84× in-process |" in ratio_row(report, "ours on onnxruntime, 16 clients")
    assert "| 0.25× |" in ratio_row(report, "p50 at 1 client, ours")


def test_a_ratio_above_the_in_process_bound_is_flagged_not_reported() -> None:
    report = markdown(result([500.0, 520.0, 510.0], [430.0, 420.0, 440.0]))
    assert "MEASUREMENT ERROR" in ratio_row(report, "ours on onnxruntime, 16 clients")


@pytest.mark.parametrize("rounds", [1, 3])
def test_the_table_reads_back_from_its_json(rounds: int) -> None:
    """peers.json round-trips (its batch keys become strings) and a one-round run still renders."""
    data = result([360.0] * rounds, [430.0] * 3)
    assert markdown(json.loads(json.dumps(data))) == markdown(data)
    data = with_precisions(AMX, [1800.0] * rounds)
    assert markdown(json.loads(json.dumps(data))) == markdown(data)


def test_precision_columns_are_measured_or_say_why() -> None:
    report = markdown(with_precisions(VNNI, [1800.0] * 3))
    header = ratio_row(report, "| in-process torch")
    assert "| in-process openvino/bf16 | in-process openvino/int8 | in-process onnxruntime/bf16 |" in header
    assert "| ours, openvino/int8 | ours, openvino | stock KServe, openvino/int8 |" in header
    batch_1, batch_16 = ratio_row(report, "batch 1 /"), ratio_row(report, f"batch {CLIENTS} /")
    assert f"| {NOT_ADMITTED} |" in batch_1 and "| not run: onnxruntime has no bf16 kernels |" in batch_1
    assert "| 2000 [1900–2100] |" in batch_16 and "not admitted" not in batch_16  # said once, in the first row
    assert "**openvino/int8**" in report
    assert "int8: VNNI, no AMX; bf16: AVX512-BF16, no AMX" in report


def test_precision_targets_follow_the_cpu_units() -> None:
    vnni, amx = markdown(with_precisions(VNNI, [1800.0] * 3)), markdown(with_precisions(AMX, [1800.0] * 3))
    # In-process at batch 16, same runtime: 2000 / 400 (OpenVINO int8 / fp32), 1040 / 400 (bf16).
    assert "| 5.00× | ≥ 2× (VNNI, no AMX) |" in ratio_row(vnni, "in-process at batch 16, openvino/int8")
    assert "| 5.00× | ≥ 4.5× (AMX) |" in ratio_row(amx, "in-process at batch 16, openvino/int8")
    assert "| 2.60× | ≥ 2.5× (AMX) |" in ratio_row(amx, "in-process at batch 16, openvino/bf16")
    assert "| — (a target with AMX only) |" in ratio_row(vnni, "in-process at batch 16, openvino/bf16")
    assert f"| {NOT_ADMITTED} | ≥ 2× (VNNI, no AMX) |" in ratio_row(vnni, "in-process at batch 16, onnxruntime/int8")
    assert "onnxruntime/bf16 /" not in vnni  # no such graph: no target
    # Ours on the best graph: 1800 / 350 (ours on OpenVINO fp32), 1800 / 2000 (in-process), the peers on it.
    assert "| 5.14× | ≥ 2× (no AMX) |" in ratio_row(vnni, "ours on openvino/int8 / ours on openvino fp32")
    assert "| 5.14× | ≥ 3× (AMX) |" in ratio_row(amx, "ours on openvino/int8 / ours on openvino fp32")
    assert "| 0.90× in-process | ≥ 0.85× |" in ratio_row(amx, "ours on openvino/int8, 16 clients")
    assert "20000 µs (the better Triton), 16 clients | 1.29× |" in ratio_row(amx, "ours on openvino/int8 / Triton")
    assert "| 4.50× | ≥ 3× (issue 12's, same graph) |" in ratio_row(amx, "ours on openvino/int8 / stock")
    flagged = markdown(with_precisions(AMX, [2400.0] * 3))
    assert "MEASUREMENT ERROR" in ratio_row(flagged, "ours on openvino/int8, 16 clients")


def test_the_best_graph_is_served_by_every_server_once() -> None:
    labels = [label for label, _ in servers("m", "onnxruntime", 16, 20, ("openvino", "int8"))]
    assert labels == [
        "ours, torch", "ours, onnxruntime", "stock KServe, onnxruntime", "Triton, onnxruntime, 2000 µs",
        "Triton, onnxruntime, 20000 µs", "ours, openvino/int8", "ours, openvino", "stock KServe, openvino/int8",
        "Triton, openvino/int8, 2000 µs", "Triton, openvino/int8, 20000 µs",
    ]  # fmt: skip
    # No graph faster than the fastest fp32 runtime: issue 12's servers, none twice.
    labels = [label for label, _ in servers("m", "openvino", 16, 20, ("openvino", "fp32"))]
    assert len(labels) == len(set(labels)) == 5


def test_the_best_graph_is_the_fastest_admitted_one_fp32_included() -> None:
    rates = with_precisions(VNNI, [1800.0] * 3)["in_process"]
    assert best_graph(rates, (("openvino", "bf16"), ("openvino", "int8"))) == ("openvino", "int8")
    assert best_graph(rates, (("openvino", "bf16"),)) == ("openvino", "bf16")
    assert best_graph(rates, ()) == ("onnxruntime", "fp32")  # 430 against OpenVINO's 400
    rates["torch"][CLIENTS] = [5000.0] * 3
    assert best_graph(rates, ()) == ("onnxruntime", "fp32")  # torch is no exported graph


@pytest.fixture
def gated_model(quantized_model_dir: Path, tmp_path: Path) -> Path:
    """The quantized fixture with the evaluate step's record: OpenVINO int8 and bf16 admitted, ONNX Runtime int8 not."""
    folder = copy_model(quantized_model_dir, tmp_path)
    measured = {"openvino/fp32": {"auc": 0.90}, "openvino/bf16": {"auc": 0.9001}, "openvino/int8": {"auc": 0.8995},
                "onnxruntime/fp32": {"auc": 0.90}, "onnxruntime/int8": {"auc": 0.8983}}  # fmt: skip
    write_admission(folder / ADMISSION_FILE, admission_record({"auc": 0.90}, measured, 0.001, "test"))
    return folder


def test_why_a_precision_is_not_measured(gated_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx512_vnni", "avx512_bf16"}))
    assert why_not(gated_model, "openvino", "int8") is None
    assert why_not(gated_model, "openvino", "bf16") is None
    assert why_not(gated_model, "onnxruntime", "int8") == NOT_ADMITTED
    assert why_not(gated_model, "onnxruntime", "bf16") == "not run: onnxruntime has no bf16 kernels"
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx2"}))
    assert why_not(gated_model, "openvino", "bf16") == "no bf16 units (AVX512-BF16/AMX)"
    assert why_not(gated_model, "onnxruntime", "int8") == "no int8 units (VNNI/AMX)"  # the CPU first
    (gated_model / ADMISSION_FILE).unlink()
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"amx_int8"}))
    assert "no precision.json" in str(why_not(gated_model, "openvino", "int8"))  # serving's own words


def test_triton_is_given_the_precision_and_fp32_stays_as_it_was(gated_model: Path, tmp_path: Path) -> None:
    config = write_repository(str(gated_model), tmp_path / "int8", "openvino", precision="int8") / MODEL_NAME
    assert 'key: "precision" value: { string_value: "int8" }' in (config / "config.pbtxt").read_text()
    config = write_repository(str(gated_model), tmp_path / "fp32", "openvino") / MODEL_NAME
    assert 'key: "precision"' not in (config / "config.pbtxt").read_text()  # the backend's default, as before


def test_the_machine_names_its_isa_flags_from_the_one_reader(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(common, "cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512_vnni", "amx_int8"}))
    info = common.machine_info()
    assert info["isa"] == ["AVX2", "AVX-512", "VNNI", "AMX-INT8"]
    assert common.machine() == f"{info['cpu']} (AVX2, AVX-512, VNNI, AMX-INT8), {info['cores']} cores"
