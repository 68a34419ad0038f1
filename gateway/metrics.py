"""Prometheus metrics of one gateway process, plus the fleet's state and metered usage."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loraplane.gateway.fleet import Fleet
from loraplane.gateway.schemas import Usage


class FleetCollector(Collector):
    """Each replica's health, load and resident adapters, read at scrape time."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("loraplane_gateway_replica_up", "1 while a replica is in "
                               "rotation", labels=["replica"])
        load = GaugeMetricFamily("loraplane_gateway_replica_load", "Running + waiting requests "
                                 "of a replica as the router sees it", labels=["replica"])
        adapters = GaugeMetricFamily("loraplane_gateway_replica_adapters", "Adapters a replica "
                                     "holds, by tier", labels=["replica", "tier"])
        for r in self.fleet.replicas.values():
            up.add_metric([r.url], float(r.healthy))
            load.add_metric([r.url], r.load)
            for tier in ("gpu", "host"):
                adapters.add_metric([r.url, tier], sum(t == tier for t in r.tiers.values()))
        yield from (up, load, adapters)


def usage_metrics(usage: dict[str, dict[str, Usage]]) -> list[Metric]:
    """Metered usage per tenant and model (totals kept in the store, across gateway replicas)."""
    families = {name: CounterMetricFamily(f"loraplane_gateway_usage_{name}", f"Metered {text}",
                                          labels=["tenant", "model"])
                for name, text in (("requests", "requests served"),
                                   ("prompt_tokens", "prompt tokens"),
                                   ("completion_tokens", "completion tokens"))}
    for tenant, models in usage.items():
        for model, u in models.items():
            for name, family in families.items():
                family.add_metric([tenant, model], getattr(u, name))
    return list(families.values())


class GatewayMetrics:
    """This process's counters and the collectors behind GET /metrics."""

    def __init__(self, fleet: Fleet) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("loraplane_gateway_requests", "HTTP requests answered",
                                ["path", "code"], registry=self.registry)
        self.limited = Counter("loraplane_gateway_rate_limited", "Requests refused by a limit",
                               ["reason"], registry=self.registry)
        self.retries = Counter("loraplane_gateway_upstream_retries", "Requests retried on "
                               "another replica", registry=self.registry)
        self.registry.register(FleetCollector(fleet))

    def render(self, usage: dict[str, dict[str, Usage]]) -> bytes:
        """The text exposition of this registry and of ``usage``."""
        extra = CollectorRegistry()

        class Snapshot(Collector):
            def collect(self) -> Iterator[Metric]:
                yield from usage_metrics(usage)

        extra.register(Snapshot())
        return generate_latest(self.registry) + generate_latest(extra)


class CountRequests:
    """Count every HTTP answer by path and status (paths of the API only, so labels stay few).

    The completion paths bypass FastAPI; their handler counts its answers itself.
    """

    PATHS = frozenset({"/v1/models"})

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"] if scope["path"] in self.PATHS else "other"

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(path, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)
