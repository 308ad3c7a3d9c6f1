"""Fleet fixtures: a real fleet (predictor replicas, Envoy, Prometheus) on loopback, the Triton
client in a process of its own, a throwaway PKI and JWKS."""

from __future__ import annotations

import datetime
import ipaddress
import json
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from serving.fleet.fleet import Fleet

CLIENT = Path(__file__).with_name("triton_client.py")
# Every fleet port is chosen free: tests never collide with a fleet someone runs on 8000-8002.
FREE_PORTS = {"grpc_port": 0, "http_port": 0, "metrics_port": 0, "prometheus_port": 0, "admin_port": 0}


def start_fleet(model_dir: Path, replicas: int, **options: Any) -> Fleet:
    """A fleet of ``replicas`` one-thread predictors (the tests share two cores) on free ports."""
    settings: dict[str, Any] = {**FREE_PORTS, "threads_per_replica": 1, "timeout_s": 180, **options}
    return Fleet(str(model_dir), replicas, **settings).start()


def run_client(*args: str, timeout: float = 120) -> dict[str, Any]:
    """tests/serving/fleet/triton_client.py with ``args``; its JSON answer."""
    result = subprocess.run([sys.executable, str(CLIENT), *args], capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


@dataclass
class Load:
    """Closed-loop clients in the background, until :meth:`finish`."""

    process: subprocess.Popen[str]
    stop_file: Path

    def finish(self, timeout: float = 120) -> dict[str, Any]:
        self.stop_file.touch()
        out, err = self.process.communicate(timeout=timeout)
        assert self.process.returncode == 0, err[-2000:]
        return json.loads(out)


@pytest.fixture
def load(tmp_path: Path) -> Iterator[Callable[..., Load]]:
    """``load(target, clients=16, *extra)`` starts background clients; all are stopped at the end."""
    started: list[Load] = []

    def start(target: str, clients: int = 16, *extra: str) -> Load:
        stop_file = tmp_path / f"stop-{len(started)}"
        command = [
            sys.executable,
            str(CLIENT),
            "load",
            target,
            "--clients",
            str(clients),
            "--stop-file",
            str(stop_file),
        ]
        process = subprocess.Popen([*command, *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        started.append(Load(process, stop_file))
        return started[-1]

    yield start
    for running in started:
        running.stop_file.touch()
        if running.process.poll() is None:
            try:
                running.process.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                running.process.kill()
                running.process.communicate()


def metric_sum(metrics_url: str, name: str) -> float:
    """The sum of every sample of ``name`` on a Prometheus text page."""
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    pattern = re.compile(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)", re.MULTILINE)
    return sum(float(value) for value in pattern.findall(text))


def served(fleet: Fleet) -> list[int]:
    """Inference requests each replica has answered (Triton's counter on its metrics port)."""
    counts = []
    for replica in fleet.replicas:
        assert replica.metrics_url is not None
        counts.append(int(metric_sum(replica.metrics_url, "nv_inference_request_success")))
    return counts


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll ``condition`` (a deadline only guards against hanging, it is not what is tested)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached after {timeout_s:.0f} s")
        time.sleep(0.2)


@dataclass(frozen=True)
class Pki:
    ca: Path
    cert: Path
    key: Path


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A self-signed CA and a server certificate it signed, for localhost and 127.0.0.1."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder = tmp_path_factory.mktemp("pki")
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "top-tagger test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = Pki(folder / "ca.pem", folder / "server.pem", folder / "server.key")
    paths.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths.key.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return paths


ISSUER, AUDIENCE = "https://auth.example.org", "top-tagger"


@dataclass(frozen=True)
class Jwks:
    path: Path
    mint: Callable[..., str]
    mint_foreign: Callable[..., str]


@pytest.fixture(scope="session")
def jwks(tmp_path_factory: pytest.TempPathFactory) -> Jwks:
    """A JWKS file with one RSA key; ``mint()`` signs tokens with it, ``mint_foreign()`` with
    another key (a forged token)."""
    import jwt
    from cryptography.hazmat.primitives.asymmetric import rsa

    key, foreign = (rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(2))
    public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    public.update(kid="fleet-test", alg="RS256", use="sig")
    path = tmp_path_factory.mktemp("jwks") / "jwks.json"
    path.write_text(json.dumps({"keys": [public]}))

    def sign(signing_key: Any, audience: str = AUDIENCE, issuer: str = ISSUER) -> str:
        claims = {"iss": issuer, "aud": audience, "sub": "cmssw-job", "exp": int(time.time()) + 3600}
        return jwt.encode(claims, signing_key, algorithm="RS256", headers={"kid": "fleet-test"})

    return Jwks(path, lambda **kw: sign(key, **kw), lambda **kw: sign(foreign, **kw))
