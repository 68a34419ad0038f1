"""What the HTTP layer needs from the engine, and FastAPI dependencies that hand it to routes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Protocol

from fastapi import Depends, Header, Request

from loraplane.engine.errors import BadRequestError
from loraplane.engine.outputs import AdapterInfo, EngineStats, RequestOutput
from loraplane.engine.sampling_params import SamplingParams
from loraplane.engine.server.metrics import ServerMetrics


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def apply_chat_template(self, messages: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str: ...


class EngineClient(Protocol):
    """The surface of ``AsyncEngine`` the server uses (a Protocol: the server imports no torch)."""

    model_name: str
    tokenizer: Tokenizer
    max_model_len: int

    # An async generator in the real engine; the server closes it with aclose().
    def generate(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                 adapter: str | None, tenant: str | None = None) -> AsyncIterator[RequestOutput]:
        ...

    async def abort(self, request_id: str) -> None: ...

    async def load_adapter(self, name: str, path: str) -> AdapterInfo: ...

    async def unload_adapter(self, name: str) -> None: ...

    def list_adapters(self) -> list[AdapterInfo]: ...

    def stats(self) -> EngineStats: ...

    def is_healthy(self) -> bool: ...


def get_engine(request: Request) -> EngineClient:
    """The engine this app serves."""
    engine: EngineClient = request.app.state.engine
    return engine


def get_metrics(request: Request) -> ServerMetrics:
    """This app's Prometheus metrics."""
    metrics: ServerMetrics = request.app.state.metrics
    return metrics


# The tenant a request is for, set by the gateway (which authenticated it); the engine trusts
# it only for scheduling fairness, so a checked string is all it needs.
TENANT_HEADER = "x-loraplane-tenant"
MAX_TENANT_CHARS = 253


def get_tenant(x_loraplane_tenant: Annotated[str | None, Header()] = None) -> str | None:
    """The request's tenant from its header; None without one."""
    t = x_loraplane_tenant
    if t is None or t == "":
        return None
    if len(t) > MAX_TENANT_CHARS or not all("!" <= c <= "~" for c in t):
        raise BadRequestError(f"the {TENANT_HEADER} header must be 1 to {MAX_TENANT_CHARS} "
                              "printable ASCII characters without spaces", param=TENANT_HEADER)
    return t


EngineDep = Annotated[EngineClient, Depends(get_engine)]
TenantDep = Annotated[str | None, Depends(get_tenant)]
MetricsDep = Annotated[ServerMetrics, Depends(get_metrics)]
