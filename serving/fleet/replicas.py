"""The fleet's replicas: ``python -m serving`` processes (serving.process), one per port triple."""

from __future__ import annotations

import functools
import re
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from serving.process import REPO, LocalPredictor, predictor_command, predictor_env, spawn
from toptagger.errors import ConfigError


@functools.cache
def predictor_options(python: str = sys.executable) -> frozenset[str]:
    """The flags this checkout's ``python -m serving`` takes, read from its ``--help`` (0.1 s):
    the fleet passes ``--metrics-port`` and ``--drain-seconds`` only to a predictor that has them."""
    result = subprocess.run(
        [python, "-m", "serving", "--help"], cwd=REPO, env=predictor_env(), capture_output=True, text=True, timeout=60
    )
    if result.returncode != 0:
        raise ConfigError(f"python -m serving --help failed: {(result.stderr or result.stdout).strip()[-500:]}")
    return frozenset(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", result.stdout))


@dataclass
class Replica:
    """One predictor of the fleet: its index, its ports and, while it runs, its process."""

    index: int
    http_port: int
    grpc_port: int
    metrics_port: int | None
    command: list[str]
    env: dict[str, str]
    server: LocalPredictor | None = None
    host: str = "127.0.0.1"

    @property
    def pid(self) -> int | None:
        return self.server.pid if self.server is not None else None

    @property
    def grpc_target(self) -> str:
        """``host:port`` for tritonclient, straight to this replica (not through Envoy)."""
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def metrics_url(self) -> str | None:
        return None if self.metrics_port is None else f"http://{self.host}:{self.metrics_port}/metrics"

    def alive(self) -> bool:
        return self.server is not None and self.server.process.poll() is None

    def start(self) -> None:
        """Spawn the process (own process group) and return at once; the fleet waits for readiness."""
        self.server = spawn(self.command, self.env, self.http_port, self.grpc_port, f"replica-{self.index}", True)

    def send(self, signum: int) -> None:
        if self.server is not None:
            self.server.signal(signum)

    def stop(self, timeout_s: float) -> None:
        """SIGTERM (the predictor drains), SIGKILL after ``timeout_s``."""
        if self.server is not None:
            self.server.stop(timeout_s)

    def finish(self, timeout_s: float) -> None:
        """After a SIGTERM already sent: wait up to ``timeout_s`` for the exit, then SIGKILL.
        Never a second SIGTERM: the predictor takes that as "stop now", not "drain"."""
        if self.server is None:
            return
        if self.wait(timeout_s) is None:
            self.send(signal.SIGKILL)
        self.server.stop(timeout_s)

    def wait(self, timeout_s: float) -> int | None:
        """The exit status once the process ends within ``timeout_s``, else None."""
        if self.server is None:
            return None
        try:
            return self.server.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None


def replica_command(
    model_uri: str,
    *,
    http_port: int,
    grpc_port: int,
    metrics_port: int | None,
    threads: int,
    drain_seconds: float | None,
    backend: str | None,
    extra_args: Sequence[str],
) -> list[str]:
    """The predictor's command line as a fleet member."""
    options = predictor_options()
    extra = ["--threads", str(threads)]
    if metrics_port is not None:
        extra += ["--metrics-port", str(metrics_port)]
    if drain_seconds is not None:
        if "--drain-seconds" not in options:
            raise ConfigError("this checkout's predictor has no --drain-seconds (python -m serving --help)")
        extra += ["--drain-seconds", f"{drain_seconds:g}"]
    return predictor_command(
        model_uri,
        http_port=http_port,
        grpc_port=grpc_port,
        backend=backend,
        extra_args=[*extra, *extra_args],
    )


SIGNALS = {"kill": signal.SIGKILL, "terminate": signal.SIGTERM, "pause": signal.SIGSTOP, "resume": signal.SIGCONT}
