"""``build_app(engine)``: the FastAPI app that serves one engine over OpenAI's HTTP API."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from loraplane.engine.server.deps import EngineClient
from loraplane.engine.server.errors import install_error_handlers
from loraplane.engine.server.metrics import ServerMetrics
from loraplane.engine.server.middleware import BodySizeLimit
from loraplane.engine.server.routes import adapters, chat, completions, models, ops, residency

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 8 << 20  # a long prompt as JSON token ids is a few MB at most


def build_app(engine: EngineClient, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """An app serving ``engine``; its lifespan starts and stops the engine's loop if it has one."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await _call_if_present(engine, "start")
        try:
            yield
        finally:
            await _call_if_present(engine, "shutdown")

    app = FastAPI(title="loraplane engine", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine = engine
    app.state.metrics = ServerMetrics(engine.stats)
    app.state.created = int(time.time())
    for module in (models, completions, chat, adapters, ops, residency):
        app.include_router(module.router)
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)
    return app


async def _call_if_present(engine: Any, name: str) -> None:
    method = getattr(engine, name, None)
    if method is not None:
        logger.info("engine %s", name)
        await method()
