"""Gateway errors in OpenAI's JSON shape (the engine's error helpers, plus response headers)."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from loraplane.engine.server.errors import error_response
from loraplane.engine.server.errors import install_error_handlers as install_engine_handlers


class GatewayError(Exception):
    """An error a client sees: HTTP status, OpenAI type and code, optional headers."""

    def __init__(self, status: int, message: str, code: str | None = None,
                 param: str | None = None, type: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        """This error as a JSON response."""
        response = error_response(self.status, self.message, self.code, self.param, self.type)
        response.headers.update(self.headers)
        return response


def bad_request(message: str, param: str | None = None) -> GatewayError:
    return GatewayError(400, message, param=param, type="invalid_request_error")


def invalid_api_key() -> GatewayError:
    # OpenAI's answer to a missing or wrong key; the key itself is never echoed.
    return GatewayError(401, "Incorrect API key provided. Pass a loraplane key as "
                        "'Authorization: Bearer lp-...'.", code="invalid_api_key",
                        type="invalid_request_error")


def model_not_found(model: str) -> GatewayError:
    # The same answer for a missing adapter and another tenant's private one.
    return GatewayError(404, f"The model {model!r} does not exist or you do not have access "
                        "to it.", code="model_not_found", param="model",
                        type="invalid_request_error")


def no_replica() -> GatewayError:
    return GatewayError(503, "No engine replica is available to serve this request; try again "
                        "shortly.", code="no_replica_available", type="server_error")


def store_unavailable() -> GatewayError:
    return GatewayError(503, "The gateway's store is unavailable; try again shortly.",
                        code="store_unavailable")


async def _gateway_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, GatewayError)
    return exc.response()


def install_error_handlers(app: FastAPI) -> None:
    """OpenAI-shaped errors for gateway, validation and HTTP errors; a generic 500 otherwise."""
    install_engine_handlers(app)
    app.add_exception_handler(GatewayError, _gateway_error)
