"""The store interface: Redis for the gateway fleet, memory for `loraplane serve --tenants`."""

from __future__ import annotations

from abc import ABC, abstractmethod

from loraplane.gateway.limits import Admission, Settlement
from loraplane.gateway.schemas import Adapter, KeyInfo, Limits, Tenant, Usage, adapter_owner


def may_use(tenant: str, adapter: Adapter) -> bool:
    """A tenant may use its own adapters and those shared with it or public."""
    return (adapter_owner(adapter.id) == tenant or adapter.public
            or tenant in adapter.shared_with)


class Store(ABC):
    """Tenants, keys, adapter registry, rate-limit state and usage; atomic per call."""

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def ping(self) -> None:
        """Raise if the store cannot be reached."""

    # Tenants and their limits.
    @abstractmethod
    async def create_tenant(self, name: str, limits: Limits) -> Tenant | None:
        """The new tenant, or None if the name is taken."""

    @abstractmethod
    async def get_tenant(self, name: str) -> Tenant | None: ...

    @abstractmethod
    async def list_tenants(self) -> list[Tenant]: ...

    @abstractmethod
    async def delete_tenant(self, name: str) -> bool:
        """Delete a tenant and its keys (its usage records stay); False if there was none."""

    @abstractmethod
    async def set_limits(self, name: str, limits: Limits) -> bool: ...

    # Keys (by hash only).
    @abstractmethod
    async def add_key(self, tenant: str, key_hash: str, name: str) -> KeyInfo: ...

    @abstractmethod
    async def list_keys(self, tenant: str) -> list[KeyInfo]: ...

    @abstractmethod
    async def revoke_key(self, tenant: str, key_id: str) -> bool: ...

    @abstractmethod
    async def authenticate(self, key_hash: str) -> str | None:
        """The tenant a key hash belongs to, or None."""

    # The adapter registry.
    @abstractmethod
    async def put_adapter(self, adapter: Adapter) -> None: ...

    @abstractmethod
    async def get_adapter(self, adapter_id: str) -> Adapter | None: ...

    @abstractmethod
    async def list_adapters(self) -> list[Adapter]: ...

    @abstractmethod
    async def delete_adapter(self, adapter_id: str) -> bool: ...

    async def accessible_adapters(self, tenant: str) -> list[str]:
        """Ids of the adapters ``tenant`` may use, sorted."""
        return sorted(a.id for a in await self.list_adapters() if may_use(tenant, a))

    # One request: admission (key, access, limits in one atomic step), then settlement.
    @abstractmethod
    async def admit(self, key_hash: str, adapter: str | None, tokens: int,
                    request_id: str) -> Admission:
        """Authenticate, check access to ``adapter`` and take from the tenant's limits."""

    @abstractmethod
    async def settle(self, done: list[Settlement]) -> None:
        """For each request: give back the unused reservation, free its concurrency slot, and
        meter it if ``metered`` (a batch, so a busy gateway settles many in one round trip)."""

    @abstractmethod
    async def usage(self, tenant: str) -> dict[str, Usage]:
        """Usage per model of one tenant."""

    async def all_usage(self) -> dict[str, dict[str, Usage]]:
        """Usage per model of every tenant."""
        return {t.name: await self.usage(t.name) for t in await self.list_tenants()}
