"""The conformance suite: our server and a real ``tritonserver`` answer SONIC's calls alike.

Real parts on both sides: ``python -m serving --backend onnxruntime`` and Triton 2.51 (from the
pinned ``nvidia-pytriton`` wheel) running the same ONNX graph in its Python backend, each asked
the same calls in CMSSW's order by the same client process (benchmarks/sonic_sequence.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.conformance import DOCUMENTED, OUTPUT_TOLERANCE, Comparison, check, markdown


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
    cases = {(protocol, case) for protocol, case, *_ in comparison.battery}
    assert set(DOCUMENTED) <= cases, "a documented difference names a request the battery no longer sends"
    assert len(comparison.battery) >= 20


def test_the_report_shows_each_bad_request_next_to_triton(comparison: Comparison) -> None:
    report = markdown(comparison, "onnxruntime")
    assert "**conformant**" in report
    for protocol, case, ours, theirs, _ in comparison.battery:
        assert f"| {protocol} | {case} | {ours} | {theirs} |" in report
