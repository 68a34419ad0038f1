"""``build_app(settings)``: the gateway's ASGI app (FastAPI behind the completion paths' lean
handler); ``run(settings)`` serves it."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError
from starlette.types import Receive, Scope, Send

from loraplane.engine.server.middleware import BodySizeLimit
from loraplane.gateway.discovery import KubernetesDiscovery
from loraplane.gateway.errors import install_error_handlers, store_unavailable
from loraplane.gateway.fleet import Fleet
from loraplane.gateway.metrics import CountRequests, GatewayMetrics
from loraplane.gateway.proxy import Proxy
from loraplane.gateway.routes import adapters, keys, models, ops, tenants
from loraplane.gateway.routes.completions import PATHS as COMPLETION_PATHS
from loraplane.gateway.routes.completions import Completions
from loraplane.gateway.settings import Settings
from loraplane.gateway.store.base import Store
from loraplane.gateway.store.redis import RedisStore

logger = logging.getLogger(__name__)


class Gateway:
    """The ASGI app: the completion paths go to their lean handler, the rest to FastAPI."""

    def __init__(self, api: FastAPI, completions: Completions) -> None:
        self.api = api
        self.completions = completions

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in COMPLETION_PATHS:
            await self.completions(scope, receive, send)
        else:
            await self.api(scope, receive, send)


def build_app(settings: Settings, store: Store | None = None) -> Gateway:
    """The gateway over ``store`` (default: Redis at ``settings.redis_url``)."""
    store = store or RedisStore(settings.redis_url, settings.concurrency_lease_s)
    discovery = None
    if settings.k8s_selector:
        discovery = KubernetesDiscovery(settings.k8s_selector, settings.k8s_namespace,
                                        settings.k8s_port, api_url=settings.k8s_api,
                                        token_file=settings.k8s_token_file)
    fleet = Fleet(settings.engines, discovery, settings.poll_interval_s,
                  settings.discovery_interval_s, settings.connect_timeout_s)
    metrics = GatewayMetrics(fleet)
    proxy = Proxy(store, fleet, metrics, settings.load_epsilon)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await fleet.start()
        logger.info("gateway: %d of %d engine replicas in rotation", len(fleet.healthy()),
                    len(fleet.replicas))
        try:
            yield
        finally:
            await proxy.drain()
            await fleet.stop()
            await store.close()

    app = FastAPI(title="loraplane gateway", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.settings, app.state.store, app.state.fleet = settings, store, fleet
    app.state.metrics = metrics
    app.state.admin_token = settings.admin_secret()
    for module in (models, tenants, keys, adapters, ops):
        app.include_router(module.router)
    install_error_handlers(app)
    app.add_exception_handler(RedisError, _store_down)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(CountRequests, metrics=metrics)
    return Gateway(app, Completions(proxy, metrics, settings.max_body_bytes))


async def _store_down(request: Request, exc: Exception) -> JSONResponse:
    logger.error("store unavailable: %s", exc)
    return store_unavailable().response()


def run(settings: Settings) -> None:
    """Serve the gateway until interrupted (uvloop and httptools when installed)."""
    uvicorn.run(build_app(settings), host=settings.host, port=settings.port,
                log_level=settings.log_level, access_log=False,
                timeout_graceful_shutdown=10)
