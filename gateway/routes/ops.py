"""GET /health, GET /metrics, and the admin view of the replicas."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST

from loraplane.gateway.deps import AdminDep, FleetDep, MetricsDep, StoreDep
from loraplane.gateway.errors import GatewayError

router = APIRouter()


@router.get("/health")
async def health(store: StoreDep, fleet: FleetDep) -> dict[str, Any]:
    """200 while the store answers and at least one replica is in rotation, else 503."""
    await store.ping()
    replicas = len(fleet.healthy())
    if not replicas:
        raise GatewayError(503, "No engine replica is in rotation", code="no_replica_available",
                           type="server_error")
    return {"status": "ok", "replicas": replicas}


@router.get("/metrics")
async def metrics(metrics: MetricsDep, store: StoreDep) -> Response:
    """Prometheus text: this process's counters, the replicas, and usage from the store."""
    return Response(metrics.render(await store.all_usage()), media_type=CONTENT_TYPE_LATEST)


@router.get("/admin/v1/replicas", dependencies=[AdminDep])
async def replicas(fleet: FleetDep) -> list[dict[str, Any]]:
    """Each replica: health, base model, load and adapters by tier."""
    return [{"url": r.url, "healthy": r.healthy, "model": r.model, "load": r.load,
             "adapters": r.tiers} for r in fleet.replicas.values()]
