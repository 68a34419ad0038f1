"""The adapter records the gateway reads from Redis; without Redis, a log line instead.

Key ``loraplane:adapter:<namespace>/<name>`` holds one JSON document (see plan.build_record);
the set ``loraplane:adapters`` lists every ``<namespace>/<name>`` that has a record.
"""

from __future__ import annotations

import json
import logging
from abc import ABC, abstractmethod
from typing import Any

log = logging.getLogger("loraplane.operator.registry")

KEY_PREFIX = "loraplane:adapter:"
INDEX_KEY = "loraplane:adapters"


class RegistryUnavailable(Exception):
    """Redis is configured but did not answer: retry later."""


class Registry(ABC):
    """Where the gateway learns which adapters are Ready, for whom, and on which engines."""

    @abstractmethod
    async def put(self, record: dict[str, Any]) -> None: ...

    @abstractmethod
    async def remove(self, namespace: str, name: str) -> None: ...

    async def close(self) -> None:
        return None


class NullRegistry(Registry):
    """No Redis configured: records are only logged."""

    async def put(self, record: dict[str, Any]) -> None:
        log.info("no Redis configured: skipping the record of %s/%s", record["namespace"],
                 record["name"])

    async def remove(self, namespace: str, name: str) -> None:
        log.info("no Redis configured: skipping the removal of %s/%s", namespace, name)


class RedisRegistry(Registry):
    """Records as JSON strings in Redis."""

    def __init__(self, url: str) -> None:
        import redis.asyncio as aioredis

        self._redis = aioredis.from_url(url, socket_connect_timeout=3, socket_timeout=5)
        self._errors: tuple[type[Exception], ...] = (aioredis.RedisError, OSError)

    async def put(self, record: dict[str, Any]) -> None:
        ref = f"{record['namespace']}/{record['name']}"
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.set(KEY_PREFIX + ref, json.dumps(record, sort_keys=True))
                pipe.sadd(INDEX_KEY, ref)
                await pipe.execute()
        except self._errors as e:
            raise RegistryUnavailable(f"redis: {e}") from None

    async def remove(self, namespace: str, name: str) -> None:
        ref = f"{namespace}/{name}"
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(KEY_PREFIX + ref)
                pipe.srem(INDEX_KEY, ref)
                await pipe.execute()
        except self._errors as e:
            raise RegistryUnavailable(f"redis: {e}") from None

    async def close(self) -> None:
        await self._redis.aclose()


def make_registry(url: str | None) -> Registry:
    """RedisRegistry for a redis:// URL, else NullRegistry."""
    return RedisRegistry(url) if url else NullRegistry()
