"""The node agent's HTTP API: put (pull from S3, verify, cache, register), list and evict."""

from __future__ import annotations

import asyncio
import logging
import shutil
from typing import Any

import aiohttp
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from loraplane.engine.adapter_format import (
    CONFIG_FILE,
    MAX_CONFIG_BYTES,
    PICKLE_SUFFIXES,
    WEIGHTS_FILE,
)
from loraplane.operator import s3
from loraplane.operator.node_agent.cache import AdapterCache, CapacityError, Entry, check_key
from loraplane.operator.node_agent.engines import EngineClient, EngineRefused, EngineUnavailable
from loraplane.operator.plan import build_engine_name

log = logging.getLogger("loraplane.node_agent")


class Rejected(Exception):
    """The adapter can never be cached as it is (HTTP 422); reason goes into the CR's status."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class SourceBody(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="forbid")
    uri: str
    endpoint: str | None = None
    region: str | None = None
    access_key_id: str | None = Field(default=None, alias="accessKeyId")
    secret_access_key: str | None = Field(default=None, alias="secretAccessKey")


class PutBody(BaseModel):
    """PUT /v1/adapters/{namespace}/{name}/{version}."""

    model_config = ConfigDict(extra="forbid")
    source: SourceBody
    sha256: str | None = Field(default=None, pattern=r"^[a-f0-9]{64}$")


def _error(status: int, reason: str, message: str) -> web.Response:
    return web.json_response({"reason": reason, "message": message}, status=status)


def _entry_json(e: Entry, engines: list[str]) -> dict[str, Any]:
    return {"namespace": e.namespace, "name": e.name, "version": e.version, "bytes": e.bytes,
            "sha256": e.sha256, "path": e.path,
            "engineName": build_engine_name(e.namespace, e.name, e.version), "engines": engines}


class NodeAgent:
    """State of one agent: its cache, its engines, and a lock per adapter version."""

    def __init__(self, node: str, labels: dict[str, str], cache: AdapterCache,
                 engine_urls: list[str], max_adapter_bytes: int) -> None:
        self.node = node
        self.labels = labels
        self.cache = cache
        self.engine_urls = engine_urls
        self.max_adapter_bytes = max_adapter_bytes
        self.engines: list[EngineClient] = []
        self._locks: dict[tuple[str, str, str], asyncio.Lock] = {}
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        """Open clients, rebuild the index from disk and re-register what is cached."""
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
        self.engines = [EngineClient(u, self._session) for u in self.engine_urls]
        entries, removed = await asyncio.to_thread(self.cache.recover)
        log.info("recovered %d cached adapters (%d bytes), removed %d partial folders",
                 len(entries), self.cache.used_bytes, removed)
        await self.sync_engines()

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def sync_engines(self) -> None:
        """Register every cached adapter with every engine missing it (after either restarts)."""
        for engine in self.engines:
            try:
                _, present = await engine.models()
                for e in self.cache.entries():
                    name = build_engine_name(*e.key)
                    if name not in present:
                        await engine.load(name, e.path)
                        log.info("re-registered %s with %s", name, engine.url)
            except EngineUnavailable as err:
                log.warning("engine sync: %s", err)
            except EngineRefused as err:
                log.error("engine sync: refused: %s", err)

    async def info(self) -> dict[str, Any]:
        base: set[str] = set()
        healthy = []
        for engine in self.engines:
            try:
                models, _ = await engine.models()
                base.update(models)
                healthy.append(engine.url)
            except EngineUnavailable:
                pass
        return {"node": self.node, "labels": self.labels, "baseModels": sorted(base),
                "engines": healthy, "capacityBytes": self.cache.capacity_bytes,
                "usedBytes": self.cache.used_bytes, "adapters": len(self.cache.entries())}

    def _fetch(self, key: tuple[str, str, str], body: PutBody) -> tuple[Entry, list[Entry]]:
        """Download into a partial folder, verify, commit (blocking: runs in a thread)."""
        try:
            bucket, prefix = s3.parse_uri(body.source.uri)
        except ValueError as e:
            raise Rejected("InvalidSource", str(e)) from None
        loc = s3.S3Location(bucket, prefix, body.source.endpoint, body.source.region,
                            body.source.access_key_id, body.source.secret_access_key)
        partial = self.cache.new_partial()
        try:
            try:
                with open(partial / WEIGHTS_FILE, "wb") as f:
                    size, sha = s3.copy_to(loc, WEIGHTS_FILE, f, self.max_adapter_bytes)
            except s3.SourceError as e:
                if e.reason == "ObjectNotFound":
                    pickles = [n for n in s3.list_names(loc) if n.endswith(PICKLE_SUFFIXES)]
                    if pickles:
                        raise Rejected("PickleRefused", f"only pickled weights found "
                                                        f"({', '.join(pickles[:5])})") from None
                raise
            if body.sha256 and sha != body.sha256:
                raise Rejected("ChecksumMismatch", f"{WEIGHTS_FILE} has sha256 {sha}, the spec "
                                                   f"asks for {body.sha256}")
            with open(partial / CONFIG_FILE, "wb") as f:
                s3.copy_to(loc, CONFIG_FILE, f, MAX_CONFIG_BYTES)
            return self.cache.commit(key, partial, size, sha)
        except s3.SourceError as e:
            if not e.transient:
                raise Rejected(e.reason, e.message) from None
            raise
        except CapacityError as e:
            raise Rejected("CapacityExceeded", str(e)) from None
        finally:
            shutil.rmtree(partial, ignore_errors=True)  # gone already after a commit

    async def put(self, key: tuple[str, str, str], body: PutBody) -> dict[str, Any]:
        """Cache the version (once) and register it with every engine of the node."""
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            entry = self.cache.get(key)
            if entry is None:
                entry, evicted = await asyncio.to_thread(self._fetch, key, body)
                log.info("cached %s/%s@%s (%d bytes)", *key, entry.bytes)
                for old in evicted:
                    log.info("evicted %s/%s@%s (LRU)", *old.key)
                    await self._unload(old)
            self.cache.touch(key)
            name = build_engine_name(*key)
            try:
                for engine in self.engines:
                    await engine.load(name, entry.path)
            except EngineRefused as e:
                await self._unload(entry)
                self.cache.evict(*key)
                raise Rejected("InvalidAdapter", str(e)) from None
            return _entry_json(entry, [e.url for e in self.engines])

    async def check(self, key: tuple[str, str, str]) -> dict[str, Any] | None:
        """One cached version and the engines that serve it now (None when not cached)."""
        entry = self.cache.get(key)
        if entry is None:
            return None
        name = build_engine_name(*key)
        serving: list[str] = []
        missing: list[str] = []
        for engine in self.engines:
            try:
                _, present = await engine.models()
            except EngineUnavailable:
                present = []
            (serving if name in present else missing).append(engine.url)
        return _entry_json(entry, serving) | {"missingEngines": missing}

    async def _unload(self, entry: Entry) -> None:
        name = build_engine_name(*entry.key)
        for engine in self.engines:
            await engine.unload(name)

    async def evict(self, namespace: str, name: str, version: str | None) -> list[str]:
        """Unregister from every engine, then delete the cached folders."""
        versions = [e for e in self.cache.entries()
                    if e.key[:2] == (namespace, name) and version in (None, e.version)]
        for e in versions:
            await self._unload(e)
            self.cache.evict(*e.key)
            log.info("evicted %s/%s@%s", *e.key)
        return [e.version for e in versions]


AGENT = web.AppKey("agent", NodeAgent)


async def _health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _info(request: web.Request) -> web.Response:
    """GET /v1/info: node name, labels, base models its engines serve, cache capacity."""
    return web.json_response(await request.app[AGENT].info())


async def _list(request: web.Request) -> web.Response:
    """GET /v1/adapters: every cached adapter version, least recently used first."""
    agent = request.app[AGENT]
    urls = [e.url for e in agent.engines]
    return web.json_response({"adapters": [_entry_json(e, urls) for e in agent.cache.entries()]})


async def _get(request: web.Request) -> web.Response:
    """GET /v1/adapters/{namespace}/{name}/{version}: cached? and which engines serve it now."""
    m = request.match_info
    try:
        key = check_key(m["namespace"], m["name"], m["version"])
    except ValueError as e:
        return _error(400, "BadRequest", str(e))
    found = await request.app[AGENT].check(key)
    if found is None:
        return _error(404, "NotCached", f"{'/'.join(key)} is not cached on this node")
    return web.json_response(found)


async def _put(request: web.Request) -> web.Response:
    """PUT /v1/adapters/{namespace}/{name}/{version}: cache from S3 and register with engines."""
    agent = request.app[AGENT]
    m = request.match_info
    try:
        key = check_key(m["namespace"], m["name"], m["version"])
        body = PutBody.model_validate(await request.json())
    except (ValueError, ValidationError) as e:
        return _error(400, "BadRequest", str(e))
    try:
        return web.json_response(await agent.put(key, body))
    except Rejected as e:
        return _error(422, e.reason, e.message)
    except s3.SourceError as e:
        return _error(503, e.reason, e.message)
    except EngineUnavailable as e:
        return _error(503, "EngineUnavailable", str(e))


async def _delete(request: web.Request) -> web.Response:
    """DELETE /v1/adapters/{namespace}/{name}[?version=v]: unregister and evict."""
    agent = request.app[AGENT]
    m = request.match_info
    version = request.query.get("version")
    try:
        check_key(m["namespace"], m["name"], version or "000000")
        return web.json_response({"evicted": await agent.evict(m["namespace"], m["name"],
                                                               version)})
    except ValueError as e:
        return _error(400, "BadRequest", str(e))
    except EngineUnavailable as e:
        return _error(503, "EngineUnavailable", str(e))


def build_app(agent: NodeAgent, resync_seconds: float) -> web.Application:
    """The aiohttp application, with the agent started and stopped with it."""
    app = web.Application()
    app[AGENT] = agent
    app.router.add_get("/healthz", _health)
    app.router.add_get("/v1/info", _info)
    app.router.add_get("/v1/adapters", _list)
    app.router.add_get("/v1/adapters/{namespace}/{name}/{version}", _get)
    app.router.add_put("/v1/adapters/{namespace}/{name}/{version}", _put)
    app.router.add_delete("/v1/adapters/{namespace}/{name}", _delete)

    async def lifecycle(app: web.Application) -> Any:
        await agent.start()

        async def resync() -> None:
            while True:
                await asyncio.sleep(resync_seconds)
                await agent.sync_engines()

        task = asyncio.create_task(resync())
        yield
        task.cancel()
        await agent.stop()

    app.cleanup_ctx.append(lifecycle)
    return app


