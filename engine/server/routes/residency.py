"""GET /residency: which adapters this engine holds in which tier, and its load (for the gateway).

The JSON shape (stable; new tiers add values to ``tier``, never new fields the gateway must know)::

    {"model": "SmolLM2-135M-Instruct", "max_model_len": 2048,
     "adapters": [{"name": "acme/poet", "tier": "gpu"}, {"name": "beta/coder", "tier": "host"}],
     "load": {"running": 3, "waiting": 0, "pool_pages_free": 812, "pool_pages_total": 1024}}

``tier`` is "gpu" while the adapter's weights are in the device pool, "host" while they are in the
engine's host RAM, "source" when only its folder holds them (the gateway ranks gpu > host > any
other value). An unhealthy engine answers 503 like /health, so one poll tells the gateway both.
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel

from loraplane.engine.errors import EngineDeadError
from loraplane.engine.server.deps import EngineDep

router = APIRouter()


class AdapterResidency(BaseModel):
    name: str
    tier: Literal["gpu", "host", "source"]


class Load(BaseModel):
    running: int
    waiting: int
    pool_pages_free: int
    pool_pages_total: int


class Residency(BaseModel):
    model: str
    max_model_len: int
    adapters: list[AdapterResidency]
    load: Load


@router.get("/residency")
async def residency(engine: EngineDep) -> Residency:
    """The base model, each adapter with its tier, and the current load."""
    if not engine.is_healthy():
        raise EngineDeadError("The engine is not healthy")
    s = engine.stats()
    used = s.pool_pages_kv + s.pool_pages_adapter
    return Residency(
        model=engine.model_name,
        max_model_len=engine.max_model_len,
        adapters=[AdapterResidency(name=a.name, tier=a.tier)  # type: ignore[arg-type]
                  for a in engine.list_adapters()],
        load=Load(running=s.running, waiting=s.waiting,
                  pool_pages_free=max(s.pool_pages_total - used, 0),
                  pool_pages_total=s.pool_pages_total),
    )
