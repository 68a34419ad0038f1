"""The gateway's adapter registry, written through the gateway's own store; without Redis, a log
line instead.

The record format belongs to ``loraplane.gateway.store`` (see schemas.AdapterRecord): the
operator puts one ``Adapter`` per Ready ``LoraAdapter`` and deletes it when the resource goes.
"""

from __future__ import annotations

import logging

from redis.exceptions import RedisError

from loraplane.gateway.schemas import Adapter
from loraplane.gateway.store.base import Store

log = logging.getLogger("loraplane.operator.registry")

REDIS_TIMEOUT_S = 5.0


class RegistryUnavailable(Exception):
    """Redis is configured but did not answer: retry later."""


class Registry:
    """Where the gateway learns which adapters are Ready, for whom, and under which name."""

    def __init__(self, store: Store | None) -> None:
        self.store = store

    async def put(self, adapter: Adapter) -> None:
        """Publish (or replace) an adapter's record."""
        if self.store is None:
            log.info("no Redis configured: skipping the record of %s", adapter.id)
            return
        try:
            await self.store.put_adapter(adapter)
        except (RedisError, OSError) as e:
            raise RegistryUnavailable(f"redis: {e}") from None

    async def remove(self, adapter_id: str) -> None:
        """Drop an adapter's record (gone already is fine)."""
        if self.store is None:
            log.info("no Redis configured: skipping the removal of %s", adapter_id)
            return
        try:
            await self.store.delete_adapter(adapter_id)
        except (RedisError, OSError) as e:
            raise RegistryUnavailable(f"redis: {e}") from None

    async def close(self) -> None:
        if self.store is not None:
            await self.store.close()


def make_registry(url: str | None) -> Registry:
    """A registry over the gateway's RedisStore for a redis:// URL, else one that only logs."""
    if not url:
        return Registry(None)
    from loraplane.gateway.store.redis import RedisStore

    return Registry(RedisStore(url, timeout_s=REDIS_TIMEOUT_S))
