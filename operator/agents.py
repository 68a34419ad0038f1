"""The operator's side of the node agents: discovery (cached briefly), put, evict, list."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import Any

import aiohttp

from loraplane.operator.errors import ConditionError
from loraplane.operator.plan import AgentInfo

log = logging.getLogger("loraplane.operator.agents")


class AgentError(ConditionError):
    """A node agent's answer about an adapter; the message names the node."""

    def __init__(self, node: str, reason: str, message: str) -> None:
        super().__init__(reason, message)
        self.args = (f"{node}: {message}",)
        self.node = node


class AgentRejected(AgentError):
    """An agent refused the adapter for good (HTTP 422): bad checksum, pickle, capacity..."""


class AgentUnavailable(AgentError):
    """An agent did not answer, or could not reach S3 or its engines: retry later."""


class AgentDirectory:
    """Finds agents from static URLs and/or a headless Service's DNS name; talks to them."""

    def __init__(self, urls: list[str], service: str | None, ttl: float = 3.0) -> None:
        self.urls = [u.rstrip("/") for u in urls]
        self.service = service  # host:port of a headless Service: one A record per agent pod
        self.ttl = ttl
        self._cache: tuple[float, list[AgentInfo]] = (0.0, [])
        self._lock = asyncio.Lock()
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=120, sock_connect=3),
                connector=aiohttp.TCPConnector(limit=64))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def _candidate_urls(self) -> list[str]:
        urls = list(self.urls)
        if self.service:
            host, _, port = self.service.rpartition(":")
            try:
                infos = await asyncio.get_running_loop().getaddrinfo(
                    host, int(port), type=socket.SOCK_STREAM)
                urls += sorted({f"http://{i[4][0]}:{port}" for i in infos})
            except OSError as e:
                log.warning("cannot resolve agent service %s: %s", self.service, e)
        return urls

    async def _info(self, url: str) -> AgentInfo | None:
        try:
            async with self.session.get(f"{url}/v1/info",
                                        timeout=aiohttp.ClientTimeout(total=5)) as r:
                d = await r.json()
            return AgentInfo(node=str(d["node"]), url=url, labels=dict(d.get("labels", {})),
                             base_models=tuple(d.get("baseModels", [])),
                             engines=tuple(d.get("engines", [])),
                             capacity_bytes=int(d.get("capacityBytes", 0)),
                             used_bytes=int(d.get("usedBytes", 0)))
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError) as e:
            log.info("agent %s unavailable: %r", url, e)
            return None

    async def discover(self) -> list[AgentInfo]:
        """Agents that answer now (cached for ttl seconds: a thousand reconciles ask at once)."""
        async with self._lock:
            at, agents = self._cache
            if time.monotonic() - at < self.ttl:
                return agents
            found = await asyncio.gather(*(self._info(u) for u in await self._candidate_urls()))
            agents = [a for a in found if a is not None]
            self._cache = (time.monotonic(), agents)
            return agents

    def forget(self) -> None:
        """Drop the discovery cache (after an agent failed)."""
        self._cache = (0.0, [])

    async def put(self, agent: AgentInfo, namespace: str, name: str, version: str,
                  body: dict[str, Any]) -> dict[str, Any]:
        """Ask one agent to cache and register a version; returns its entry."""
        url = f"{agent.url}/v1/adapters/{namespace}/{name}/{version}"
        try:
            async with self.session.put(url, json=body) as r:
                data = await r.json(content_type=None)
                status = r.status
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            self.forget()
            raise AgentUnavailable(agent.node, "AgentUnavailable", repr(e)) from None
        if status == 200:
            return dict(data)
        reason = str(data.get("reason", "AgentError")) if isinstance(data, dict) else "AgentError"
        message = str(data.get("message", data)) if isinstance(data, dict) else str(data)
        if status in (400, 422):
            raise AgentRejected(agent.node, reason, message)
        raise AgentUnavailable(agent.node, reason, message)

    async def evict(self, agent: AgentInfo, namespace: str, name: str,
                    version: str | None = None) -> list[str]:
        """Ask one agent to unregister and delete a version (or every version)."""
        url = f"{agent.url}/v1/adapters/{namespace}/{name}"
        params = {"version": version} if version else {}
        try:
            async with self.session.delete(url, params=params) as r:
                data = await r.json(content_type=None)
                if r.status != 200:
                    raise AgentUnavailable(agent.node, str(data.get("reason", "AgentError")),
                                           str(data.get("message", data)))
                return list(data.get("evicted", []))
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            self.forget()
            raise AgentUnavailable(agent.node, "AgentUnavailable", repr(e)) from None

    async def held(self, agent: AgentInfo, namespace: str, name: str, version: str) -> str:
        """Whether one agent still holds a version: "Loaded" (cached, every engine serves it)
        or "Lost"; raises AgentUnavailable when it does not answer."""
        url = f"{agent.url}/v1/adapters/{namespace}/{name}/{version}"
        try:
            async with self.session.get(url, timeout=aiohttp.ClientTimeout(total=10)) as r:
                if r.status == 404:
                    return "Lost"
                data = await r.json(content_type=None)
                status = r.status
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            self.forget()
            raise AgentUnavailable(agent.node, "AgentUnavailable", repr(e)) from None
        if status != 200 or not isinstance(data, dict):
            raise AgentUnavailable(agent.node, "AgentError", f"HTTP {status}: {data}")
        return "Lost" if data.get("missingEngines") else "Loaded"

    async def cached(self, agent: AgentInfo) -> list[dict[str, Any]]:
        """What one agent holds now."""
        try:
            async with self.session.get(f"{agent.url}/v1/adapters") as r:
                return list((await r.json())["adapters"])
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError) as e:
            raise AgentUnavailable(agent.node, "AgentUnavailable", repr(e)) from None
