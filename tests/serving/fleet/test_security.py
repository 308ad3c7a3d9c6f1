"""The fleet's optional front: TLS termination, JWT authentication, and a fixed delay standing in
for distance, on one real fleet (one replica, Envoy, Prometheus) with all three on."""

from __future__ import annotations

import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from serving.fleet.envoy_config import Jwt, Tls
from serving.fleet.fleet import Fleet
from tests.serving.fleet.conftest import AUDIENCE, ISSUER, Jwks, Pki, metric_sum, run_client, start_fleet

RTT_MS = 300.0
UPSTREAM = "cluster.predictor_grpc.upstream_rq_total"


@pytest.fixture(scope="module")
def fleet(model_dir: Path, pki: Pki, jwks: Jwks) -> Iterator[Fleet]:
    running = start_fleet(
        model_dir,
        1,
        admission_threshold_ms=None,
        jwt=Jwt(str(jwks.path), ISSUER, (AUDIENCE,)),
        tls=Tls(str(pki.cert), str(pki.key)),
        rtt_ms=RTT_MS,
    )
    yield running
    running.stop()


def reached_replica(fleet: Fleet) -> float:
    """Inference requests the replica saw at all (answered or refused), and Envoy's upstream count."""
    url = fleet.replicas[0].metrics_url
    assert url is not None
    seen = metric_sum(url, "nv_inference_request_success") + metric_sum(url, "nv_inference_request_failure")
    return seen + fleet.envoy_stats(UPSTREAM).get(UPSTREAM, 0)


def tls_client(fleet: Fleet, pki: Pki, *args: str) -> dict:
    return run_client(*args[:1], f"localhost:{fleet.grpc_port}", "--ca", str(pki.ca), *args[1:])


def test_tls_with_the_ca_and_a_valid_token_is_served(fleet: Fleet, pki: Pki, jwks: Jwks) -> None:
    result = tls_client(fleet, pki, "requests", "--token", jwks.mint(), "--clients", "2", "--count", "2")
    assert result["failures"] == [] and result["ok"] == 4


def test_plaintext_to_the_tls_port_fails(fleet: Fleet, jwks: Jwks) -> None:
    result = run_client("requests", fleet.grpc_target, "--token", jwks.mint(), "--input-shape", "1,1,32,32")
    assert result["ok"] == 0 and "UNAVAILABLE" in result["failures"][0]


@pytest.mark.parametrize("token", ["none", "forged", "wrong-audience", "wrong-issuer"])
def test_a_request_without_a_valid_token_never_reaches_a_replica(
    fleet: Fleet, pki: Pki, jwks: Jwks, token: str
) -> None:
    tokens = {
        "none": None,
        "forged": jwks.mint_foreign(),
        "wrong-audience": jwks.mint(audience="someone-else"),
        "wrong-issuer": jwks.mint(issuer="https://evil.example.org"),
    }
    before = reached_replica(fleet)
    extra = ["--token", tokens[token]] if tokens[token] else []
    result = tls_client(fleet, pki, "requests", "--input-shape", "1,1,32,32", *extra)
    # 401 / UNAUTHENTICATED without a token that verifies; 403 / PERMISSION_DENIED for a genuine
    # token meant for another audience.
    refusal = "PERMISSION_DENIED" if token == "wrong-audience" else "UNAUTHENTICATED"
    assert result["ok"] == 0 and refusal in result["failures"][0], result
    index = tls_client(fleet, pki, "index", *extra)
    assert index["models"] == [] and refusal in (index["error"] or ""), index
    assert reached_replica(fleet) == before, "Envoy answered; the replica never saw the request"


def test_rest_needs_the_token_too_but_health_does_not(fleet: Fleet, pki: Pki, jwks: Jwks) -> None:
    context = ssl.create_default_context(cafile=str(pki.ca))
    base = f"https://localhost:{fleet.http_port}"
    with urllib.request.urlopen(f"{base}/v2/health/ready", context=context, timeout=10) as response:
        assert response.status == 200
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{base}/v2/models/top-tagger", context=context, timeout=10)
    assert refused.value.code == 401
    request = urllib.request.Request(f"{base}/v2/models/top-tagger", headers={"Authorization": f"Bearer {jwks.mint()}"})
    with urllib.request.urlopen(request, context=context, timeout=10) as response:
        assert response.status == 200


def test_every_request_waits_the_round_trip_time(fleet: Fleet, pki: Pki, jwks: Jwks) -> None:
    name = "http.grpc.fault.delays_injected"
    before = fleet.envoy_stats(name).get(name, 0)
    started = time.monotonic()
    result = tls_client(fleet, pki, "requests", "--token", jwks.mint(), "--input-shape", "1,1,32,32", "--count", "3")
    elapsed = time.monotonic() - started
    assert result["ok"] == 3
    assert fleet.envoy_stats(name).get(name, 0) - before == 3
    # A lower bound only: the delay is added for certain, whatever the machine's speed.
    assert elapsed >= 3 * RTT_MS / 1000
