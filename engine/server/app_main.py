"""``run_server(...)``: serve an engine with uvicorn until interrupted."""

from __future__ import annotations

import uvicorn

from loraplane.engine.server.api import build_app
from loraplane.engine.server.deps import EngineClient


def run_server(engine: EngineClient, host: str = "127.0.0.1", port: int = 8000,
               log_level: str = "info") -> None:
    """Run the HTTP API of ``engine`` on host:port; the app's lifespan starts and stops it."""
    config = uvicorn.Config(build_app(engine), host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=10)
    uvicorn.Server(config).run()
