"""The serving benchmark's summary: ratios computed from the measured points, not assumed."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from serving.bench import Point, markdown, parse_list, summary_rows

CEILING = {
    "throughput": {1: 75.0, 16: 240.0, 32: 260.0},
    "latency_ms": {1: (13.0, 14.0, 15.0)},
    "best_batch": 32,
    "best_throughput": 260.0,
}
ROOT = Path(__file__).resolve().parents[2]
WIRE = {"constituents": 3277, "images": 602186, "ratio": 602186 / 3277}


def point(server: str, clients: int, rows_per_s: float, p50: float = 15.0) -> Point:
    return Point(server, "grpc", "images", clients, 1, 100, rows_per_s, p50, p50 * 1.1, p50 * 1.3, 0)


def test_summary_reports_each_ratio_from_the_points() -> None:
    points = [point("ours", 1, 66, p50=14.5), point("ours", 16, 208), point("stock", 16, 65)]
    rows = {name: result for name, result, _ in summary_rows(points, CEILING, WIRE, headline_clients=16)}
    assert rows["ours, 16 gRPC clients, batch 1"] == "208 jets/s = 0.80× ceiling"
    bound = next(result for name, result in rows.items() if name.startswith("in-process at batch 16"))
    assert bound == "240 jets/s = 0.92× ceiling; ours = 0.87× this bound"
    assert rows["stock KServe, 16 gRPC clients, batch 1"] == "65 jets/s; ours = 3.20× stock"
    assert rows["batch-1 latency, 1 gRPC client"].startswith("p50 14.50 ms (+1.50 ms over in-process 13.00 ms)")
    assert "184× smaller" in rows["bytes per jet on the wire (gRPC)"]
    assert "| ours | grpc | images | 16 | 1 | 208 |" in markdown(summary_rows(points, CEILING, WIRE, 16), points)


def test_summary_leaves_out_what_was_not_measured() -> None:
    rows = [name for name, _, _ in summary_rows([point("ours", 4, 120)], CEILING, WIRE, headline_clients=16)]
    assert rows == ["in-process ceiling (best batch)", "bytes per jet on the wire (gRPC)"]


@pytest.mark.parametrize("text", ["", "0,1", "a,b", "-2"])
def test_bad_lists_are_named(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=r"expected comma-separated|must be >= 1"):
        parse_list(text)


def test_cli_help_and_a_bad_model_uri_fail_fast(tmp_path: Path) -> None:
    help_text = subprocess.run(
        [sys.executable, "-m", "serving.bench", "--help"], capture_output=True, text=True, cwd=ROOT, check=True
    ).stdout
    assert "--model-uri" in help_text and "--headline-clients" in help_text
    missing = tmp_path / "no-such-model"
    bad = subprocess.run(
        [sys.executable, "-m", "serving.bench", "--model-uri", str(missing), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert bad.returncode != 0
    assert str(missing) in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "out" / "serving_bench.json").exists()
