"""Every error the API returns, in OpenAI's shape: ``{"error": {message, type, param, code}}``."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loraplane.engine.errors import EngineError

logger = logging.getLogger(__name__)

# OpenAI's error type for a status the engine's own errors do not name.
_TYPE_BY_STATUS = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                   429: "rate_limit_error"}


def error_body(message: str, type: str, code: str | None = None,
               param: str | None = None) -> dict[str, Any]:
    """The JSON object OpenAI clients parse for an error."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(status: int, message: str, code: str | None = None, param: str | None = None,
                   type: str | None = None) -> JSONResponse:
    """A JSON error response; the type defaults from the status."""
    if type is None:
        type = "server_error" if status >= 500 else _TYPE_BY_STATUS.get(status,
                                                                         "invalid_request_error")
    return JSONResponse(error_body(message, type, code, param), status_code=status)


def engine_error_body(exc: EngineError) -> dict[str, Any]:
    """The error JSON of an engine error, from the fields it carries."""
    return error_body(exc.message, exc.type, exc.code, exc.param)


def _count(request: Request, code: str) -> None:
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.errors.labels(code).inc()


async def _engine_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, EngineError)
    _count(request, exc.code or exc.type)
    return JSONResponse(engine_error_body(exc), status_code=exc.status_code, headers=exc.headers)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    _count(request, "invalid_request_error")
    return error_response(400, *validation_message(exc.errors()))


def validation_message(errors: Sequence[Any]) -> tuple[str, str | None, str | None]:
    """(message, code, param) for pydantic errors, naming the parameter like OpenAI does."""
    if not errors:
        return "Invalid request", None, None
    first = errors[0]
    if first.get("type") == "json_invalid":
        reason = first.get("ctx", {}).get("error", "parse error")
        return f"Request body is not valid JSON: {reason}", None, None
    locs = [tuple(str(p) for p in e.get("loc", ()) if p != "body") for e in errors]
    if not locs[0]:
        return ("Request body must be a JSON object, sent with Content-Type: application/json",
                None, None)
    common = tuple(os.path.commonprefix(locs))
    if len(errors) > 1 and common and len(common) < len(locs[0]):
        # One field that matched none of its union's types (e.g. prompt): name the field.
        param = ".".join(common)
        return f"{param}: the value is none of the accepted types", "invalid_type", param
    param = ".".join(locs[0])
    message = f"{param}: {first.get('msg', 'invalid value')}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more errors)"
    return message, "invalid_value", param


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    response = error_response(exc.status_code, str(exc.detail))
    if exc.headers:
        response.headers.update(exc.headers)
    return response


def install_error_handlers(app: FastAPI) -> None:
    """Map engine errors, validation errors and HTTP errors to OpenAI error JSON."""
    app.add_exception_handler(EngineError, _engine_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_middleware(CatchUnexpected)


class CatchUnexpected:
    """Log any other exception with its traceback and answer a generic 500, not the details."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracking(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_tracking)
        except Exception:
            logger.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            if not started:
                response = error_response(500, "The server had an error while processing your "
                                          "request.", code="internal_error")
                await response(scope, receive, send)
