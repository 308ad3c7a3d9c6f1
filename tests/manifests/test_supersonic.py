"""manifests/supersonic/values.yaml: SuperSONIC's chart runs our predictor as its server.

Helm merges a values file over the chart's defaults and validates the result against the chart's
``values.schema.json`` (a copy of both, release 0.3.1, in ``../shared/schemas`` and
``tests/manifests/data``). The server's command line is parsed by the predictor's own parser, so
a flag the predictor does not have, or a port that differs from the chart's, fails here.
"""

from __future__ import annotations

import copy
import json
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from serving.__main__ import build_parser

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
VALUES = REPO / "manifests" / "supersonic" / "values.yaml"
DEFAULTS = HERE / "data" / "supersonic-0.3.1-default-values.yaml"
SCHEMA = REPO.parent / "shared" / "schemas" / "supersonic-0.3.1-values.schema.json"


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Helm's coalescing of values: maps merge key by key, anything else is replaced."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


@pytest.fixture(scope="module")
def values() -> dict[str, Any]:
    return merge(yaml.safe_load(DEFAULTS.read_text()), yaml.safe_load(VALUES.read_text()))


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    if not SCHEMA.exists():
        pytest.skip(f"SuperSONIC's values schema not found at {SCHEMA} (../shared/schemas beside the checkout)")
    return json.loads(SCHEMA.read_text())


def schema_errors(values: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(schema)
    return [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(values)]


def test_values_validate_against_the_charts_schema(values: dict[str, Any], schema: dict[str, Any]) -> None:
    assert schema_errors(values, schema) == []


def test_schema_check_is_live(values: dict[str, Any], schema: dict[str, Any]) -> None:
    broken = merge(values, {"triton": {"args": "--model-uri=/models", "replicas": "two"}})
    errors = schema_errors(broken, schema)
    assert any(e.startswith("triton.args") for e in errors), errors
    assert any(e.startswith("triton.replicas") for e in errors), errors


def server_args(values: dict[str, Any]) -> Any:
    command = values["triton"]["command"]
    assert command[:3] == ["python", "-m", "serving"], f"the server must be our predictor, got {command}"
    return build_parser().parse_args([*command[3:], *values["triton"]["args"]])


def test_the_server_is_our_predictor_on_tritons_ports(values: dict[str, Any]) -> None:
    args = server_args(values)  # argparse exits on a flag the predictor does not have
    ports = {p["name"]: p for p in values["triton"]["service"]["ports"]}
    assert {name: ports[name]["port"] for name in ("http", "grpc", "metrics")} == {
        "http": 8000,
        "grpc": 8001,
        "metrics": 8002,
    }, "the chart, its Envoy and its dashboards expect Triton's ports"
    assert all(p["port"] == p["targetPort"] for p in ports.values())
    assert (int(args.http_port), int(args.grpc_port), int(args.metrics_port)) == (8000, 8001, 8002)
    assert args.model_uri.startswith(values["triton"]["modelRepository"]["mountPath"] + "/")
    assert values["triton"]["modelRepository"]["enabled"] is True


def test_drain_fits_the_charts_grace_period(values: dict[str, Any]) -> None:
    grace_s = 60  # terminationGracePeriodSeconds in the chart's templates/triton/deployment.yaml
    assert 0 < float(server_args(values).drain_seconds) < grace_s


def test_probes_ask_our_readiness_endpoint(values: dict[str, Any]) -> None:
    startup = values["triton"]["startupProbe"]["httpGet"]
    assert startup["path"] == "/v2/health/ready" and startup["port"] == "http"
    command = values["triton"]["readinessProbe"]["command"]
    assert command[:2] == ["python", "-c"], "the predictor's image has Python, not curl"
    script = command[2]
    compile(script, "readinessProbe", "exec")  # it is valid Python
    assert "http://127.0.0.1:8000/v2/health/ready" in script and "/tmp/shutdown" in script
    assert "curl" not in shlex.join(command)


def test_fleet_features_are_on(values: dict[str, Any]) -> None:
    assert values["envoy"]["enabled"] and values["envoy"]["loadBalancerPolicy"] == "LEAST_REQUEST"
    assert values["envoy"]["rate_limiter"]["prometheus_based"]["enabled"], "admission at RepositoryIndex"
    assert values["keda"]["enabled"] and values["prometheus"]["enabled"], "KEDA needs Prometheus"
    assert values["triton"]["image"].rpartition(":")[2] not in ("", "latest"), "pin the image"
