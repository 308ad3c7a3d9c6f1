"""The fleet's one Envoy configuration: its shape (SuperSONIC's, plus health checks and retries),
every rendered variant accepted by the real Envoy (``envoy --mode validate``), the committed
cluster file equal to the render, and the listener token bucket at work."""

from __future__ import annotations

import re
import select
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from serving.fleet import envoy
from serving.fleet.binaries import find_binary
from serving.fleet.envoy_config import (
    CLUSTER_ENVOY_PATH,
    CLUSTER_HEADER,
    GRPC_CLUSTER,
    HTTP_CLUSTER,
    INDEX_PATH,
    Endpoint,
    EnvoySettings,
    Jwt,
    Tls,
    TokenBucket,
    cluster_settings,
    envoy_config,
    local_settings,
    render,
    scaling_metric,
)
from serving.process import free_port
from tests.serving.fleet.conftest import AUDIENCE, ISSUER, Jwks, Pki, wait_until
from toptagger.errors import ConfigError

REPO = Path(__file__).resolve().parents[3]
ENDPOINTS = (Endpoint("127.0.0.1", 9001, 9000), Endpoint("127.0.0.1", 9011, 9010))


def by_name(items: list[dict[str, Any]], name: str) -> dict[str, Any]:
    (found,) = [item for item in items if item["name"] == name]
    return found


def manager(config: dict[str, Any], listener: str) -> dict[str, Any]:
    chain = by_name(config["static_resources"]["listeners"], listener)["filter_chains"][0]
    return chain["filters"][0]["typed_config"]


def filter_names(config: dict[str, Any], listener: str) -> list[str]:
    return [f["name"] for f in manager(config, listener)["http_filters"]]


def validated(tmp_path: Path, settings: EnvoySettings) -> None:
    path = tmp_path / "envoy.yaml"
    path.write_text(render(settings))
    envoy.validate(find_binary("envoy"), path)


def test_the_committed_cluster_file_is_the_render() -> None:
    assert CLUSTER_ENVOY_PATH.read_text() == render(cluster_settings(), CLUSTER_HEADER), (
        "python -m serving.fleet render-envoy --out manifests/components/fleet/envoy.yaml"
    )
    check = subprocess.run(
        [sys.executable, "-m", "serving.fleet", "render-envoy", "--out", str(CLUSTER_ENVOY_PATH), "--check"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_render_check_catches_a_stale_file(tmp_path: Path) -> None:
    stale = tmp_path / "envoy.yaml"
    stale.write_text(CLUSTER_ENVOY_PATH.read_text().replace("LEAST_REQUEST", "ROUND_ROBIN"))
    check = subprocess.run(
        [sys.executable, "-m", "serving.fleet", "render-envoy", "--out", str(stale), "--check"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 1 and "differs" in check.stdout


def test_the_committed_cluster_file_passes_envoys_validation() -> None:
    envoy.validate(find_binary("envoy"), CLUSTER_ENVOY_PATH)


def test_every_option_renders_a_configuration_envoy_accepts(tmp_path: Path, pki: Pki, jwks: Jwks) -> None:
    jwt, tls = Jwt(str(jwks.path), ISSUER, (AUDIENCE,)), Tls(str(pki.cert), str(pki.key))
    bucket = TokenBucket(10, 5, 1.0)
    validated(tmp_path, local_settings(ENDPOINTS, jwt=jwt, tls=tls, rtt_ms=25, connection_bucket=bucket))
    validated(tmp_path, local_settings(ENDPOINTS, admission_threshold_ms=None))
    validated(tmp_path, cluster_settings(jwt=jwt, tls=tls))
    validated(tmp_path, cluster_settings(admission_threshold_ms=None))


def test_a_broken_reference_is_refused_with_envoys_reason(tmp_path: Path, pki: Pki) -> None:
    bad_jwks = tmp_path / "jwks.json"
    bad_jwks.write_text("{not json")
    with pytest.raises(ConfigError, match="jwks"):
        validated(tmp_path, local_settings(ENDPOINTS, jwt=Jwt(str(bad_jwks), ISSUER, (AUDIENCE,))))
    with pytest.raises(ConfigError, match="Envoy refuses"):
        validated(tmp_path, local_settings(ENDPOINTS, tls=Tls(str(pki.ca), str(bad_jwks))))


def test_supersonics_balancing_timeout_and_upstream_protocol() -> None:
    config = envoy_config(local_settings(ENDPOINTS))
    clusters = config["static_resources"]["clusters"]
    grpc, http = by_name(clusters, GRPC_CLUSTER), by_name(clusters, HTTP_CLUSTER)
    assert grpc["lb_policy"] == http["lb_policy"] == "LEAST_REQUEST"
    options = grpc["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert "http2_protocol_options" in options["explicit_http_config"], "gRPC upstreams speak HTTP/2"
    assert "typed_extension_protocol_options" not in http
    hosts = [e["endpoint"] for e in grpc["load_assignment"]["endpoints"][0]["lb_endpoints"]]
    assert [h["address"]["socket_address"]["port_value"] for h in hosts] == [9001, 9011]
    # the gRPC cluster's readiness is checked on each replica's HTTP port
    assert [h["health_check_config"]["port_value"] for h in hosts] == [9000, 9010]
    for cluster in (grpc, http):
        (check,) = cluster["health_checks"]
        assert check["http_health_check"]["path"] == "/v2/health/ready"
        assert check["interval"] == check["no_traffic_interval"] == "1s"
        assert cluster["circuit_breakers"]["thresholds"][0]["max_retries"] >= 16
    route = manager(config, "grpc")["route_config"]["virtual_hosts"][0]["routes"][0]
    assert route["route"]["timeout"] == "0s"


def test_inference_is_retried_on_another_replica() -> None:
    config = envoy_config(local_settings(ENDPOINTS))
    for listener, wanted in (("grpc", "unavailable"), ("http", "retriable-status-codes")):
        route = manager(config, listener)["route_config"]["virtual_hosts"][0]["routes"][0]
        policy = route["route"]["retry_policy"]
        assert set(policy["retry_on"].split(",")) == {"connect-failure", "reset", "refused-stream", wanted}
        assert policy["num_retries"] >= len(ENDPOINTS)
        (predicate,) = policy["retry_host_predicate"]
        assert predicate["name"] == "envoy.retry_host_predicates.previous_hosts"
        assert route["request_body_buffer_limit"] >= 64 * 1024 * 1024, "a 64 MB request can be retried"
    http_route = manager(config, "http")["route_config"]["virtual_hosts"][0]["routes"][0]
    assert http_route["route"]["retry_policy"]["retriable_status_codes"] == [503]


def test_admission_filter_only_at_grpc_with_the_scaling_metric() -> None:
    config = envoy_config(local_settings(ENDPOINTS, admission_threshold_ms=12.5, metric_window_s=5))
    assert "envoy.filters.http.lua" in filter_names(config, "grpc")
    assert "envoy.filters.http.lua" not in filter_names(config, "http")
    lua = manager(config, "grpc")["http_filters"][-2]["typed_config"]["default_source_code"]["inline_string"]
    assert INDEX_PATH in lua and "THRESHOLD_MS = 12.5" in lua and not re.search(r"@[A-Z_]+@", lua)
    assert "nv_inference_queue_duration_us%7Brelease%3D~%22top-tagger%22%7D%5B5s%5D" in lua
    assert filter_names(envoy_config(local_settings(ENDPOINTS, admission_threshold_ms=None)), "grpc") == [
        "envoy.filters.http.router"
    ]


def test_the_metric_is_supersonics() -> None:
    # helm/supersonic/templates/_helpers/_scaling-metric.tpl, whitespace folded
    supersonic = (
        'sum by (release) (rate(nv_inference_queue_duration_us{release=~"top-tagger"}[30s])) / '
        'sum by (release) ((rate(nv_inference_exec_count{release=~"top-tagger"}[30s]) * 1000) + 0.001)'
    )
    assert scaling_metric("release", "top-tagger", 30) == supersonic


def test_the_cluster_variant_uses_dns_and_supersonics_ports() -> None:
    config = envoy_config(cluster_settings())
    ports = {
        listener["name"]: listener["address"]["socket_address"] for listener in config["static_resources"]["listeners"]
    }
    assert {name: a["port_value"] for name, a in ports.items()} == {"grpc": 8001, "http": 8000, "metrics": 8002}
    assert {a["address"] for a in ports.values()} == {"0.0.0.0"}
    assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1", "the admin API can stop Envoy"
    grpc = by_name(config["static_resources"]["clusters"], GRPC_CLUSTER)
    assert grpc["type"] == "STRICT_DNS"
    (host,) = grpc["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert host["endpoint"]["address"]["socket_address"] == {"address": "top-tagger-replicas", "port_value": 8081}
    lua = manager(config, "grpc")["http_filters"][-2]["typed_config"]["default_source_code"]["inline_string"]
    assert "%5B30s%5D" in lua and "model%3D~%22top-tagger%22" in lua


def test_optional_filters_in_order(pki: Pki, jwks: Jwks) -> None:
    jwt, tls = Jwt(str(jwks.path), ISSUER, (AUDIENCE,)), Tls(str(pki.cert), str(pki.key))
    config = envoy_config(local_settings(ENDPOINTS, jwt=jwt, tls=tls, rtt_ms=40))
    # the delay first (a distant client waits for a refusal too), then authentication
    assert filter_names(config, "grpc") == [
        "envoy.filters.http.fault",
        "envoy.filters.http.jwt_authn",
        "envoy.filters.http.lua",
        "envoy.filters.http.router",
    ]
    fault = manager(config, "grpc")["http_filters"][0]["typed_config"]
    assert fault["delay"]["fixed_delay"] == "0.04s" and fault["delay"]["percentage"]["numerator"] == 100
    chain = by_name(config["static_resources"]["listeners"], "grpc")["filter_chains"][0]
    assert chain["transport_socket"]["typed_config"]["common_tls_context"]["alpn_protocols"] == ["h2"]
    provider = manager(config, "grpc")["http_filters"][1]["typed_config"]["providers"]["fleet"]
    assert provider["local_jwks"] == {"filename": str(jwks.path)} and provider["audiences"] == [AUDIENCE]


def test_the_listener_token_bucket_closes_connections_over_the_budget(tmp_path: Path) -> None:
    grpc_port, admin_port = free_port(), free_port()
    settings = local_settings(
        (Endpoint("127.0.0.1", free_port(), free_port()),),
        grpc_port=grpc_port,
        http_port=free_port(),
        metrics_port=free_port(),
        admin_port=admin_port,
        admission_threshold_ms=None,
        connection_bucket=TokenBucket(max_tokens=2, tokens_per_fill=1, fill_interval_s=3600),
    )
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(envoy_config(settings)))
    process = envoy.start_envoy(find_binary("envoy"), path, tmp_path, tmp_path / "admin")
    try:
        admin = f"http://127.0.0.1:{admin_port}"
        name = "listener_local_ratelimit.grpc_connections.rate_limited"
        wait_until(lambda: (tmp_path / "admin").exists(), 30, "Envoy's admin address")
        connections = [socket.create_connection(("127.0.0.1", grpc_port), timeout=30) for _ in range(3)]
        # Which of the three is over the budget is Envoy's order, not ours: each worker accepts
        # from its own socket (reuse_port), so on busy cores the third may be taken first.
        readable, _, _ = select.select(connections, [], [], 30)
        closed = [connection for connection in readable if connection.recv(1) == b""]
        assert len(closed) == 1, "one connection of the three is closed at once"
        assert envoy.stats(admin, name)[name] == 1
        for connection in connections:
            connection.close()
    finally:
        process.stop()
