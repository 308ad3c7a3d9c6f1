"""The local fleet of issue #19: N predictor replicas behind a real Envoy, scraped by a real Prometheus.

Modules, one job each:

- ``envoy_config``: the one Envoy configuration generator (local fleet and cluster component);
- ``admission.lua``: SuperSONIC's admission rule at RepositoryIndex, filled in by ``envoy_config``;
- ``envoy``: validate a configuration, start Envoy, read its admin API;
- ``prometheus``: Prometheus' configuration, start it, ask it;
- ``replicas``: the predictor processes (through ``serving.process``);
- ``children``: Envoy and Prometheus as process-group leaders;
- ``binaries``: where Envoy and Prometheus are, and how to install them;
- ``fleet``: :class:`Fleet`, the context manager the CLI, the tests and the fleet benchmark use;
- ``__main__``: ``python -m serving.fleet`` (run a fleet) and ``... render-envoy`` (the cluster file).
"""

from serving.fleet.envoy_config import Jwt, Tls, TokenBucket
from serving.fleet.fleet import Fleet, FleetError

__all__ = ["Fleet", "FleetError", "Jwt", "Tls", "TokenBucket"]
