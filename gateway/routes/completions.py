"""POST /v1/completions and /v1/chat/completions: admitted, routed and relayed to an engine.

These two paths are the gateway's hot path, so they are a plain ASGI app that ``main.py`` puts
in front of FastAPI: FastAPI's middleware, routing and dependency layers cost about as much CPU
per request as admitting and relaying it. What those layers do for the other routes is done here:
the body size cap (413), request counting, and OpenAI-shaped errors (``GatewayError``, 503 when
the store is down, a logged 500 for anything else).
"""

from __future__ import annotations

import logging

from redis.exceptions import RedisError
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from loraplane.engine.server.errors import error_response
from loraplane.gateway.errors import GatewayError, invalid_api_key, store_unavailable
from loraplane.gateway.keys import bearer
from loraplane.gateway.metrics import GatewayMetrics
from loraplane.gateway.proxy import CLIENT_GONE, Proxy

logger = logging.getLogger(__name__)

PATHS = {"/v1/completions": False, "/v1/chat/completions": True}  # path -> is chat


class ClientGone(Exception):
    """The client disconnected before its request body arrived."""


class Completions:
    """The ASGI app of the two completion paths."""

    def __init__(self, proxy: Proxy, metrics: GatewayMetrics, max_body_bytes: int) -> None:
        self.proxy = proxy
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Complete a prompt or answer a chat on the replica that holds the adapter."""
        path: str = scope["path"]
        started = False

        async def counting_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                self.metrics.requests.labels(path, str(message["status"])).inc()
            await send(message)

        try:
            try:
                response = await self._handle(scope, receive, path)
            except GatewayError as e:
                response = e.response()
            except RedisError as e:
                logger.error("store unavailable: %s", e)
                response = store_unavailable().response()
            except ClientGone:
                response = Response(status_code=CLIENT_GONE)
            await response(scope, receive, counting_send)
        except Exception:
            logger.exception("unhandled error in %s %s", scope.get("method"), path)
            if started:
                raise
            await error_response(500, "The server had an error while processing your request.",
                                 code="internal_error")(scope, receive, counting_send)

    async def _handle(self, scope: Scope, receive: Receive, path: str) -> Response:
        if scope["method"] != "POST":
            raise GatewayError(405, "Method Not Allowed", headers={"allow": "POST"})
        authorization = length = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value.decode("latin-1")
            elif name == b"content-length":
                length = value
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            raise self._too_large()
        key = bearer(authorization)
        if key is None:
            raise invalid_api_key()
        return await self.proxy.handle(key, await self._body(receive), path, PATHS[path],
                                       receive)

    async def _body(self, receive: Receive) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise self._too_large()
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _too_large(self) -> GatewayError:
        return GatewayError(413, f"Request body is larger than {self.max_body_bytes} bytes.",
                            code="request_too_large")
