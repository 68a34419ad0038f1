"""GET /v1/models: exactly the models the caller's tenant may use."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter

from loraplane.gateway.deps import FleetDep, StoreDep, TenantDep
from loraplane.gateway.errors import model_not_found
from loraplane.gateway.schemas import adapter_owner

router = APIRouter()


async def visible_models(tenant: str, store: StoreDep, fleet: FleetDep) -> list[dict[str, Any]]:
    """Base models of the fleet, then the adapters the tenant owns, is shared or are public."""
    created = int(time.time())
    bases = sorted(fleet.base_models())
    cards = [{"id": m, "object": "model", "created": created, "owned_by": "loraplane"}
             for m in bases]
    for adapter in await store.accessible_adapters(tenant):
        cards.append({"id": adapter, "object": "model", "created": created,
                      "owned_by": adapter_owner(adapter) or "", "parent": bases[0] if bases
                      else None})
    return cards


@router.get("/v1/models")
async def list_models(tenant: TenantDep, store: StoreDep, fleet: FleetDep) -> dict[str, Any]:
    """List the models this tenant may name."""
    return {"object": "list", "data": await visible_models(tenant, store, fleet)}


@router.get("/v1/models/{model:path}")
async def get_model(model: str, tenant: TenantDep, store: StoreDep,
                    fleet: FleetDep) -> dict[str, Any]:
    """One model by id; 404 for models this tenant may not use, as for missing ones."""
    for card in await visible_models(tenant, store, fleet):
        if card["id"] == model:
            return card
    raise model_not_found(model)
