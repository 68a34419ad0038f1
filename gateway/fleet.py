"""The engine replicas behind this gateway: their residency, load and health, kept fresh.

Each replica's ``GET /residency`` is read every ``poll_interval_s``; a failed read or a failed
connection from the proxy takes the replica out of rotation at once, and the next good read
brings it back. Replicas come from the static ``--engine`` list and, when a label selector is
set, from Kubernetes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

import aiohttp

from loraplane.gateway.discovery import KubernetesDiscovery

logger = logging.getLogger(__name__)

UNIX_PREFIX = "unix://"  # unix:///path/to/engine.sock: an engine on a Unix socket


@dataclass(eq=False)
class Replica:
    """One engine process as the router sees it."""

    url: str
    session: aiohttp.ClientSession
    base: str  # prefix of request URLs
    healthy: bool = False
    model: str = ""
    max_model_len: int = 0
    tiers: dict[str, str] = field(default_factory=dict)  # adapter -> "gpu" | "host" | "source"
    reported_load: int = 0  # running + waiting at the last report
    in_flight: int = 0  # requests this gateway has open on it now
    in_flight_at_report: int = 0
    last_report: float = 0.0

    @property
    def load(self) -> int:
        """Reported load plus what this gateway sent since the report."""
        return max(0, self.reported_load + self.in_flight - self.in_flight_at_report)

    def apply_report(self, report: dict) -> None:
        """Take in one /residency answer."""
        self.model = str(report["model"])
        self.max_model_len = int(report.get("max_model_len") or 0)
        self.tiers = {a["name"]: a["tier"] for a in report.get("adapters", [])}
        load = report.get("load") or {}
        self.reported_load = int(load.get("running", 0)) + int(load.get("waiting", 0))
        self.in_flight_at_report = self.in_flight
        self.last_report = time.monotonic()
        self.healthy = True


def _session(url: str, connect_timeout_s: float) -> tuple[aiohttp.ClientSession, str]:
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout_s)
    if url.startswith(UNIX_PREFIX):
        connector: aiohttp.BaseConnector = aiohttp.UnixConnector(path=url[len(UNIX_PREFIX):],
                                                                 limit=0)
        base = "http://localhost"
    else:
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=60)
        base = url.rstrip("/")
    # The gateway relays bodies as they are: no automatic decompression.
    return aiohttp.ClientSession(connector=connector, timeout=timeout,
                                 auto_decompress=False), base


class Fleet:
    """The replica set, polled in the background while the app runs."""

    def __init__(self, static_urls: list[str], discovery: KubernetesDiscovery | None = None,
                 poll_interval_s: float = 1.0, discovery_interval_s: float = 5.0,
                 connect_timeout_s: float = 2.0) -> None:
        self.static_urls = list(dict.fromkeys(static_urls))
        self.discovery = discovery
        self.poll_interval_s = poll_interval_s
        self.discovery_interval_s = discovery_interval_s
        self.connect_timeout_s = connect_timeout_s
        self.replicas: dict[str, Replica] = {}
        self._task: asyncio.Task[None] | None = None
        self._api_session: aiohttp.ClientSession | None = None

    def healthy(self) -> list[Replica]:
        """Replicas in rotation."""
        return [r for r in self.replicas.values() if r.healthy]

    def base_models(self) -> set[str]:
        """Base models a replica in rotation serves (what /v1/models lists)."""
        return {r.model for r in self.healthy()}

    def known_models(self) -> set[str]:
        """Base models of every replica that ever reported, in rotation or not: a request for
        one whose replicas are all down is a 503 to retry, not a 404."""
        return {r.model for r in self.replicas.values() if r.model}

    def max_model_len(self) -> int:
        return max((r.max_model_len for r in self.healthy()), default=0)

    def mark_down(self, replica: Replica, reason: object) -> None:
        """Take a replica out of rotation until its next good report."""
        if replica.healthy:
            logger.warning("engine %s out of rotation: %s", replica.url, reason)
        replica.healthy = False

    async def start(self) -> None:
        """Read every replica once, then keep polling in the background."""
        await self._sync_urls(self.static_urls)
        if self.discovery is not None:
            self._api_session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
            await self._discover()
        await self.poll_once()
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for r in self.replicas.values():
            await r.session.close()
        if self._api_session is not None:
            await self._api_session.close()

    async def poll_once(self) -> None:
        """Read /residency of every replica now."""
        await asyncio.gather(*(self._poll(r) for r in list(self.replicas.values())))

    async def _run(self) -> None:
        last_discovery = time.monotonic()
        while True:
            await asyncio.sleep(self.poll_interval_s)
            if self.discovery is not None and (
                    time.monotonic() - last_discovery >= self.discovery_interval_s):
                last_discovery = time.monotonic()
                await self._discover()
            await self.poll_once()

    async def _discover(self) -> None:
        assert self.discovery is not None and self._api_session is not None
        try:
            found = await self.discovery.endpoints(self._api_session)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
            logger.warning("Kubernetes discovery failed (keeping the last list): %s", e)
            return
        await self._sync_urls(self.static_urls + found)

    async def _sync_urls(self, urls: list[str]) -> None:
        wanted = dict.fromkeys(urls)
        for url in list(self.replicas):
            if url not in wanted:
                logger.info("engine %s removed", url)
                await self.replicas.pop(url).session.close()
        for url in wanted:
            if url not in self.replicas:
                session, base = _session(url, self.connect_timeout_s)
                self.replicas[url] = Replica(url=url, session=session, base=base)

    async def _poll(self, r: Replica) -> None:
        timeout = aiohttp.ClientTimeout(total=max(self.poll_interval_s, 1.0) * 2)
        try:
            async with r.session.get(r.base + "/residency", timeout=timeout) as resp:
                if resp.status != 200:
                    self.mark_down(r, f"/residency answered {resp.status}")
                    return
                report = await resp.json()
            was_healthy = r.healthy
            r.apply_report(report)
            if not was_healthy:
                logger.info("engine %s in rotation (%s, %d adapters)", r.url, r.model,
                            len(r.tiers))
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError,
                TypeError) as e:
            self.mark_down(r, f"{type(e).__name__}: {e}")
