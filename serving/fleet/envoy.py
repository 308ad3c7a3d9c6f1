"""Envoy as a local process: check a configuration, start it, read its admin API."""

from __future__ import annotations

import re
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

from serving.fleet.children import Child, start_child
from toptagger.errors import ConfigError

# Envoy's log prefix ([time][thread][level][where]) says nothing to the person who ran us.
LOG_PREFIX = re.compile(r"^(\[[^]]*\])+ ?")


def validate(binary: str, config_path: Path) -> None:
    """``envoy --mode validate``: every field, filter and referenced file (JWKS, certificates) is
    checked as a real start would; a :class:`ConfigError` with Envoy's own reason otherwise."""
    result = subprocess.run(
        [binary, "--mode", "validate", "-c", str(config_path), "--log-level", "error"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if result.returncode != 0:
        reasons = [
            line for line in (result.stdout + result.stderr).splitlines() if "critical" in line or "error" in line
        ]
        reason = reasons[-1] if reasons else (result.stdout + result.stderr).strip()[-500:]
        reason = LOG_PREFIX.sub("", reason)
        raise ConfigError(f"Envoy refuses its configuration {config_path}: {reason}")


def start_envoy(binary: str, config_path: Path, workdir: Path, admin_address_path: Path) -> Child:
    """Envoy on ``config_path``; it writes its admin address to ``admin_address_path`` once up."""
    command = [
        binary,
        "-c",
        str(config_path),
        # Several Envoys on one machine (tests, a fleet beside a benchmark) must not share the
        # hot-restart shared memory.
        "--disable-hot-restart",
        "--admin-address-path",
        str(admin_address_path),
        "--log-level",
        "warn",
    ]
    return start_child("envoy", command, workdir)


def admin_get(admin_url: str, path: str) -> str:
    with urllib.request.urlopen(f"{admin_url}{path}", timeout=5) as response:
        return response.read().decode()


def host_health(admin_url: str) -> dict[str, dict[str, bool]]:
    """Envoy's view of every upstream host: ``{cluster: {"address:port": healthy}}`` (a host fails
    while its active health check or outlier detection has it out)."""
    try:
        text = admin_get(admin_url, "/clusters")
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return {}
    health: dict[str, dict[str, bool]] = {}
    for line in text.splitlines():
        parts = line.split("::")
        if len(parts) == 4 and parts[2] == "health_flags":
            health.setdefault(parts[0], {})[parts[1]] = parts[3] == "healthy"
    return health


def stats(admin_url: str, prefix: str = "") -> dict[str, int]:
    """Envoy's counters and gauges whose names start with ``prefix``."""
    text = admin_get(admin_url, "/stats?filter=" + re.escape(prefix) if prefix else "/stats")
    values: dict[str, int] = {}
    for line in text.splitlines():
        name, _, value = line.partition(": ")
        if value.strip().lstrip("-").isdigit():
            values[name] = int(value)
    return values
