"""The fleet's Envoy configuration: one generator, rendered for a local fleet and for a cluster.

The shape is SuperSONIC's (``helm/supersonic/templates/envoy/configmaps.yaml``, release 0.3.1):
an HTTP connection manager on the gRPC port with one route to the servers, ``LEAST_REQUEST`` over
HTTP/2 upstreams, route timeout 0 (a SONIC job's deadline is the client's business), an optional
listener token bucket on connections, JWT authentication, and the Lua admission filter on
``RepositoryIndex`` that reads the scaling metric from Prometheus. Added here: an HTTP listener
(v2 REST) and a metrics listener (every replica's Triton metrics, through Prometheus' federation),
active health checks on ``/v2/health/ready``, retries on another replica, TLS termination, and a
fixed delay standing in for the distance between a site's clients and the fleet (``rtt_ms``).

:func:`envoy_config` is the single source; :func:`local_settings` and :func:`cluster_settings`
only choose the addresses and timings of each place, and ``manifests/components/fleet/envoy.yaml``
is :func:`render` of :func:`cluster_settings` (a test checks that the committed file is).
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from toptagger.constants import GRPC_PORT, HTTP_PORT, MODEL_NAME

LUA_SOURCE = Path(__file__).with_name("admission.lua")
CLUSTER_ENVOY_PATH = Path(__file__).resolve().parents[2] / "manifests" / "components" / "fleet" / "envoy.yaml"
INDEX_PATH = "/inference.GRPCInferenceService/RepositoryIndex"
READY_PATH = "/v2/health/ready"

# Triton's and SuperSONIC's ports (values.yaml: 8000 HTTP, 8001 gRPC, 8002 metrics; admin 9901).
FLEET_HTTP_PORT, FLEET_GRPC_PORT, FLEET_METRICS_PORT, ADMIN_PORT = 8000, 8001, 8002, 9901
PROMETHEUS_PORT = 9090
# SuperSONIC's serverLoadThreshold (ms of queue time per execution).
DEFAULT_THRESHOLD_MS = 100.0

# Envoy cluster names, also read back from the admin API (serving.fleet.envoy).
GRPC_CLUSTER, HTTP_CLUSTER, PROMETHEUS_CLUSTER = "predictor_grpc", "predictor_http", "prometheus"

_TYPES = "type.googleapis.com/envoy.extensions"
_BREAKERS = ("max_connections", "max_pending_requests", "max_requests", "max_retries")


def scaling_metric(label: str, value: str, window_s: int) -> str:
    """SuperSONIC's scaling metric (``_helpers/_scaling-metric.tpl``): the average queue time per
    execution in ms over the last ``window_s`` seconds, for the series whose ``label`` is ``value``.

    SuperSONIC selects by ``release`` (a label its Prometheus adds to every target of a release),
    as the local fleet does; the cluster component's Prometheus finds the pods by annotation and
    adds no such label, so there the series are selected by Triton's own ``model`` label.
    The window must hold at least two scrapes for ``rate`` to have a value: SuperSONIC's 30 s
    suits its 5 s scrapes; a local fleet scrapes every second and uses a few seconds, so that the
    admission follows the load within seconds.
    """
    selector = f'{{{label}=~"{value}"}}'
    return (
        f"sum by ({label}) (rate(nv_inference_queue_duration_us{selector}[{window_s}s])) / "
        f"sum by ({label}) ((rate(nv_inference_exec_count{selector}[{window_s}s]) * 1000) + 0.001)"
    )


@dataclass(frozen=True)
class Endpoint:
    """One replica as Envoy reaches it (a DNS name in a cluster: every address it resolves to)."""

    address: str
    grpc_port: int
    http_port: int


@dataclass(frozen=True)
class TokenBucket:
    """Envoy's listener token bucket on new connections (SuperSONIC's ``rate_limiter.listener_level``)."""

    max_tokens: int
    tokens_per_fill: int
    fill_interval_s: float


@dataclass(frozen=True)
class Jwt:
    """JWT authentication: tokens signed by a key of the JWKS file, with this issuer and audience."""

    jwks_file: str
    issuer: str
    audiences: tuple[str, ...]


@dataclass(frozen=True)
class Tls:
    """TLS termination at Envoy: the server certificate chain and its private key (PEM files)."""

    cert_file: str
    key_file: str


@dataclass(frozen=True)
class EnvoySettings:
    """Everything that differs between places; :func:`envoy_config` turns it into Envoy's config."""

    endpoints: tuple[Endpoint, ...]
    # STATIC for loopback replicas; STRICT_DNS in a cluster: every A record of the (headless)
    # Service is a host, so Envoy balances requests over pods, not connections over one VIP.
    discovery: str = "STATIC"
    listen_address: str = "127.0.0.1"
    grpc_port: int = FLEET_GRPC_PORT
    http_port: int = FLEET_HTTP_PORT
    metrics_port: int = FLEET_METRICS_PORT
    admin_address: str = "127.0.0.1"
    admin_port: int = ADMIN_PORT
    prometheus_address: str = "127.0.0.1"
    prometheus_port: int = PROMETHEUS_PORT
    prometheus_discovery: str = "STATIC"
    release: str = MODEL_NAME
    # The label that selects the fleet's series in Prometheus (see scaling_metric).
    metric_label: str = "release"
    # None: no admission filter. Otherwise SuperSONIC's threshold in ms.
    admission_threshold_ms: float | None = DEFAULT_THRESHOLD_MS
    metric_window_s: int = 30
    health_interval_s: float = 5.0
    health_timeout_s: float = 2.0
    unhealthy_threshold: int = 2
    connect_timeout_s: float = 0.25
    # Enough tries to walk past every other replica; a killed replica costs one try each.
    num_retries: int = 5
    # Envoy keeps a request's body for a retry only up to this size: the predictor's own gRPC
    # message limit (--max-message-mb 64), so that any request it would take can be retried.
    retry_buffer_bytes: int = 64 * 1024 * 1024
    connection_bucket: TokenBucket | None = None
    jwt: Jwt | None = None
    tls: Tls | None = None
    rtt_ms: float = 0.0


def _seconds(value: float) -> str:
    """Envoy's Duration in YAML: ``"0.25s"``."""
    return f"{value:g}s"


def _address(address: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": address, "port_value": port}}


def _lua(settings: EnvoySettings) -> str:
    assert settings.admission_threshold_ms is not None
    query = scaling_metric(settings.metric_label, _metric_value(settings), settings.metric_window_s)
    values = {
        "QUERY_PATH": "/api/v1/query?query=" + urllib.parse.quote(query, safe=""),
        "PROMETHEUS_AUTHORITY": f"{settings.prometheus_address}:{settings.prometheus_port}",
        "PROMETHEUS_CLUSTER": PROMETHEUS_CLUSTER,
        "THRESHOLD_MS": repr(float(settings.admission_threshold_ms)),
    }
    source = LUA_SOURCE.read_text()
    for name, value in values.items():
        source = source.replace(f"@{name}@", value)
    return source


def _metric_value(settings: EnvoySettings) -> str:
    return settings.release if settings.metric_label == "release" else MODEL_NAME


def _http_filters(settings: EnvoySettings, grpc: bool) -> list[dict[str, Any]]:
    filters: list[dict[str, Any]] = []
    if settings.rtt_ms > 0:
        # Before authentication: a distant client waits for its refusal too.
        filters.append(
            {
                "name": "envoy.filters.http.fault",
                "typed_config": {
                    "@type": f"{_TYPES}.filters.http.fault.v3.HTTPFault",
                    "delay": {
                        "fixed_delay": _seconds(settings.rtt_ms / 1000),
                        "percentage": {"numerator": 100, "denominator": "HUNDRED"},
                    },
                },
            }
        )
    if settings.jwt is not None:
        rules: list[dict[str, Any]] = []
        if not grpc:
            # Kubelet-style probes carry no token; health says nothing about the model's answers.
            rules.append({"match": {"prefix": "/v2/health/"}})
        rules.append({"match": {"prefix": "/"}, "requires": {"provider_name": "fleet"}})
        filters.append(
            {
                "name": "envoy.filters.http.jwt_authn",
                "typed_config": {
                    "@type": f"{_TYPES}.filters.http.jwt_authn.v3.JwtAuthentication",
                    "providers": {
                        "fleet": {
                            "issuer": settings.jwt.issuer,
                            "audiences": list(settings.jwt.audiences),
                            "local_jwks": {"filename": settings.jwt.jwks_file},
                            # The replicas never see the token.
                            "forward": False,
                        }
                    },
                    "rules": rules,
                },
            }
        )
    if grpc and settings.admission_threshold_ms is not None:
        filters.append(
            {
                "name": "envoy.filters.http.lua",
                "typed_config": {
                    "@type": f"{_TYPES}.filters.http.lua.v3.Lua",
                    "default_source_code": {"inline_string": _lua(settings)},
                },
            }
        )
    filters.append(
        {"name": "envoy.filters.http.router", "typed_config": {"@type": f"{_TYPES}.filters.http.router.v3.Router"}}
    )
    return filters


def _retry_policy(settings: EnvoySettings, grpc: bool) -> dict[str, Any]:
    # Inference is a pure function of its input, so a request that a replica never answered can
    # go to another one. gRPC UNAVAILABLE is the predictor's answer while it drains; REST's is 503
    # (also its --max-queue-ms refusal: another replica may have room).
    retry_on = "connect-failure,reset,refused-stream," + ("unavailable" if grpc else "retriable-status-codes")
    policy: dict[str, Any] = {
        "retry_on": retry_on,
        "num_retries": settings.num_retries,
        "retry_host_predicate": [
            {
                "name": "envoy.retry_host_predicates.previous_hosts",
                "typed_config": {"@type": f"{_TYPES}.retry.host.previous_hosts.v3.PreviousHostsPredicate"},
            }
        ],
        "host_selection_retry_max_attempts": settings.num_retries,
    }
    if not grpc:
        policy["retriable_status_codes"] = [503]
    return policy


def _route(cluster: str, settings: EnvoySettings, grpc: bool) -> dict[str, Any]:
    return {
        "name": cluster,
        "virtual_hosts": [
            {
                "name": cluster,
                "domains": ["*"],
                "routes": [
                    {
                        "match": {"prefix": "/"},
                        "route": {
                            "cluster": cluster,
                            "timeout": "0s",
                            "retry_policy": _retry_policy(settings, grpc),
                        },
                        "request_body_buffer_limit": settings.retry_buffer_bytes,
                    }
                ],
            }
        ],
    }


def _metrics_route(settings: EnvoySettings) -> dict[str, Any]:
    # Prometheus' federation endpoint answers in the text format every scraper reads: one page
    # with every replica's series, told apart by their ``instance`` label.
    match = urllib.parse.quote(f'{{{settings.metric_label}="{_metric_value(settings)}"}}', safe="")
    return {
        "name": "metrics",
        "virtual_hosts": [
            {
                "name": "metrics",
                "domains": ["*"],
                "routes": [
                    {
                        "match": {"path": "/metrics"},
                        "route": {"cluster": PROMETHEUS_CLUSTER, "prefix_rewrite": f"/federate?match[]={match}"},
                    }
                ],
            }
        ],
    }


def _transport(settings: EnvoySettings, alpn: list[str]) -> dict[str, Any]:
    assert settings.tls is not None
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": f"{_TYPES}.transport_sockets.tls.v3.DownstreamTlsContext",
            "common_tls_context": {
                # gRPC clients insist on ALPN h2 over TLS.
                "alpn_protocols": alpn,
                "tls_certificates": [
                    {
                        "certificate_chain": {"filename": settings.tls.cert_file},
                        "private_key": {"filename": settings.tls.key_file},
                    }
                ],
            },
        },
    }


def _listener(settings: EnvoySettings, name: str, port: int, route: dict[str, Any], filters: list[Any]) -> dict:
    manager = {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": f"{_TYPES}.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": name,
            "codec_type": "AUTO",
            "generate_request_id": True,
            "route_config": route,
            "http_filters": filters,
            "http2_protocol_options": {},
        },
    }
    chain: dict[str, Any] = {"filters": [manager]}
    if settings.tls is not None and name != "metrics":
        chain["transport_socket"] = _transport(settings, ["h2"] if name == "grpc" else ["h2", "http/1.1"])
    listener: dict[str, Any] = {
        "name": name,
        "address": _address(settings.listen_address, port),
        "filter_chains": [chain],
    }
    if settings.connection_bucket is not None and name != "metrics":
        bucket = settings.connection_bucket
        listener["listener_filters"] = [
            {
                "name": "envoy.filters.listener.local_ratelimit",
                "typed_config": {
                    "@type": f"{_TYPES}.filters.listener.local_ratelimit.v3.LocalRateLimit",
                    "stat_prefix": f"{name}_connections",
                    "token_bucket": {
                        "max_tokens": bucket.max_tokens,
                        "tokens_per_fill": bucket.tokens_per_fill,
                        "fill_interval": _seconds(bucket.fill_interval_s),
                    },
                },
            }
        ]
    return listener


def _predictor_cluster(settings: EnvoySettings, name: str, grpc: bool) -> dict[str, Any]:
    endpoints = []
    for endpoint in settings.endpoints:
        entry: dict[str, Any] = {
            "endpoint": {"address": _address(endpoint.address, endpoint.grpc_port if grpc else endpoint.http_port)}
        }
        if grpc:
            # Readiness is a REST path: the gRPC cluster checks each replica on its HTTP port.
            entry["endpoint"]["health_check_config"] = {"port_value": endpoint.http_port}
        endpoints.append(entry)
    cluster: dict[str, Any] = {
        "name": name,
        "type": settings.discovery,
        "connect_timeout": _seconds(settings.connect_timeout_s),
        "lb_policy": "LEAST_REQUEST",
        # Envoy's default (50 %) sends traffic to every host, failed ones included, once half of
        # them fail their checks; a fleet of two would then feed a dead replica. With 0, only
        # healthy replicas get requests (none left: 503 / UNAVAILABLE at once).
        "common_lb_config": {"healthy_panic_threshold": {"value": 0}},
        # Envoy's defaults allow 3 retries in flight per cluster: a killed replica with 16 requests
        # in flight would turn 13 of them into failures.
        "circuit_breakers": {"thresholds": [dict.fromkeys(_BREAKERS, 100_000)]},
        "health_checks": [
            {
                "timeout": _seconds(settings.health_timeout_s),
                "interval": _seconds(settings.health_interval_s),
                # Envoy checks a cluster that has had no traffic yet only every 60 s by default:
                # a replica that was still loading its model would stay out for a minute.
                "no_traffic_interval": _seconds(settings.health_interval_s),
                "unhealthy_threshold": settings.unhealthy_threshold,
                "healthy_threshold": 1,
                "http_health_check": {"path": READY_PATH},
            }
        ],
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": endpoints}]},
    }
    if settings.discovery != "STATIC":
        cluster["dns_lookup_family"] = "V4_ONLY"
    if grpc:
        cluster["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": f"{_TYPES}.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        }
    return cluster


def _prometheus_cluster(settings: EnvoySettings) -> dict[str, Any]:
    endpoint = {"endpoint": {"address": _address(settings.prometheus_address, settings.prometheus_port)}}
    return {
        "name": PROMETHEUS_CLUSTER,
        "type": settings.prometheus_discovery,
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": PROMETHEUS_CLUSTER, "endpoints": [{"lb_endpoints": [endpoint]}]},
    }


def envoy_config(settings: EnvoySettings) -> dict[str, Any]:
    """Envoy's bootstrap configuration (v3 API) for ``settings``: the one place it is written."""
    if not settings.endpoints:
        raise ValueError("an Envoy configuration needs at least one replica endpoint")
    listeners = [
        _listener(
            settings, "grpc", settings.grpc_port, _route(GRPC_CLUSTER, settings, True), _http_filters(settings, True)
        ),
        _listener(
            settings, "http", settings.http_port, _route(HTTP_CLUSTER, settings, False), _http_filters(settings, False)
        ),
        _listener(settings, "metrics", settings.metrics_port, _metrics_route(settings), _http_filters_plain()),
    ]
    clusters = [
        _predictor_cluster(settings, GRPC_CLUSTER, grpc=True),
        _predictor_cluster(settings, HTTP_CLUSTER, grpc=False),
        _prometheus_cluster(settings),
    ]
    return {
        # The admin API can stop Envoy (/quitquitquit): it listens on loopback only, everywhere.
        "admin": {"address": _address(settings.admin_address, settings.admin_port)},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }


def _http_filters_plain() -> list[dict[str, Any]]:
    return [{"name": "envoy.filters.http.router", "typed_config": {"@type": f"{_TYPES}.filters.http.router.v3.Router"}}]


def render(settings: EnvoySettings, header: str = "") -> str:
    """:func:`envoy_config` as YAML, after ``header`` (comment lines)."""
    body = yaml.safe_dump(envoy_config(settings), sort_keys=False, width=1000)
    return header + body


def local_settings(
    endpoints: tuple[Endpoint, ...],
    *,
    listen_address: str = "127.0.0.1",
    grpc_port: int = FLEET_GRPC_PORT,
    http_port: int = FLEET_HTTP_PORT,
    metrics_port: int = FLEET_METRICS_PORT,
    admin_port: int = ADMIN_PORT,
    prometheus_port: int = PROMETHEUS_PORT,
    admission_threshold_ms: float | None = DEFAULT_THRESHOLD_MS,
    metric_window_s: int = 5,
    jwt: Jwt | None = None,
    tls: Tls | None = None,
    rtt_ms: float = 0.0,
    connection_bucket: TokenBucket | None = None,
    release: str = MODEL_NAME,
) -> EnvoySettings:
    """A fleet of loopback replicas: checks every second, a connect timeout for loopback."""
    return EnvoySettings(
        endpoints=endpoints,
        discovery="STATIC",
        listen_address=listen_address,
        grpc_port=grpc_port,
        http_port=http_port,
        metrics_port=metrics_port,
        admin_port=admin_port,
        prometheus_port=prometheus_port,
        admission_threshold_ms=admission_threshold_ms,
        metric_window_s=metric_window_s,
        health_interval_s=1.0,
        health_timeout_s=1.0,
        unhealthy_threshold=2,
        jwt=jwt,
        tls=tls,
        rtt_ms=rtt_ms,
        connection_bucket=connection_bucket,
        release=release,
    )


# The cluster variant's names (manifests/components/fleet): the predictor pods' headless Service
# (its DNS name resolves to every pod) and the Prometheus that KEDA's ScaledObject asks too.
CLUSTER_PREDICTOR_HOST = f"{MODEL_NAME}-replicas"
CLUSTER_PROMETHEUS_HOST, CLUSTER_PROMETHEUS_PORT = "prometheus-server.monitoring.svc.cluster.local", 80


def cluster_settings(
    *,
    predictor_host: str = CLUSTER_PREDICTOR_HOST,
    prometheus_host: str = CLUSTER_PROMETHEUS_HOST,
    prometheus_port: int = CLUSTER_PROMETHEUS_PORT,
    admission_threshold_ms: float | None = DEFAULT_THRESHOLD_MS,
    jwt: Jwt | None = None,
    tls: Tls | None = None,
) -> EnvoySettings:
    """The fleet in a Kubernetes namespace: Envoy on 8000/8001/8002 as SuperSONIC's, the
    predictor pods on KServe's container ports, SuperSONIC's 30 s window."""
    return EnvoySettings(
        endpoints=(Endpoint(predictor_host, GRPC_PORT, HTTP_PORT),),
        discovery="STRICT_DNS",
        listen_address="0.0.0.0",
        prometheus_address=prometheus_host,
        prometheus_port=prometheus_port,
        prometheus_discovery="LOGICAL_DNS",
        metric_label="model",
        admission_threshold_ms=admission_threshold_ms,
        metric_window_s=30,
        health_interval_s=5.0,
        health_timeout_s=2.0,
        unhealthy_threshold=2,
        # A burst of 100 new connections, then 20 a second: thousands of jobs starting at once
        # queue in their clients' connect retries instead of in the predictors.
        connection_bucket=TokenBucket(max_tokens=100, tokens_per_fill=20, fill_interval_s=1.0),
        jwt=jwt,
        tls=tls,
    )


CLUSTER_HEADER = """\
# Envoy in front of the top-tagger predictors: the fleet of issue #19, as SuperSONIC runs one.
# Rendered by serving/fleet/envoy_config.py (python -m serving.fleet render-envoy --out THIS_FILE);
# do not edit: tests/serving/fleet/test_envoy_config.py checks this file against the render.
# Upstream: the headless Service top-tagger-replicas (STRICT_DNS: every pod is a host, so Envoy
# balances requests, not connections); the admission rule asks the Prometheus that KEDA's
# ScaledObject asks, for the predictors' Triton metrics (port 8002, label model="top-tagger").
"""
