"""A local fleet: N predictor replicas behind a real Envoy, scraped by a real Prometheus.

    with Fleet("models:/top-tagger@champion", replicas=2) as fleet:
        client = tritonclient.grpc.InferenceServerClient(fleet.grpc_target)
        ...
        fleet.kill(0)              # SIGKILL one replica; Envoy retries its requests elsewhere
        fleet.restart(0)           # the same replica again, on the same ports

The same Envoy configuration generator renders the cluster's (serving.fleet.envoy_config), so the
local fleet is the cluster component on loopback: what its tests show (balancing, retries past a
killed or draining replica, health checks, SuperSONIC's admission rule, JWT, TLS) holds there.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

from serving.fleet import envoy, prometheus
from serving.fleet.binaries import find_binary
from serving.fleet.children import Child
from serving.fleet.envoy_config import (
    ADMIN_PORT,
    DEFAULT_THRESHOLD_MS,
    FLEET_GRPC_PORT,
    FLEET_HTTP_PORT,
    FLEET_METRICS_PORT,
    GRPC_CLUSTER,
    HTTP_CLUSTER,
    PROMETHEUS_PORT,
    Endpoint,
    EnvoySettings,
    Jwt,
    Tls,
    TokenBucket,
    local_settings,
    render,
    scaling_metric,
)
from serving.fleet.replicas import Replica, predictor_options, replica_command
from serving.process import free_port, is_started, not_ready_error, predictor_env
from toptagger.constants import MODEL_NAME
from toptagger.errors import ConfigError, TaggerError
from toptagger.resources import cpu_limit

LOCAL_HEADER = "# The local fleet's Envoy (python -m serving.fleet); rendered by serving/fleet/envoy_config.py.\n"


class FleetError(TaggerError, RuntimeError):
    """A part of the fleet did not start, or stopped on its own."""


def _in_use(address: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1" if address == "0.0.0.0" else address, port)) == 0


def _check_file(path: str | Path | None, what: str) -> str | None:
    if path is None:
        return None
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{what} {file} does not exist or is not a file")
    try:
        file.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{what} {file} cannot be read: {exc.strerror}") from None
    return str(file.resolve())


class Fleet:
    """N replicas of ``python -m serving`` behind Envoy, with Prometheus; a context manager.

    Ports given as 0 are chosen free (tests, benchmarks); the defaults are Triton's and
    SuperSONIC's (8000 HTTP, 8001 gRPC, 8002 metrics, Prometheus 9090). Replicas always take free
    ports of their own. ``progress`` receives one line per step of the start (the CLI prints them).
    """

    def __init__(
        self,
        model_uri: str,
        replicas: int = 2,
        *,
        threads_per_replica: int | None = None,
        listen_address: str = "127.0.0.1",
        grpc_port: int = FLEET_GRPC_PORT,
        http_port: int = FLEET_HTTP_PORT,
        metrics_port: int = FLEET_METRICS_PORT,
        prometheus_port: int = PROMETHEUS_PORT,
        admin_port: int = ADMIN_PORT,
        admission_threshold_ms: float | None = DEFAULT_THRESHOLD_MS,
        metric_window_s: int = 5,
        scrape_interval_s: float = 1.0,
        jwt: Jwt | None = None,
        tls: Tls | None = None,
        rtt_ms: float = 0.0,
        connection_bucket: TokenBucket | None = None,
        drain_seconds: float | None = None,
        backend: str | None = None,
        replica_args: Sequence[str] = (),
        timeout_s: float = 300.0,
        progress: Callable[[str], None] | None = None,
        envoy_binary: str | None = None,
        prometheus_binary: str | None = None,
    ) -> None:
        if not model_uri:
            raise ConfigError("a model URI is needed (local path, s3:// URI or models:/top-tagger@champion)")
        if replicas < 1:
            raise ConfigError(f"--replicas must be at least 1, got {replicas}")
        if threads_per_replica is not None and threads_per_replica < 1:
            raise ConfigError(f"--threads-per-replica must be at least 1, got {threads_per_replica}")
        if admission_threshold_ms is not None and admission_threshold_ms < 0:
            raise ConfigError(f"--admission-threshold-ms must be >= 0, got {admission_threshold_ms:g}")
        if rtt_ms < 0:
            raise ConfigError(f"--rtt-ms must be >= 0, got {rtt_ms:g}")
        if drain_seconds is not None and drain_seconds < 0:
            raise ConfigError(f"--drain-seconds must be >= 0, got {drain_seconds:g}")
        if scrape_interval_s <= 0 or metric_window_s < 2 * scrape_interval_s:
            raise ConfigError("the metric window must hold at least two scrapes (rate() needs two samples)")
        self.model_uri = model_uri
        self.replica_count = replicas
        self.threads = threads_per_replica or max(1, cpu_limit() // replicas)
        self.listen_address = listen_address
        self._ports = {
            "gRPC": grpc_port,
            "HTTP": http_port,
            "metrics": metrics_port,
            "Prometheus": prometheus_port,
            "Envoy admin": admin_port,
        }
        self.admission_threshold_ms = admission_threshold_ms
        self.metric_window_s = metric_window_s
        self.scrape_interval_s = scrape_interval_s
        if jwt is not None:
            jwt = Jwt(_check_file(jwt.jwks_file, "JWKS file") or "", jwt.issuer, jwt.audiences)
        if tls is not None:
            tls = Tls(_check_file(tls.cert_file, "TLS certificate") or "", _check_file(tls.key_file, "TLS key") or "")
        self.jwt, self.tls, self.rtt_ms, self.connection_bucket = jwt, tls, rtt_ms, connection_bucket
        self.drain_seconds = drain_seconds
        self.backend = backend
        self.replica_args = list(replica_args)
        self.timeout_s = timeout_s
        self._progress = progress or (lambda line: None)
        self._envoy_binary, self._prometheus_binary = envoy_binary, prometheus_binary
        self.replicas: list[Replica] = []
        self.envoy: Child | None = None
        self.prometheus: Child | None = None
        self.settings: EnvoySettings | None = None
        self.workdir: Path | None = None
        self.admin_url: str | None = None
        self.release = MODEL_NAME

    # -- addresses ---------------------------------------------------------------------------------
    @property
    def host(self) -> str:
        """Where a client on this machine reaches the fleet."""
        return "127.0.0.1" if self.listen_address in ("0.0.0.0", "") else self.listen_address

    @property
    def grpc_port(self) -> int:
        return self._ports["gRPC"]

    @property
    def http_port(self) -> int:
        return self._ports["HTTP"]

    @property
    def grpc_target(self) -> str:
        """``host:port`` of Envoy's gRPC listener (tritonclient.grpc's ``url``)."""
        return f"{self.host}:{self._ports['gRPC']}"

    @property
    def grpc_url(self) -> str:
        """The form :class:`serving.client.TaggerClient` takes."""
        return f"grpc://{self.grpc_target}"

    @property
    def http_url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{self.host}:{self._ports['HTTP']}"

    @property
    def metrics_url(self) -> str:
        """Every replica's Triton metrics on one page (Prometheus' federation, through Envoy)."""
        return f"http://{self.host}:{self._ports['metrics']}/metrics"

    @property
    def prometheus_url(self) -> str:
        return f"http://127.0.0.1:{self._ports['Prometheus']}"

    @property
    def scaling_metric(self) -> str:
        """SuperSONIC's metric as the admission rule asks for it (average queue ms per execution)."""
        return scaling_metric("release", self.release, self.metric_window_s)

    # -- start and stop ----------------------------------------------------------------------------
    def __enter__(self) -> Fleet:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> Fleet:
        """Start everything and return once every replica is ready and healthy in Envoy's eyes
        and (with admission) Prometheus has a value of the scaling metric."""
        envoy_binary = find_binary("envoy", self._envoy_binary)
        prometheus_binary = find_binary("prometheus", self._prometheus_binary)
        options = predictor_options()
        metrics = "--metrics-port" in options
        if self.admission_threshold_ms is not None and not metrics:
            raise ConfigError(
                "the admission rule reads the replicas' Triton metrics, and this checkout's predictor has no "
                "--metrics-port (python -m serving --help); start the fleet with no admission threshold"
            )
        if self.drain_seconds is not None and "--drain-seconds" not in options:
            raise ConfigError("this checkout's predictor has no --drain-seconds (python -m serving --help)")
        self._choose_ports()
        started = time.monotonic()
        try:
            self.workdir = Path(tempfile.mkdtemp(prefix="top-tagger-fleet-"))
            self._make_replicas(metrics)
            self.settings = local_settings(
                tuple(Endpoint("127.0.0.1", r.grpc_port, r.http_port) for r in self.replicas),
                listen_address=self.listen_address,
                grpc_port=self._ports["gRPC"],
                http_port=self._ports["HTTP"],
                metrics_port=self._ports["metrics"],
                admin_port=self._ports["Envoy admin"],
                prometheus_port=self._ports["Prometheus"],
                admission_threshold_ms=self.admission_threshold_ms,
                metric_window_s=self.metric_window_s,
                jwt=self.jwt,
                tls=self.tls,
                rtt_ms=self.rtt_ms,
                connection_bucket=self.connection_bucket,
                release=self.release,
            )
            config_path = self.workdir / "envoy.yaml"
            config_path.write_text(render(self.settings, LOCAL_HEADER))
            # Bad JWKS, certificates or fields fail here, in a second, before any model loads.
            envoy.validate(envoy_binary, config_path)
            for replica in self.replicas:
                replica.start()
                self._progress(
                    f"replica {replica.index}: starting, pid {replica.pid}, gRPC {replica.grpc_port}, "
                    f"HTTP {replica.http_port}" + (f", metrics {replica.metrics_port}" if metrics else "")
                )
            targets = [f"127.0.0.1:{r.metrics_port}" for r in self.replicas if r.metrics_port is not None]
            config = prometheus.prometheus_config(targets, self.release, self.scrape_interval_s)
            self.prometheus = prometheus.start_prometheus(
                prometheus_binary, config, "127.0.0.1", self._ports["Prometheus"], self.workdir
            )
            self.envoy = envoy.start_envoy(envoy_binary, config_path, self.workdir, self.workdir / "admin-address")
            self.admin_url = f"http://127.0.0.1:{self._ports['Envoy admin']}"
            self._wait_until_up(started)
        except BaseException:
            self.stop()
            raise
        self._progress(f"fleet ready in {time.monotonic() - started:.1f} s")
        return self

    def _choose_ports(self) -> None:
        taken: set[int] = set()
        for name, port in self._ports.items():
            if port == 0:
                port = self._free_port(taken)
            elif not 0 < port < 65536:
                raise ConfigError(f"the {name} port must be 1-65535 (or 0: any free port), got {port}")
            elif port in taken:
                raise ConfigError(f"the {name} port {port} is given twice")
            elif _in_use(self.listen_address, port):
                raise ConfigError(f"the {name} port {port} is already in use on {self.listen_address}; choose another")
            self._ports[name] = port
            taken.add(port)
        self._taken = taken

    @staticmethod
    def _free_port(taken: set[int]) -> int:
        # free_port() closes its socket, so two calls can return the same port: draw again.
        while (port := free_port()) in taken:
            pass
        return port

    def _make_replicas(self, metrics: bool) -> None:
        env = predictor_env()
        for index in range(self.replica_count):
            http_port, grpc_port = self._free_port(self._taken), 0
            self._taken.add(http_port)
            grpc_port = self._free_port(self._taken)
            self._taken.add(grpc_port)
            metrics_port = self._free_port(self._taken) if metrics else None
            if metrics_port is not None:
                self._taken.add(metrics_port)
            command = replica_command(
                self.model_uri,
                http_port=http_port,
                grpc_port=grpc_port,
                metrics_port=metrics_port,
                threads=self.threads,
                drain_seconds=self.drain_seconds,
                backend=self.backend,
                extra_args=self.replica_args,
            )
            self.replicas.append(Replica(index, http_port, grpc_port, metrics_port, command, env))

    def _check_children(self) -> None:
        for child in (self.envoy, self.prometheus):
            if child is not None and not child.alive():
                raise FleetError(
                    f"{child.name} exited with status {child.process.returncode} (log {child.log_path}):\n"
                    f"{child.log_tail()}"
                )

    def _wait_until_up(self, started: float) -> None:
        deadline = started + self.timeout_s
        pending = set(range(len(self.replicas)))
        unhealthy = set(range(len(self.replicas)))
        metric_value: float | None = None
        prometheus_up = False
        while True:
            self._check_children()
            for index in sorted(pending):
                replica = self.replicas[index]
                assert replica.server is not None
                if is_started(replica.server, f"replica {index}"):
                    pending.discard(index)
                    self._progress(f"replica {index}: ready after {time.monotonic() - started:.1f} s")
            for index in sorted(unhealthy - pending):
                if self.replica_healthy(index):
                    unhealthy.discard(index)
                    self._progress(f"envoy: replica {index} passes its health checks")
            if not prometheus_up and prometheus.is_ready(self.prometheus_url):
                prometheus_up = True
                self._progress("prometheus: ready")
            if prometheus_up and not pending and self.admission_threshold_ms is not None and metric_value is None:
                metric_value = prometheus.scalar(self.prometheus_url, self.scaling_metric)
                if metric_value is not None:
                    self._progress(f"prometheus: scaling metric {metric_value:.3g} ms (the admission rule can read it)")
            metric_ok = self.admission_threshold_ms is None or metric_value is not None
            if not pending and not unhealthy and prometheus_up and metric_ok:
                return
            if time.monotonic() > deadline:
                if pending:
                    index = min(pending)
                    server = self.replicas[index].server
                    assert server is not None
                    raise not_ready_error(server, f"replica {index}", self.timeout_s)
                waiting = "Envoy's health checks" if unhealthy else "Prometheus"
                raise FleetError(f"the fleet was not up after {self.timeout_s:.0f} s: still waiting for {waiting}")
            time.sleep(0.25)

    def stop(self) -> None:
        """Replicas first (SIGTERM: each drains what it accepted), then Envoy and Prometheus.
        Idempotent; nothing of the fleet is left running afterwards."""
        grace = (self.drain_seconds or 0) + 15
        for replica in self.replicas:
            replica.send(signal.SIGCONT)  # a paused replica could not act on SIGTERM
            replica.send(signal.SIGTERM)
        for replica in self.replicas:
            replica.finish(grace)
        for child in (self.envoy, self.prometheus):
            if child is not None:
                child.stop()
        if self.workdir is not None:
            # Logs and configurations stay for a post-mortem; the time series go.
            shutil.rmtree(self.workdir / "prometheus-data", ignore_errors=True)

    # -- replicas ----------------------------------------------------------------------------------
    def _replica(self, index: int) -> Replica:
        if not 0 <= index < len(self.replicas):
            raise IndexError(f"the fleet has replicas 0-{len(self.replicas) - 1}, not {index}")
        return self.replicas[index]

    def kill(self, index: int) -> None:
        """SIGKILL replica ``index``: a crash, as the fleet's clients and Envoy see one."""
        self._replica(index).send(signal.SIGKILL)

    def terminate(self, index: int) -> None:
        """SIGTERM replica ``index``: it drains (``--drain-seconds``) and exits, as a pod does on scale-down."""
        self._replica(index).send(signal.SIGTERM)

    def pause(self, index: int) -> None:
        """SIGSTOP replica ``index``: it holds its connections and answers nothing, as a hung server."""
        self._replica(index).send(signal.SIGSTOP)

    def resume(self, index: int) -> None:
        self._replica(index).send(signal.SIGCONT)

    def restart(self, index: int, timeout_s: float | None = None) -> Replica:
        """Start replica ``index`` again on its own ports (after kill/terminate) and return once it
        is ready and Envoy's health checks have it back."""
        replica = self._replica(index)
        if replica.alive():
            replica.stop((self.drain_seconds or 0) + 15)
        replica.start()
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        assert replica.server is not None
        while not is_started(replica.server, f"replica {index}"):
            if time.monotonic() > deadline:
                raise not_ready_error(replica.server, f"replica {index}", timeout_s or self.timeout_s)
            time.sleep(0.25)
        self.wait_for_health(index, True, max(deadline - time.monotonic(), 5.0))
        return replica

    # -- what Envoy and Prometheus see -------------------------------------------------------------
    def replica_healthy(self, index: int) -> bool:
        """Envoy sends replica ``index`` requests (it passes its health checks in both clusters)."""
        if self.admin_url is None:
            return False
        replica = self._replica(index)
        health = envoy.host_health(self.admin_url)
        grpc = health.get(GRPC_CLUSTER, {}).get(f"127.0.0.1:{replica.grpc_port}", False)
        http = health.get(HTTP_CLUSTER, {}).get(f"127.0.0.1:{replica.http_port}", False)
        return grpc and http

    def wait_for_health(self, index: int, healthy: bool, timeout_s: float = 60.0) -> None:
        """Poll Envoy until replica ``index`` is in (``healthy``) or out of rotation."""
        deadline = time.monotonic() + timeout_s
        while self.replica_healthy(index) != healthy:
            if time.monotonic() > deadline:
                state = "back in" if healthy else "out of"
                raise FleetError(f"replica {index} was not {state} Envoy's rotation after {timeout_s:.0f} s")
            time.sleep(0.2)

    def server_load_ms(self) -> float | None:
        """The scaling metric now (None while Prometheus has no value for it)."""
        return prometheus.scalar(self.prometheus_url, self.scaling_metric)

    def envoy_stats(self, prefix: str = "") -> dict[str, int]:
        """Envoy's counters (e.g. ``cluster.predictor_grpc.upstream_rq_retry``)."""
        if self.admin_url is None:
            return {}
        with contextlib.suppress(OSError):
            return envoy.stats(self.admin_url, prefix)
        return {}
