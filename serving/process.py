"""The predictor (``python -m serving``) as a local process: the deploy step's one-machine mode.

The process is started exactly as the cluster starts it (same module, same flags, ``PROTOCOL=v2``),
and counts as up only when ``/v2/health/ready`` answers 200, i.e. once the model is loaded.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from serving.errors import NOT_LOADED
from toptagger.constants import GRPC_PORT, HTTP_PORT, MODEL_NAME
from toptagger.errors import ConfigError, TaggerError

REPO = Path(__file__).resolve().parents[1]
READY_PATH = "/v2/health/ready"
LIVE_PATH = "/v2/health/live"


class LocalServingError(TaggerError, RuntimeError):
    """The local predictor did not start or did not become ready."""


@dataclass
class LocalPredictor:
    """A running local predictor. ``stop()`` (or leaving a ``with`` block) ends it."""

    process: subprocess.Popen[bytes]
    http_port: int
    grpc_port: int
    log_path: Path
    host: str = "127.0.0.1"
    _log: object = field(default=None, repr=False)
    # Started as the leader of its own process group (``new_session``): stop() signals the group,
    # so that nothing the server started outlives it, and a terminal's Ctrl-C reaches only the
    # parent that started it (the fleet), which then stops the servers in order.
    group: bool = False

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_target(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        """The form :class:`serving.client.TaggerClient` takes."""
        return f"grpc://{self.grpc_target}"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    @property
    def infer_url(self) -> str:
        return f"{self.url}/v2/models/{MODEL_NAME}/infer"

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the server (to its whole group when it leads one); gone already is fine."""
        try:
            if self.group:
                os.killpg(self.process.pid, signum)
            elif self.process.poll() is None:
                self.process.send_signal(signum)
        except ProcessLookupError:
            pass

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM, then SIGKILL if the server does not exit within ``timeout_s``."""
        if self.process.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.process.wait(timeout=timeout_s)
        if self.group:
            # The leader is gone; whatever it started and left in its group goes too.
            self.signal(signal.SIGKILL)
        if self._log is not None:
            self._log.close()  # type: ignore[attr-defined]
            self._log = None

    def __enter__(self) -> LocalPredictor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def free_port() -> int:
    """A TCP port that nothing listens on at 127.0.0.1 now (for a predictor on this machine)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex((host, port)) == 0


def readiness(url: str) -> tuple[bool, str | None]:
    """(ready, why not): ``why`` is the predictor's own reason when it answers 503 with one."""
    try:
        with urllib.request.urlopen(url + READY_PATH, timeout=2) as response:
            return response.status == 200, None
    except urllib.error.HTTPError as exc:
        try:
            reason = json.loads(exc.read() or b"{}").get("reason")
        except (ValueError, AttributeError):
            reason = None
        return False, reason if isinstance(reason, str) else None
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False, None


def _live(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + LIVE_PATH, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def predictor_command(
    model_uri: str,
    *,
    http_port: int = HTTP_PORT,
    grpc_port: int = GRPC_PORT,
    backend: str | None = None,
    extra_args: Sequence[str] = (),
    python: str = sys.executable,
) -> list[str]:
    """The command line of ``python -m serving`` on ``model_uri`` (see :func:`start_local`)."""
    if not model_uri:
        raise ConfigError("a model URI is needed (local path, s3:// URI or models:/ name)")
    if not (REPO / "serving" / "__main__.py").exists():
        raise ConfigError(f"{REPO / 'serving'} has no __main__.py: the predictor package is not installed here")
    command = [python, "-m", "serving", "--model-uri", model_uri, "--http-port", str(http_port)]
    command += ["--grpc-port", str(grpc_port)]
    if backend:
        command += ["--backend", backend]
    return command + list(extra_args)


def predictor_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The predictor's environment: ours, ``PROTOCOL=v2``, ``env``, and the repository importable."""
    process_env = {**os.environ, "PROTOCOL": "v2", **(env or {})}
    # Keep the repository importable whatever the caller's working directory is.
    process_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), process_env.get("PYTHONPATH")]))
    return process_env


def start_local(
    model_uri: str,
    *,
    http_port: int = HTTP_PORT,
    grpc_port: int = GRPC_PORT,
    backend: str | None = None,
    extra_args: Sequence[str] = (),
    timeout_s: float = 300.0,
    env: dict[str, str] | None = None,
    python: str = sys.executable,
    wait_ready: bool = True,
) -> LocalPredictor:
    """Start ``python -m serving`` on ``model_uri`` and return once it is ready.

    ``extra_args`` go to the predictor's command line (batching options, ``--fallback``, ...).
    With ``wait_ready=False`` it returns as soon as the server is live, ready or not: for callers
    that want to look at a server that cannot load its model.

    The server's output goes to a log file (its path is in the result and in every error), so
    that a chatty server can never block on a full pipe.
    """
    command = predictor_command(
        model_uri, http_port=http_port, grpc_port=grpc_port, backend=backend, extra_args=extra_args, python=python
    )
    return launch(command, predictor_env(env), http_port, grpc_port, "predictor", timeout_s, wait_ready)


def spawn(
    command: Sequence[str],
    env: dict[str, str],
    http_port: int,
    grpc_port: int,
    what: str,
    new_session: bool = False,
) -> LocalPredictor:
    """Start a v2 server process and return at once (``launch`` waits for it; a fleet polls many).

    ``new_session`` makes it the leader of its own process group (see :attr:`LocalPredictor.group`).
    """
    for name, port in (("HTTP", http_port), ("gRPC", grpc_port)):
        if _port_in_use("127.0.0.1", port):
            raise ConfigError(f"{name} port {port} is already in use on 127.0.0.1; choose another one")
    log_path = Path(tempfile.mkstemp(prefix=f"top-tagger-{what}-", suffix=".log")[1])
    log = log_path.open("wb")
    process = subprocess.Popen(
        list(command), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=new_session
    )
    return LocalPredictor(process, http_port, grpc_port, log_path, _log=log, group=new_session)


def is_started(predictor: LocalPredictor, what: str, wait_ready: bool = True) -> bool:
    """One look at a spawned server: True once ready (or, without ``wait_ready``, live), False
    while it may still become so; raises :class:`LocalServingError` (and stops it) when it cannot."""
    process, log_path = predictor.process, predictor.log_path
    if process.poll() is not None:
        predictor.stop()
        raise LocalServingError(
            f"the {what} exited with status {process.returncode} before it was ready "
            f"(log {log_path}):\n{_log_tail(log_path)}"
        )
    ready, why = readiness(predictor.url)
    if ready or (not wait_ready and (why is not None or _live(predictor.url))):
        return True
    # The predictor loads its model before it listens, so a 503 with a reason other than
    # "not loaded yet" is final (e.g. the model cannot be read): no point waiting for it.
    if why and why != NOT_LOADED:
        predictor.stop()
        raise LocalServingError(f"the {what} on {predictor.url} is up but not ready: {why} (log {log_path})")
    return False


def not_ready_error(predictor: LocalPredictor, what: str, timeout_s: float) -> LocalServingError:
    """The error of a server that did not become ready within ``timeout_s``."""
    return LocalServingError(
        f"the {what} on {predictor.url} was not ready after {timeout_s:.0f} s "
        f"(log {predictor.log_path}):\n{_log_tail(predictor.log_path)}"
    )


def launch(
    command: Sequence[str],
    env: dict[str, str],
    http_port: int,
    grpc_port: int,
    what: str,
    timeout_s: float,
    wait_ready: bool = True,
) -> LocalPredictor:
    """Start a v2 server process and return once ``/v2/health/ready`` answers 200 (see start_local)."""
    predictor = spawn(command, env, http_port, grpc_port, what)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if is_started(predictor, what, wait_ready):
            return predictor
        time.sleep(0.25)
    predictor.stop()
    raise not_ready_error(predictor, what, timeout_s)
