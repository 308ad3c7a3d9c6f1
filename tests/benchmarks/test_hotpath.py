"""The hot-path benchmark runs the server's own code and reports every stage (no timed assertions)."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from benchmarks.hotpath import (
    AS_IS,
    BOTH,
    MAIN_THREAD,
    NOTES_MARKER,
    UVLOOP,
    FreeComputeBackend,
    ServerRun,
    Shape,
    Stage,
    free_model,
    main,
    measure_server,
    measure_stages,
    report,
)

REPO = Path(__file__).resolve().parents[2]
IMAGE_SIZE = 16  # small and quick; the stages' code is the same at 40
STAGES = [
    "1. gRPC decode",
    "2. routing and checks",
    "3. contract check",
    "4. admission, drain, metrics",
    "5. batcher",
    "6. response",
]
ROW = re.compile(r"^\| (?P<stage>[^|]+?) \| (?P<us>[0-9.]+|\*\*[0-9.]+\*\*) \| (?P<share>[^|]+) \|")


@pytest.fixture(scope="module")
def model() -> Iterator[object]:
    model = free_model(IMAGE_SIZE)
    yield model
    model.stop()


def rows(table: str) -> dict[str, tuple[float, str]]:
    found = {}
    for line in table.splitlines():
        if match := ROW.match(line):
            found[match["stage"].strip("* ")] = (float(match["us"].strip("*")), match["share"].strip())
    return found


def test_the_stand_in_backend_answers_zeros_of_the_right_shape() -> None:
    backend = FreeComputeBackend(IMAGE_SIZE)
    out = backend.predict(np.ones((5, 3, IMAGE_SIZE, IMAGE_SIZE), np.float32))
    assert out.shape == (5, 2) and out.dtype == np.float32 and not out.any()
    assert backend.image_size == IMAGE_SIZE and backend.channels == 3


@pytest.mark.parametrize("channels", [1, 3])
def test_every_in_process_stage_is_measured_and_positive(model: object, channels: int) -> None:
    shape = measure_stages(channels, IMAGE_SIZE, iterations=300, repeats=2, model=model)
    assert [stage.name for stage in shape.stages] == STAGES
    assert all(stage.us > 0 for stage in shape.stages), shape.stages
    assert shape.request_bytes > 4 * channels * IMAGE_SIZE**2  # the image and the request's header
    table = report([shape], "python -m benchmarks.hotpath --channels 1")
    found = rows(table)
    assert list(found) == [*STAGES, "stages 1-6"]
    assert all(us > 0 and share == "—" for us, share in found.values())  # no server run: no shares
    assert found["stages 1-6"][0] == pytest.approx(sum(found[name][0] for name in STAGES), abs=0.05)
    assert f"{channels}x{IMAGE_SIZE}x{IMAGE_SIZE} FP32 image" in table and "Machine: " in table


def test_the_server_row_shows_what_the_stages_leave_unexplained() -> None:
    shape = Shape(1, IMAGE_SIZE, 1000)
    shape.stages = [Stage(name, "", 5.0) for name in STAGES]
    as_is = ServerRun(3000, 0, 2.0, 300.0, {MAIN_THREAD: 250.0, "device": 50.0}, 12.5)
    shape.servers = {AS_IS: as_is, UVLOOP: ServerRun(4000, 0, 2.0, 240.0, {MAIN_THREAD: 200.0}, 14.0)}
    table = report([shape], "cmd")
    found = rows(table)
    assert found["stages 1-6"] == (30.0, "10.0%")
    assert found["7. transport and event loop (the rest)"] == (270.0, "90.0%")
    assert found["server, end to end"] == (300.0, "100%")
    assert f"| {UVLOOP}: " in table and "| 240.0 | -60.0 | 200 | 2000 | 0 |" in table


def test_help() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.hotpath", "--help"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0 and "usage:" in result.stdout and "--image-size" in result.stdout, result.stderr


def test_main_writes_the_table(tmp_path: Path) -> None:
    out = tmp_path / "hotpath.md"
    args = ["--image-size", str(IMAGE_SIZE), "--channels", "1", "--requests", "100", "--repeats", "1"]
    assert main([*args, "--no-server", "--out", str(out)]) == 0
    assert list(rows(out.read_text())) == [*STAGES, "stages 1-6"]
    out.write_text(out.read_text() + f"\n{NOTES_MARKER}\n\n## What to cut\n\nkept\n")
    assert main([*args, "--no-server", "--out", str(out)]) == 0  # the tables again, the notes kept
    text = out.read_text()
    assert text.count(NOTES_MARKER) == 1 and text.endswith("## What to cut\n\nkept\n")
    assert list(rows(text)) == [*STAGES, "stages 1-6"]


@pytest.mark.slow
def test_the_real_server_runs_with_the_stand_in_backend() -> None:
    runs = measure_server(1, IMAGE_SIZE, seconds=0.5, clients=2, variants=[AS_IS, BOTH])
    for run in runs.values():
        assert run.requests > 0 and run.errors == 0 and run.cpu_us_per_request > 0
        assert MAIN_THREAD in run.threads_us and run.clients_us and run.clients_us > 0
