"""FastAPI dependencies: the app's store, fleet and metrics, the caller's tenant, admin checks.

All are ``async def``: FastAPI runs plain ``def`` dependencies in a thread pool, which would cost
a thread hand-off on every request.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from loraplane.gateway.errors import GatewayError, invalid_api_key
from loraplane.gateway.fleet import Fleet
from loraplane.gateway.keys import bearer, hash_key, same_hash
from loraplane.gateway.metrics import GatewayMetrics
from loraplane.gateway.store.base import Store


async def get_store(request: Request) -> Store:
    """Where tenants, keys, limits and usage live."""
    store: Store = request.app.state.store
    return store


async def get_fleet(request: Request) -> Fleet:
    """The engine replicas."""
    fleet: Fleet = request.app.state.fleet
    return fleet


async def get_metrics(request: Request) -> GatewayMetrics:
    """This process's Prometheus metrics."""
    metrics: GatewayMetrics = request.app.state.metrics
    return metrics


StoreDep = Annotated[Store, Depends(get_store)]
FleetDep = Annotated[Fleet, Depends(get_fleet)]
MetricsDep = Annotated[GatewayMetrics, Depends(get_metrics)]


async def get_tenant(request: Request, store: StoreDep) -> str:
    """The tenant whose API key the request carries; 401 otherwise."""
    key = bearer(request.headers.get("authorization"))
    tenant = await store.authenticate(hash_key(key)) if key else None
    if tenant is None:
        raise invalid_api_key()
    return tenant


TenantDep = Annotated[str, Depends(get_tenant)]


async def require_admin(request: Request) -> None:
    """Let the request through only with the admin bearer token (compared in constant time)."""
    expected: str | None = request.app.state.admin_token
    if expected is None:
        raise GatewayError(403, "The admin API is off: start the gateway with an admin token "
                           "(--admin-token-file or LORAPLANE_GATEWAY_ADMIN_TOKEN).",
                           code="admin_disabled", type="permission_error")
    token = bearer(request.headers.get("authorization")) or ""
    if not same_hash(hash_key(token), hash_key(expected)):
        raise GatewayError(401, "Invalid admin token.", code="invalid_admin_token",
                           type="authentication_error")


AdminDep = Depends(require_admin)
