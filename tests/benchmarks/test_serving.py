"""The serving benchmark's summary: ratios computed from the measured points, not assumed."""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.serving import (
    Point,
    bounded_ratio,
    closed_loop,
    compute_seconds,
    markdown,
    paired_latency,
    parse_list,
    summary_rows,
)
from serving.backends import TorchBackend
from tests.predictor import IMAGE_SIZE, Server

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
    latency = {"served_ms": (14.5, 16.0, 18.85), "in_process_ms": (13.0, 14.0, 15.0), "rounds": 4}
    rows = {name: result for name, result, _ in summary_rows(points, CEILING, WIRE, 16, latency)}
    assert rows["ours, 16 gRPC clients, batch 1"] == "208 jets/s = 0.80× ceiling"
    bound = next(result for name, result in rows.items() if name.startswith("in-process at batch 16"))
    assert bound == "240 jets/s = 0.92× ceiling; ours = 0.87× this bound"
    assert rows["stock KServe, 16 gRPC clients, batch 1"] == "65 jets/s; ours = 3.20× stock"
    assert rows["batch-1 latency, 1 gRPC client (4 alternating slices with in-process)"].startswith(
        "p50 14.50 ms (+1.50 ms over in-process 13.00 ms)"
    )
    assert rows["batch-1 latency, 1 gRPC client (4 alternating slices with in-process)"].endswith("= 1.30× p50")
    assert "184× smaller" in rows["bytes per jet on the wire (gRPC)"]
    assert "| ours | grpc | images | 16 | 1 | 208 |" in markdown(summary_rows(points, CEILING, WIRE, 16), points)


def test_a_ratio_above_its_in_process_bound_is_flagged_not_reported() -> None:
    """The make demo trust bug: '16 clients = 2.34x ceiling' from a ceiling measured too briefly."""
    rows = {name: result for name, result, _ in summary_rows([point("ours", 16, 562)], CEILING, WIRE, 16)}
    assert "2.16× ceiling (MEASUREMENT ERROR: above its in-process bound" in rows["ours, 16 gRPC clients, batch 1"]
    bound = next(result for name, result in rows.items() if name.startswith("in-process at batch 16"))
    assert "ours = 2.34× this bound (MEASUREMENT ERROR" in bound
    assert bounded_ratio(104, 100, "ceiling") == "1.04× ceiling"  # within noise of the bound: a result


def test_model_busy_share_is_reported_where_measured() -> None:
    busy = Point("ours", "grpc", "images", 16, 1, 100, 208, 70.0, 75.0, 80.0, 0, device_busy=0.887)
    rows = {name: result for name, result, _ in summary_rows([busy], CEILING, WIRE, headline_clients=16)}
    assert rows["ours, 16 gRPC clients, batch 1"] == "208 jets/s = 0.80× ceiling; model busy 89% of the time"
    table = markdown([], [busy, point("stock", 16, 65)])
    assert "| 208 | 70.00 | 75.00 | 80.00 | 0 | 89% |" in table and "| 0 | — |" in table


def test_busy_probe_measures_the_servers_compute_share(server: Server) -> None:
    """Against the real server: the model's share of the window is a fraction, and not zero."""
    images = np.random.default_rng(3).random((1, 1, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    before = compute_seconds(server.url)
    load = asyncio.run(closed_loop(server.grpc_url, 2, images, "images", 1.0, lambda: compute_seconds(server.url)))
    assert load.errors == 0 and load.rows_per_s > 0 and len(load.latencies) > 0
    assert load.device_busy is not None and 0.05 < load.device_busy <= 1.05
    assert compute_seconds(server.url) > before


def test_paired_latency_measures_both_sides(server: Server, model_dir: Path) -> None:
    torch.manual_seed(0)  # load_model builds the network (random initialisation) before loading the weights
    backend = TorchBackend(model_dir, threads=1)
    image = np.random.default_rng(4).random((1, 1, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    latency = paired_latency(server.grpc_url, backend, image, rounds=2, seconds=0.3)
    assert latency["rounds"] == 2
    for side in ("served_ms", "in_process_ms"):
        p50, p90, p99 = latency[side]
        assert 0 < p50 <= p90 <= p99 < 5000, (side, latency[side])


def test_summary_leaves_out_what_was_not_measured() -> None:
    rows = [name for name, _, _ in summary_rows([point("ours", 4, 120)], CEILING, WIRE, headline_clients=16)]
    assert rows == ["in-process ceiling (best batch)", "bytes per jet on the wire (gRPC)"]


@pytest.mark.parametrize("text", ["", "0,1", "a,b", "-2"])
def test_bad_lists_are_named(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=r"expected comma-separated|must be >= 1"):
        parse_list(text)


def test_cli_help_and_a_bad_model_uri_fail_fast(tmp_path: Path) -> None:
    help_text = subprocess.run(
        [sys.executable, "-m", "benchmarks.serving", "--help"], capture_output=True, text=True, cwd=ROOT, check=True
    ).stdout
    assert "--model-uri" in help_text and "--headline-clients" in help_text
    missing = tmp_path / "no-such-model"
    bad = subprocess.run(
        [sys.executable, "-m", "benchmarks.serving", "--model-uri", str(missing), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert bad.returncode != 0
    assert str(missing) in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "out" / "serving_bench.json").exists()
