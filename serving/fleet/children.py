"""The fleet's helper processes (Envoy, Prometheus), each the leader of its own process group.

Own groups, so that a terminal's Ctrl-C reaches only the fleet, which then stops its children in
order (replicas drain first), and so that stopping a child stops whatever it started.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO


@dataclass
class Child:
    """A running helper process; its output goes to ``log_path``."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    _log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _signal_group(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signum)

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM to the group, SIGKILL after ``timeout_s``; then nothing of the group is left."""
        if self.process.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.process.wait(timeout=timeout_s)
        self._signal_group(signal.SIGKILL)
        if self._log is not None:
            self._log.close()
            self._log = None


def start_child(name: str, command: Sequence[str], log_dir: Path | None = None) -> Child:
    """Start ``command`` in a new session, its output in a log file named after ``name``."""
    handle, path = tempfile.mkstemp(prefix=f"top-tagger-{name}-", suffix=".log", dir=log_dir)
    os.close(handle)
    log = open(path, "wb")  # noqa: SIM115 - kept open for the child's life, closed by stop()
    try:
        process = subprocess.Popen(
            list(command), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    except OSError:
        log.close()
        raise
    return Child(name, process, Path(path), log)
