"""Admin API for a tenant's API keys: create (the key is shown once), list, revoke."""

from __future__ import annotations

from fastapi import APIRouter, Response

from loraplane.gateway.deps import AdminDep, StoreDep
from loraplane.gateway.errors import GatewayError
from loraplane.gateway.keys import hash_key, new_key
from loraplane.gateway.routes.tenants import tenant_not_found
from loraplane.gateway.schemas import KeyCreate, KeyCreated, KeyInfo

router = APIRouter(prefix="/admin/v1/tenants/{tenant}/keys", dependencies=[AdminDep])


@router.post("", status_code=201)
async def create_key(tenant: str, store: StoreDep, body: KeyCreate | None = None) -> KeyCreated:
    """A new key for the tenant; the answer is the only place the key ever appears."""
    if await store.get_tenant(tenant) is None:
        raise tenant_not_found(tenant)
    key = new_key()
    info = await store.add_key(tenant, hash_key(key), body.name if body else "")
    return KeyCreated(key=key, **info.model_dump())


@router.get("")
async def list_keys(tenant: str, store: StoreDep) -> list[KeyInfo]:
    """The tenant's keys (ids, names, creation times; never the keys)."""
    if await store.get_tenant(tenant) is None:
        raise tenant_not_found(tenant)
    return await store.list_keys(tenant)


@router.delete("/{key_id}", status_code=204)
async def revoke_key(tenant: str, key_id: str, store: StoreDep) -> Response:
    """Revoke a key at once."""
    if not await store.revoke_key(tenant, key_id):
        raise GatewayError(404, f"Tenant {tenant!r} has no key {key_id!r}",
                           code="key_not_found", param="key_id")
    return Response(status_code=204)
