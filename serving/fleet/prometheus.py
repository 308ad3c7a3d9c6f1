"""A real Prometheus for the local fleet: it scrapes every replica's Triton metrics, and Envoy's
admission rule and the tests ask it for SuperSONIC's scaling metric."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from serving.fleet.children import Child, start_child

JOB = "top-tagger"


def prometheus_config(metrics_targets: Sequence[str], release: str, scrape_interval_s: float = 1.0) -> dict[str, Any]:
    """Scrape each ``host:port`` (a replica's ``--metrics-port``) every ``scrape_interval_s``, with
    the ``release`` label SuperSONIC's metric selects by and a ``replica`` label (its index)."""
    interval = f"{scrape_interval_s:g}s"
    return {
        "global": {"scrape_interval": interval, "evaluation_interval": interval, "scrape_timeout": interval},
        "scrape_configs": [
            {
                "job_name": JOB,
                "metrics_path": "/metrics",
                "static_configs": [
                    {"targets": [target], "labels": {"release": release, "replica": str(index)}}
                    for index, target in enumerate(metrics_targets)
                ],
            }
        ],
    }


def start_prometheus(binary: str, config: dict[str, Any], address: str, port: int, workdir: Path) -> Child:
    """Prometheus on ``address:port`` with ``config``; its data and config live in ``workdir``."""
    config_path = workdir / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    command = [
        binary,
        f"--config.file={config_path}",
        f"--storage.tsdb.path={workdir / 'prometheus-data'}",
        f"--web.listen-address={address}:{port}",
        # A local fleet keeps minutes of data, not the default 15 days.
        "--storage.tsdb.retention.time=1d",
        "--log.level=warn",
    ]
    return start_child("prometheus", command, workdir)


def is_ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def query(url: str, expression: str) -> list[dict[str, Any]]:
    """An instant query's result vector (each ``{"metric": {...}, "value": [t, "v"]}``); [] when
    Prometheus has no value or cannot be asked."""
    address = f"{url}/api/v1/query?query={urllib.parse.quote(expression, safe='')}"
    try:
        with urllib.request.urlopen(address, timeout=5) as response:
            answer = json.load(response)
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError, ValueError):
        return []
    result = answer.get("data", {}).get("result", [])
    return result if isinstance(result, list) else []


def scalar(url: str, expression: str) -> float | None:
    """The value of a query that yields one series (SuperSONIC's metric does), or None."""
    result = query(url, expression)
    if not result:
        return None
    return float(result[0]["value"][1])


def wait_for(url: str, expression: str, timeout_s: float) -> float | None:
    """Poll until ``expression`` has a value (e.g. two scrapes in a ``rate`` window)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = scalar(url, expression)
        if value is not None:
            return value
        time.sleep(0.25)
    return None
