"""Admin API for the adapter registry: which adapters exist and who may use them.

The owner is the tenant part of the id (``<tenant>/<adapter>``); the operator writes the same
records, through the same store, when a ``LoraAdapter`` is Ready.
"""

from __future__ import annotations

from fastapi import APIRouter, Path, Response

from loraplane.gateway.deps import AdminDep, StoreDep
from loraplane.gateway.errors import GatewayError
from loraplane.gateway.schemas import (
    ADAPTER_NAME_PATTERN,
    TENANT_PATTERN,
    Adapter,
    AdapterRecord,
)

router = APIRouter(prefix="/admin/v1/adapters", dependencies=[AdminDep])


@router.get("")
async def list_adapters(store: StoreDep) -> list[Adapter]:
    """Every registered adapter with its sharing."""
    return await store.list_adapters()


@router.put("/{tenant}/{name}")
async def put_adapter(record: AdapterRecord, store: StoreDep,
                      tenant: str = Path(pattern=TENANT_PATTERN),
                      name: str = Path(pattern=ADAPTER_NAME_PATTERN)) -> Adapter:
    """Register an adapter or replace its sharing (and its engine name, if given)."""
    adapter = Adapter(id=f"{tenant}/{name}", **record.model_dump())
    if adapter.engine_name is None:  # a sharing change keeps the operator's engine name
        old = await store.get_adapter(adapter.id)
        adapter.engine_name = old.engine_name if old else None
    await store.put_adapter(adapter)
    return adapter


@router.get("/{tenant}/{name}")
async def get_adapter(tenant: str, name: str, store: StoreDep) -> Adapter:
    """One registered adapter."""
    adapter = await store.get_adapter(f"{tenant}/{name}")
    if adapter is None:
        raise GatewayError(404, f"No adapter {tenant}/{name}", code="adapter_not_found")
    return adapter


@router.delete("/{tenant}/{name}", status_code=204)
async def delete_adapter(tenant: str, name: str, store: StoreDep) -> Response:
    """Remove an adapter from the registry (tenants can no longer name it)."""
    if not await store.delete_adapter(f"{tenant}/{name}"):
        raise GatewayError(404, f"No adapter {tenant}/{name}", code="adapter_not_found")
    return Response(status_code=204)
