"""What the HTTP layer needs from the engine, and FastAPI dependencies that hand it to routes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Protocol

from fastapi import Depends, Request

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
                 adapter: str | None) -> AsyncIterator[RequestOutput]: ...

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


EngineDep = Annotated[EngineClient, Depends(get_engine)]
MetricsDep = Annotated[ServerMetrics, Depends(get_metrics)]
