"""POST /v1/completions and /v1/chat/completions: admitted, routed and relayed to an engine."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from loraplane.gateway.deps import ProxyDep

router = APIRouter()


@router.post("/v1/completions", response_model=None)
async def create_completion(request: Request, proxy: ProxyDep) -> Response:
    """Complete a prompt on the replica that holds the adapter."""
    return await proxy.handle(request, "/v1/completions", chat=False)


@router.post("/v1/chat/completions", response_model=None)
async def create_chat_completion(request: Request, proxy: ProxyDep) -> Response:
    """Answer a chat on the replica that holds the adapter."""
    return await proxy.handle(request, "/v1/chat/completions", chat=True)
