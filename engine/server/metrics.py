"""Prometheus metrics of one app: request counters and latencies, and engine gauges at scrape."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from loraplane.engine.outputs import EngineStats, RequestOutput

logger = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40)
# Tenants with a series of their own; later ones share "other" (the header is not authenticated
# here, so its values must not grow the registry without bound).
MAX_TENANT_SERIES = 1024


class EngineCollector(Collector):
    """Gauges read from ``engine.stats()`` each time /metrics is scraped."""

    def __init__(self, stats: Callable[[], EngineStats]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        try:
            s = self._stats()
        except Exception:
            logger.exception("engine.stats() failed during a metrics scrape")
            return
        yield GaugeMetricFamily("loraplane_requests_running", "Requests in the running batch.",
                                value=s.running)
        yield GaugeMetricFamily("loraplane_requests_waiting", "Requests queued for admission.",
                                value=s.waiting)
        yield GaugeMetricFamily("loraplane_batch_size", "Rows in the last engine step.",
                                value=s.last_batch_size)
        pages = GaugeMetricFamily("loraplane_pool_pages", "Pages of the unified memory pool.",
                                  labels=["kind"])
        free = s.pool_pages_total - s.pool_pages_kv - s.pool_pages_adapter
        for kind, value in (("kv", s.pool_pages_kv), ("adapter", s.pool_pages_adapter),
                            ("free", free)):
            pages.add_metric([kind], value)
        yield pages
        yield GaugeMetricFamily("loraplane_pool_pages_total", "Pages in the unified pool.",
                                value=s.pool_pages_total)
        yield GaugeMetricFamily("loraplane_pool_page_bytes", "Bytes in one pool page.",
                                value=s.page_bytes)
        yield GaugeMetricFamily("loraplane_adapters_registered", "Adapters the engine knows.",
                                value=s.adapters_registered)
        yield GaugeMetricFamily("loraplane_adapters_resident",
                                "Adapters whose weights are in the device pool.",
                                value=s.adapters_resident)
        yield CounterMetricFamily("loraplane_engine_steps", "Engine steps run.",
                                  value=s.steps_total)
        yield GaugeMetricFamily("loraplane_adapters_host",
                                "Adapters whose weights are in the engine's host RAM.",
                                value=s.adapters_host)
        host = GaugeMetricFamily("loraplane_host_cache_bytes",
                                 "Host RAM for adapter weights.", labels=["kind"])
        host.add_metric(["used"], s.host_cache_bytes_used)
        host.add_metric(["total"], s.host_cache_bytes_total)
        yield host
        # Definitions of hits, misses, hidden and exposed: engine/prefetch.py.
        t = s.tiers
        prefetch = CounterMetricFamily(
            "loraplane_adapter_prefetch", "Adapter loads by their first admitted request: hit "
            "(the prefetcher started the host-to-GPU copy), miss (admission had to), unused "
            "(prefetched, evicted before use).", labels=["outcome"])
        for outcome, value in (("hit", t.prefetch_hits),
                               ("miss", t.prefetch_misses),
                               ("unused", t.prefetch_unused)):
            prefetch.add_metric([outcome], value)
        yield prefetch
        load = CounterMetricFamily(
            "loraplane_adapter_load_seconds", "Adapter load time (source read + host-to-GPU "
            "copy): hidden (done before a request needed it) or exposed (a request waited).",
            labels=["kind"])
        load.add_metric(["hidden"], t.load_hidden_s)
        load.add_metric(["exposed"], t.load_exposed_s)
        yield load
        copy = CounterMetricFamily(
            "loraplane_adapter_copy_seconds", "Host-to-GPU adapter copy time, hidden or exposed "
            "as above; queued: loads whose request waited in the queue before its adapter was "
            "asked for (where the queue makes them predictable).", labels=["kind", "queued"])
        copy.add_metric(["hidden", "any"], t.copy_hidden_s)
        copy.add_metric(["exposed", "any"], t.copy_exposed_s)
        copy.add_metric(["hidden", "yes"], t.queued_copy_hidden_s)
        copy.add_metric(["exposed", "yes"], t.queued_copy_exposed_s)
        yield copy
        yield CounterMetricFamily("loraplane_adapter_host_loads",
                                  "Adapter reads from the source tier into host RAM.",
                                  value=t.host_loads)
        yield CounterMetricFamily("loraplane_adapter_load_failures",
                                  "Adapters whose weights failed to load.",
                                  value=t.load_failures)


class ServerMetrics:
    """The metrics of one app, in their own registry (so several apps can live in one process)."""

    def __init__(self, stats: Callable[[], EngineStats]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("loraplane_requests", "Finished requests.",
                                ["model", "finish_reason"], registry=self.registry)
        self.prompt_tokens = Counter("loraplane_prompt_tokens", "Prompt tokens of requests.",
                                     ["model"], registry=self.registry)
        self.generation_tokens = Counter("loraplane_generation_tokens", "Tokens generated.",
                                         ["model"], registry=self.registry)
        self.errors = Counter("loraplane_request_errors", "Requests answered with an error.",
                              ["code"], registry=self.registry)
        self.latency = Histogram("loraplane_request_latency_seconds",
                                 "Arrival to last token of a request.",
                                 buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.ttft = Histogram("loraplane_time_to_first_token_seconds",
                              "Arrival to first generated token.",
                              buckets=_TTFT_BUCKETS, registry=self.registry)
        self.tenant_tokens = Counter("loraplane_tenant_tokens",
                                     "Prompt and completion tokens served per tenant (the "
                                     "gateway's x-loraplane-tenant header).", ["tenant"],
                                     registry=self.registry)
        self._tenants: set[str] = set()
        self.registry.register(EngineCollector(stats))

    def track(self, model: str, prompt_tokens: int, tenant: str | None = None) -> RequestTracker:
        """Start timing one request, now."""
        return RequestTracker(self, model, prompt_tokens, tenant)

    def tenant_label(self, tenant: str) -> str:
        """The tenant's own label, or "other" once MAX_TENANT_SERIES tenants have one."""
        if tenant not in self._tenants and len(self._tenants) >= MAX_TENANT_SERIES:
            return "other"
        self._tenants.add(tenant)
        return tenant


class RequestTracker:
    """Times one request and records it once, when it finishes or is cut off."""

    def __init__(self, metrics: ServerMetrics, model: str, prompt_tokens: int,
                 tenant: str | None = None) -> None:
        self.metrics = metrics
        self.model = model
        self.tenant = tenant
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.start = time.monotonic()
        self.first_token_at: float | None = None
        self.done = False

    def observe(self, out: RequestOutput) -> None:
        """Account one engine output; records the request if it is the last."""
        if out.token_ids_delta and self.first_token_at is None:
            self.first_token_at = time.monotonic()
            self.metrics.ttft.observe(self.first_token_at - self.start)
        self.completion_tokens += len(out.token_ids_delta)
        if out.finished:
            self.prompt_tokens = out.prompt_tokens or self.prompt_tokens
            self.completion_tokens = out.completion_tokens or self.completion_tokens
            self.finish(out.finish_reason or "stop")

    def finish(self, reason: str) -> None:
        """Record the request with this finish reason; later calls do nothing."""
        if self.done:
            return
        self.done = True
        m = self.metrics
        m.requests.labels(self.model, reason).inc()
        m.prompt_tokens.labels(self.model).inc(self.prompt_tokens)
        m.generation_tokens.labels(self.model).inc(self.completion_tokens)
        m.latency.observe(time.monotonic() - self.start)
        if self.tenant is not None:
            m.tenant_tokens.labels(m.tenant_label(self.tenant)).inc(
                self.prompt_tokens + self.completion_tokens)
