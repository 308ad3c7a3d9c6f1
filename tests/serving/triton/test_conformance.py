"""The conformance suite: our server and a real ``tritonserver`` answer SONIC's calls alike.

Real parts on both sides: ``python -m serving --backend onnxruntime`` and Triton 2.51 (from the
pinned ``nvidia-pytriton`` wheel) running the same ONNX graph in its Python backend, each asked
the same calls in CMSSW's order by the same client process (benchmarks/sonic_sequence.py), both
scraped on their metrics port, and both put through SONIC's checksum versioning check.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.conformance import DOCUMENTED, OUTPUT_TOLERANCE, Comparison, check, markdown
from serving.triton.metrics import FAMILIES


@pytest.fixture(scope="module")
def comparison(onnx_model_dir: Path) -> Comparison:
    return check(str(onnx_model_dir), backend="onnxruntime", max_batch_size=8)


def test_sonic_sequence_fields_and_counts_agree(comparison: Comparison) -> None:
    """RepositoryIndex, ModelConfig and ModelMetadata (versions "" and "1"), the statistics' row,
    execution and request counts per batch size, and the HTTP extensions: no field differs."""
    assert comparison.mismatches == []


def test_outputs_agree_for_the_same_inputs(comparison: Comparison) -> None:
    assert comparison.max_output_difference <= OUTPUT_TOLERANCE


def test_bad_requests_get_triton_status_codes_unless_documented(comparison: Comparison) -> None:
    assert comparison.undocumented == []
    cases = {(protocol, case) for protocol, case, *_ in comparison.battery + comparison.metrics}
    assert set(DOCUMENTED) <= cases, "a documented difference names a request or check the suite no longer makes"
    assert len(comparison.battery) >= 20


def test_the_report_shows_each_bad_request_next_to_triton(comparison: Comparison) -> None:
    report = markdown(comparison, "onnxruntime")
    assert "**conformant**" in report
    for protocol, case, ours, theirs, _ in comparison.battery:
        assert f"| {protocol} | {case} | {ours} | {theirs} |" in report


def metric_rows(comparison: Comparison, suffix: str) -> dict[str, tuple[str, str]]:
    return {check: (ours, theirs) for _, check, ours, theirs, _ in comparison.metrics if check.endswith(suffix)}


def test_every_triton_metric_family_has_triton_type_and_labels(comparison: Comparison) -> None:
    """Names, types and label names of every per-model family, as real Triton serves them on its port."""
    families = {case.removeprefix("family "): row for case, row in metric_rows(comparison, "").items()}
    for name, kind in FAMILIES.items():
        ours, theirs = families[name]
        assert ours == theirs, name
        assert ours.startswith(kind), (name, ours)
    assert families["nv_inference_request_failure"][0] == "counter [model, reason, version]"


def test_metrics_exist_at_zero_from_start_up(comparison: Comparison) -> None:
    """SuperSONIC's Envoy filter fails on a missing value: every family is there, at zero, before any call."""
    at_start = metric_rows(comparison, " at start")
    assert len(at_start) == len(FAMILIES)
    for name, (ours, theirs) in at_start.items():
        assert ours == theirs, name
        assert all(sample.endswith(": 0") for sample in ours.split("; ")), (name, ours)


def test_metric_counts_agree_after_sonic_sequence(comparison: Comparison) -> None:
    """Requests, rows, executions, failures by reason and the pending count: the same numbers as Triton."""
    after = metric_rows(comparison, " after SONIC's sequence")
    assert len(after) == 5
    for name, (ours, theirs) in after.items():
        assert ours == theirs, name
    assert after["nv_inference_request_success after SONIC's sequence"][0].endswith(": 6")


def test_metric_durations_start_at_zero_and_only_grow(comparison: Comparison) -> None:
    grows = metric_rows(comparison, " grows")
    assert len(grows) == 5
    assert set(grows.values()) == {("0, rises, never falls", "0, rises, never falls")}


def test_sonic_versioning_accepts_the_same_model_and_refuses_a_changed_file(comparison: Comparison) -> None:
    """SonicTriton's check (the checksum agent's parameters of its local config.pbtxt against
    ModelConfig): real Triton and ours give the same verdicts."""
    for server in ("ours", "triton"):
        verdicts = comparison.versioning[server]
        assert verdicts["same model"] == "OK"
        assert verdicts["a model file changed"] == "ModelVersioning (MD5:1/tagger/tagger.json differ)"


def test_the_report_has_the_metrics_and_versioning_tables(comparison: Comparison) -> None:
    report = markdown(comparison, "onnxruntime")
    for _, case, ours, theirs, _ in comparison.metrics:
        assert f"| {case} | {ours} | {theirs} |" in report
    assert "| a model file changed | ModelVersioning" in report
