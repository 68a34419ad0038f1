"""An in-process store for one process (`loraplane serve --tenants FILE`): no Redis.

Every method runs without awaiting, so each is atomic on the event loop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from loraplane.gateway.keys import new_key_id, same_hash
from loraplane.gateway.limits import Admission, Outcome, Settlement, refill, wait_ms
from loraplane.gateway.schemas import Adapter, KeyInfo, Limits, Tenant, Usage
from loraplane.gateway.store.base import Store, may_use


@dataclass
class _Bucket:
    level: float | None = None
    last_ms: float | None = None


@dataclass
class _TenantState:
    tenant: Tenant
    keys: dict[str, tuple[str, KeyInfo]] = field(default_factory=dict)  # id -> (hash, info)
    requests: _Bucket = field(default_factory=_Bucket)
    tokens: _Bucket = field(default_factory=_Bucket)
    in_flight: dict[str, float] = field(default_factory=dict)  # request id -> lease end (ms)


class MemoryStore(Store):
    """Tenants, keys and limits in this process's memory."""

    def __init__(self, concurrency_lease_s: float = 600.0) -> None:
        self._tenants: dict[str, _TenantState] = {}
        self._key_owner: dict[str, tuple[str, str]] = {}  # key hash -> (tenant, key id)
        self._adapters: dict[str, Adapter] = {}
        self._usage: dict[str, dict[str, Usage]] = {}
        self._lease_ms = concurrency_lease_s * 1000

    async def close(self) -> None:
        return None

    async def ping(self) -> None:
        return None

    async def create_tenant(self, name: str, limits: Limits) -> Tenant | None:
        if name in self._tenants:
            return None
        tenant = Tenant(name=name, created=int(time.time()), limits=limits)
        self._tenants[name] = _TenantState(tenant)
        return tenant

    async def get_tenant(self, name: str) -> Tenant | None:
        state = self._tenants.get(name)
        return state.tenant if state else None

    async def list_tenants(self) -> list[Tenant]:
        return [s.tenant for _, s in sorted(self._tenants.items())]

    async def delete_tenant(self, name: str) -> bool:
        state = self._tenants.pop(name, None)
        if state is None:
            return False
        for key_hash, _ in state.keys.values():
            self._key_owner.pop(key_hash, None)
        return True

    async def set_limits(self, name: str, limits: Limits) -> bool:
        state = self._tenants.get(name)
        if state is None:
            return False
        state.tenant = state.tenant.model_copy(update={"limits": limits})
        return True

    async def add_key(self, tenant: str, key_hash: str, name: str) -> KeyInfo:
        info = KeyInfo(id=new_key_id(), name=name, created=int(time.time()))
        self._tenants[tenant].keys[info.id] = (key_hash, info)
        self._key_owner[key_hash] = (tenant, info.id)
        return info

    async def list_keys(self, tenant: str) -> list[KeyInfo]:
        state = self._tenants.get(tenant)
        return [info for _, info in state.keys.values()] if state else []

    async def revoke_key(self, tenant: str, key_id: str) -> bool:
        state = self._tenants.get(tenant)
        entry = state.keys.pop(key_id, None) if state else None
        if entry is None:
            return False
        self._key_owner.pop(entry[0], None)
        return True

    async def authenticate(self, key_hash: str) -> str | None:
        owner = self._key_owner.get(key_hash)
        if owner is None:
            return None
        state = self._tenants[owner[0]]
        return owner[0] if same_hash(state.keys[owner[1]][0], key_hash) else None

    async def put_adapter(self, adapter: Adapter) -> None:
        self._adapters[adapter.id] = adapter

    async def get_adapter(self, adapter_id: str) -> Adapter | None:
        return self._adapters.get(adapter_id)

    async def list_adapters(self) -> list[Adapter]:
        return [a for _, a in sorted(self._adapters.items())]

    async def delete_adapter(self, adapter_id: str) -> bool:
        return self._adapters.pop(adapter_id, None) is not None

    async def admit(self, key_hash: str, adapter: str | None, tokens: int,
                    request_id: str) -> Admission:
        tenant = await self.authenticate(key_hash)
        if tenant is None:
            return Admission(Outcome.UNAUTHORIZED)
        engine_name = ""
        if adapter is not None:
            record = self._adapters.get(adapter)
            if record is None or not may_use(tenant, record):
                return Admission(Outcome.NOT_FOUND, tenant)
            engine_name = record.served_as
        state = self._tenants[tenant]
        limits = state.tenant.limits
        now = time.monotonic() * 1000
        a = Admission(Outcome.OK, tenant, limit_requests=limits.requests_per_minute,
                      limit_tokens=limits.tokens_per_minute, engine_name=engine_name)
        retry = 0.0
        if limits.requests_per_minute:
            cap = limits.requests_per_minute
            a.remaining_requests = refill(state.requests.level, state.requests.last_ms, now, cap)
            if a.remaining_requests < 1:
                a.reason = "requests"
                retry = wait_ms(a.remaining_requests, 1, cap)
        if limits.tokens_per_minute:
            cap = limits.tokens_per_minute
            a.remaining_tokens = refill(state.tokens.level, state.tokens.last_ms, now, cap)
            if tokens > cap:
                a.reason = a.reason or "too_large"
            elif a.remaining_tokens < tokens:
                a.reason = a.reason or "tokens"
                retry = max(retry, wait_ms(a.remaining_tokens, tokens, cap))
        if limits.max_concurrent_requests:
            live = {r: end for r, end in state.in_flight.items() if end > now}
            state.in_flight = live
            if len(live) >= limits.max_concurrent_requests:
                a.reason = a.reason or "concurrency"
                retry = max(retry, 1000.0)
        if a.reason:
            a.outcome = Outcome.LIMITED
            a.retry_after_s = retry / 1000
            return a
        if limits.requests_per_minute:
            a.remaining_requests -= 1
            state.requests = _Bucket(a.remaining_requests, now)
        if limits.tokens_per_minute:
            a.remaining_tokens -= tokens
            state.tokens = _Bucket(a.remaining_tokens, now)
        if limits.max_concurrent_requests:
            state.in_flight[request_id] = now + self._lease_ms
        return a

    async def settle(self, done: list[Settlement]) -> None:
        for d in done:
            state = self._tenants.get(d.tenant)
            if state is not None:
                state.in_flight.pop(d.request_id, None)
                cap = state.tenant.limits.tokens_per_minute
                if cap and state.tokens.level is not None:
                    refund = d.reserved - d.prompt_tokens - d.completion_tokens
                    state.tokens.level = min(float(cap), state.tokens.level + refund)
            if d.metered:
                usage = self._usage.setdefault(d.tenant, {}).setdefault(d.model, Usage())
                usage.requests += 1
                usage.prompt_tokens += d.prompt_tokens
                usage.completion_tokens += d.completion_tokens

    async def usage(self, tenant: str) -> dict[str, Usage]:
        return {m: u.model_copy() for m, u in sorted(self._usage.get(tenant, {}).items())}
