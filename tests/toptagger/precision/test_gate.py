"""The gate admits a precision whose AUC loss is within max_auc_loss, and refuses the rest by reason."""

from __future__ import annotations

import math

import pytest

from toptagger.errors import ConfigError
from toptagger.precision.gate import admission_record, check_max_auc_loss, decide


def test_admits_within_the_loss_and_refuses_beyond() -> None:
    measured = {
        "openvino/fp32": {"auc": 0.9794},
        "openvino/bf16": {"auc": 0.9795},  # better than the reference: a negative loss
        "openvino/int8": {"auc": 0.9788},  # -0.0006
        "onnxruntime/int8": {"auc": 0.9759},  # -0.0035
    }
    decisions = decide(0.9794, measured, 0.001)
    assert [k for k, d in decisions.items() if d["admitted"]] == ["openvino/fp32", "openvino/bf16", "openvino/int8"]
    refused = decisions["onnxruntime/int8"]
    assert math.isclose(refused["auc_loss"], 0.0035, abs_tol=1e-12)
    assert "AUC loss +0.0035" in refused["reason"] and "> max_auc_loss 0.001" in refused["reason"]
    assert "<= max_auc_loss 0.001" in decisions["openvino/int8"]["reason"]


def test_the_boundary_is_admitted_and_a_zero_gate_admits_no_loss() -> None:
    assert decide(0.9, {"x/int8": {"auc": 0.9 - 0.001}}, 0.0011)["x/int8"]["admitted"]
    decisions = decide(0.9, {"a/int8": {"auc": 0.9}, "b/int8": {"auc": 0.8999}}, 0.0)
    assert decisions["a/int8"]["admitted"] and not decisions["b/int8"]["admitted"]


def test_a_precision_not_measured_is_refused_with_its_reason() -> None:
    reason = "the evaluating CPU has no bf16 units"
    decisions = decide(0.98, {"openvino/bf16": {"auc": None, "reason": reason}}, 0.001)
    assert decisions["openvino/bf16"] == {"auc": None, "reason": reason, "admitted": False}


@pytest.mark.parametrize("bad", [-0.001, 1.0, float("nan"), float("inf"), "lots", None])
def test_a_bad_max_auc_loss_is_a_clear_error(bad: object) -> None:
    with pytest.raises(ConfigError, match="max_auc_loss must be"):
        check_max_auc_loss(bad)
    with pytest.raises(ConfigError, match="max_auc_loss must be"):
        decide(0.9, {}, bad)  # type: ignore[arg-type]


def test_the_record_lists_what_was_admitted() -> None:
    record = admission_record(
        {"auc": 0.97}, {"openvino/int8": {"auc": 0.95}, "onnxruntime/int8": {"auc": 0.97}}, 0.01, "cpu"
    )
    assert record["admitted"] == ["onnxruntime/int8"]
    assert record["reference"] == {"runtime": "torch", "precision": "fp32", "auc": 0.97}
    assert record["max_auc_loss"] == 0.01 and record["measured_on"] == "cpu"
