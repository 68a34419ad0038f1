"""Admin API for tenants: create, list, read, delete; their limits and their usage."""

from __future__ import annotations

from fastapi import APIRouter, Response

from loraplane.gateway.deps import AdminDep, StoreDep
from loraplane.gateway.errors import GatewayError
from loraplane.gateway.schemas import Limits, Tenant, TenantCreate, TenantUsage, Usage

router = APIRouter(prefix="/admin/v1", dependencies=[AdminDep])


def tenant_not_found(name: str) -> GatewayError:
    return GatewayError(404, f"No tenant {name!r}", code="tenant_not_found", param="tenant")


@router.post("/tenants", status_code=201)
async def create_tenant(body: TenantCreate, store: StoreDep) -> Tenant:
    """Create a tenant (409 if the name is taken)."""
    tenant = await store.create_tenant(body.name, body.limits)
    if tenant is None:
        raise GatewayError(409, f"Tenant {body.name!r} exists", code="tenant_exists",
                           param="name")
    return tenant


@router.get("/tenants")
async def list_tenants(store: StoreDep) -> list[Tenant]:
    """Every tenant with its limits."""
    return await store.list_tenants()


@router.get("/tenants/{tenant}")
async def get_tenant(tenant: str, store: StoreDep) -> Tenant:
    """One tenant with its limits."""
    found = await store.get_tenant(tenant)
    if found is None:
        raise tenant_not_found(tenant)
    return found


@router.delete("/tenants/{tenant}", status_code=204)
async def delete_tenant(tenant: str, store: StoreDep) -> Response:
    """Delete a tenant and revoke its keys (usage records stay)."""
    if not await store.delete_tenant(tenant):
        raise tenant_not_found(tenant)
    return Response(status_code=204)


@router.put("/tenants/{tenant}/limits")
async def set_limits(tenant: str, limits: Limits, store: StoreDep) -> Limits:
    """Replace a tenant's limits (omitted or null fields are unlimited)."""
    if not await store.set_limits(tenant, limits):
        raise tenant_not_found(tenant)
    return limits


@router.get("/tenants/{tenant}/limits")
async def get_limits(tenant: str, store: StoreDep) -> Limits:
    """A tenant's limits."""
    found = await store.get_tenant(tenant)
    if found is None:
        raise tenant_not_found(tenant)
    return found.limits


@router.get("/tenants/{tenant}/usage")
async def get_usage(tenant: str, store: StoreDep) -> TenantUsage:
    """Requests, prompt and completion tokens served to a tenant, per model and in total."""
    if await store.get_tenant(tenant) is None:
        raise tenant_not_found(tenant)
    models = await store.usage(tenant)
    total = Usage(requests=sum(u.requests for u in models.values()),
                  prompt_tokens=sum(u.prompt_tokens for u in models.values()),
                  completion_tokens=sum(u.completion_tokens for u in models.values()))
    return TenantUsage(tenant=tenant, total=total, models=models)
