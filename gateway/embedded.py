"""`loraplane serve --tenants FILE`: the gateway's auth, access and limits in the engine's process.

The engine's HTTP API listens on a Unix socket in a private temporary folder (so nothing reaches
it around the gateway), and the gateway, with an in-memory store filled from FILE, serves the
public port and relays to it, the same code path as in a fleet. FILE (YAML)::

    tenants:
      acme:
        keys: [<sha256 hex of a key>]      # `loraplane tenants new-key` prints a key and its hash
        limits: {requests_per_minute: 60, tokens_per_minute: 20000, max_concurrent_requests: 4}
    adapters:
      acme/poet: {path: adapters/poet, public: false, shared_with: [beta]}

Adapter paths are relative to FILE's folder; each is loaded under its id. Admin API changes
(with LORAPLANE_GATEWAY_ADMIN_TOKEN set) last until the process ends.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import uvicorn
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from loraplane.gateway.main import build_app
from loraplane.gateway.schemas import TENANT_PATTERN, Adapter, AdapterAccess, Limits
from loraplane.gateway.settings import Settings
from loraplane.gateway.store.memory import MemoryStore

logger = logging.getLogger(__name__)


class TenantEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: list[str] = Field(default_factory=list)
    limits: Limits = Field(default_factory=Limits)


class AdapterEntry(AdapterAccess):
    model_config = ConfigDict(extra="forbid")

    path: Path | None = None


class TenantsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenants: dict[str, TenantEntry] = Field(default_factory=dict)
    adapters: dict[str, AdapterEntry] = Field(default_factory=dict)


def read_tenants_file(path: Path) -> TenantsFile:
    """Parse and check FILE; SystemExit with the reason if it is wrong."""
    try:
        spec = TenantsFile.model_validate(yaml.safe_load(path.read_text()) or {})
    except (OSError, yaml.YAMLError, ValidationError) as e:
        raise SystemExit(f"loraplane: cannot use --tenants {path}: {e}") from None
    for name, entry in spec.tenants.items():
        if not re.fullmatch(TENANT_PATTERN, name):
            raise SystemExit(f"loraplane: --tenants {path}: {name!r} is not a valid tenant name")
        for h in entry.keys:
            if not re.fullmatch(r"[0-9a-f]{64}", h):
                raise SystemExit(f"loraplane: --tenants {path}: tenant {name!r} has a key that "
                                 "is not a SHA-256 hex hash (see `loraplane tenants new-key`)")
    for adapter_id, a in spec.adapters.items():
        if "/" not in adapter_id:
            raise SystemExit(f"loraplane: --tenants {path}: adapter {adapter_id!r} must be "
                             "named <tenant>/<adapter>")
        if a.path is not None and not a.path.is_absolute():
            a.path = path.parent / a.path
    return spec


async def fill_store(store: MemoryStore, spec: TenantsFile) -> None:
    """Put the file's tenants, key hashes, limits and adapter sharing into ``store``."""
    for name, entry in spec.tenants.items():
        await store.create_tenant(name, entry.limits)
        for i, key_hash in enumerate(entry.keys):
            await store.add_key(name, key_hash, f"file key {i}")
    for adapter_id, a in spec.adapters.items():
        await store.put_adapter(Adapter(id=adapter_id, public=a.public,
                                        shared_with=a.shared_with))


class _InnerServer(uvicorn.Server):
    """A uvicorn server that leaves signal handling to the outer (gateway) server."""

    def capture_signals(self) -> Any:
        return contextlib.nullcontext()


def serve_embedded(engine: Any, args: argparse.Namespace) -> int:
    """Serve ``engine`` (an LLMEngine) behind the gateway, tenants from ``args.tenants``."""
    from loraplane.engine.async_engine import AsyncEngine
    from loraplane.engine.errors import EngineError
    from loraplane.engine.server.api import build_app as build_engine_app

    spec = read_tenants_file(args.tenants)
    for adapter_id, a in spec.adapters.items():
        if a.path is not None:
            try:
                engine.load_adapter(adapter_id, str(a.path))
            except EngineError as e:
                logger.error("skipping adapter %s from %s: %s", adapter_id, a.path, e.message)
    engine_app = build_engine_app(AsyncEngine(engine))
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(_serve(engine_app, spec, args.host, args.port, args.log_level))
    return 0


async def _serve(engine_app: Any, spec: TenantsFile, host: str, port: int,
                 log_level: str) -> None:
    folder = Path(tempfile.mkdtemp(prefix="loraplane-"))  # mode 0700: only this user
    sock = folder / "engine.sock"
    inner = _InnerServer(uvicorn.Config(engine_app, uds=str(sock), log_level="warning",
                                        access_log=False, timeout_graceful_shutdown=10))
    inner_task = asyncio.create_task(inner.serve())
    try:
        while not inner.started:
            if inner_task.done():
                inner_task.result()
                raise SystemExit("loraplane: the engine server did not start")
            await asyncio.sleep(0.02)
        store = MemoryStore()
        await fill_store(store, spec)
        settings = Settings(host=host, port=port, engines=[f"unix://{sock}"],
                            log_level=log_level)
        logger.info("gateway: %d tenants, %d adapters from the tenants file", len(spec.tenants),
                    len(spec.adapters))
        outer = uvicorn.Server(uvicorn.Config(build_app(settings, store), host=host, port=port,
                                              log_level=log_level, access_log=False,
                                              timeout_graceful_shutdown=10))
        await outer.serve()
    finally:
        inner.should_exit = True
        await inner_task
        shutil.rmtree(folder, ignore_errors=True)
