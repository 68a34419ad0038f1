"""Server-Sent Events: the response that carries a stream, and how each event is written."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import anyio
from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from loraplane.engine.errors import EngineError
from loraplane.engine.server.errors import engine_error_body, error_body
from loraplane.engine.server.generation import Generation, aclose

logger = logging.getLogger(__name__)

DONE = "data: [DONE]\n\n"


def sse(data: BaseModel | dict[str, Any]) -> str:
    """One ``data:`` event."""
    if isinstance(data, BaseModel):
        return f"data: {data.model_dump_json()}\n\n"
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


def error_event(g: Generation, exc: Exception) -> str:
    """The event that ends a stream which failed after its first byte."""
    g.tracker.finish("error")
    if isinstance(exc, EngineError):
        return sse(engine_error_body(exc))
    logger.error("request %s failed mid-stream", g.request_id, exc_info=exc)
    return sse(error_body("The server had an error while processing your request.",
                          "server_error", "internal_error"))


class EventStreamResponse(StreamingResponse):
    """An SSE response that ends its engine request however the stream ends.

    Starlette cancels the streaming task when the client disconnects but leaves the iterator
    suspended; here both the event generator and the engine's generator are closed, and the
    request aborted if it had not finished.
    """

    def __init__(self, events: AsyncIterator[str], generation: Generation) -> None:
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.generation = generation

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await aclose(self.body_iterator)
            await self.generation.close()
