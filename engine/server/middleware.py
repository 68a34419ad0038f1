"""Request body size cap, applied before any JSON is parsed."""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loraplane.engine.server.errors import error_response


class BodySizeLimit:
    """Answer 413 to bodies over ``max_bytes``, whether or not they declare a Content-Length."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await self._too_large()(scope, receive, send)
            return
        received = 0
        body_done = False

        async def receive_capped() -> Message:
            nonlocal received, body_done
            message = await receive()
            if message["type"] == "http.request" and not body_done:
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > self.max_bytes:
                    # Raised inside the body read: FastAPI passes HTTPException through.
                    raise HTTPException(413, self._message())
            return message

        await self.app(scope, receive_capped, send)

    def _message(self) -> str:
        return f"Request body is larger than {self.max_bytes} bytes."

    def _too_large(self) -> ASGIApp:
        return error_response(413, self._message(), code="request_too_large")
