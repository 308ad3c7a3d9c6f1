"""The peers table: medians over the rounds, ratios of medians, and the in-process bound enforced."""

from __future__ import annotations

import json

import pytest

from benchmarks.peers import CLIENTS, markdown


def result(ours_16: list[float], in_process_16: list[float]) -> dict:
    def served(label: str, rows: list[float], single_p50: float) -> dict:
        n = len(rows)
        return {"label": label, "rows_per_s": rows, "p50_ms": [40.0] * n, "single_rows_per_s": [100.0] * n,
                "single_p50_ms": [single_p50] * n, "errors": 0}  # fmt: skip

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
