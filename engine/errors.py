"""Errors the engine raises, each with the HTTP status and OpenAI error type it maps to."""

from __future__ import annotations


class EngineError(Exception):
    """Base of errors that reach a client; carries the OpenAI error fields."""

    status_code = 500
    type = "internal_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    @property
    def headers(self) -> dict[str, str]:
        """HTTP headers the answer carries (e.g. Retry-After)."""
        return {}


class BadRequestError(EngineError):
    status_code = 400
    type = "invalid_request_error"


class PromptTooLongError(BadRequestError):
    code = "context_length_exceeded"


class ModelNotFoundError(EngineError):
    status_code = 404
    type = "invalid_request_error"
    code = "model_not_found"


class AdapterExistsError(EngineError):
    status_code = 409
    type = "invalid_request_error"
    code = "adapter_exists"


class InvalidAdapterError(BadRequestError):
    code = "invalid_adapter"


class OverloadedError(EngineError):
    status_code = 503
    type = "server_error"
    code = "overloaded"


class EngineDeadError(EngineError):
    status_code = 503
    type = "server_error"
    code = "engine_dead"


class SloUnattainableError(EngineError):
    """Early abort: the request cannot get its first token within the SLO, so it is not served."""

    status_code = 503
    type = "server_error"
    code = "slo_unattainable"

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}
