"""Operations endpoints: GET /health and GET /metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from loraplane.engine.errors import EngineDeadError
from loraplane.engine.server.deps import EngineDep, MetricsDep

router = APIRouter()


@router.get("/health")
async def health(engine: EngineDep) -> dict[str, str]:
    """200 while the engine is healthy, 503 otherwise."""
    if not engine.is_healthy():
        raise EngineDeadError("The engine is not healthy")
    return {"status": "ok"}


@router.get("/metrics")
async def metrics(metrics: MetricsDep) -> Response:
    """Prometheus text exposition of this app's registry."""
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
