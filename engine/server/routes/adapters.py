"""POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's names and bodies)."""

from __future__ import annotations

from fastapi import APIRouter

from loraplane.engine.errors import AdapterExistsError
from loraplane.engine.server.deps import EngineDep
from loraplane.engine.server.protocol import (
    AdapterResponse,
    LoadAdapterRequest,
    UnloadAdapterRequest,
)

router = APIRouter()


@router.post("/v1/load_lora_adapter")
async def load_adapter(req: LoadAdapterRequest, engine: EngineDep) -> AdapterResponse:
    """Register an adapter from a PEFT folder; it becomes a model name."""
    if req.lora_name == engine.model_name:
        raise AdapterExistsError(f"{req.lora_name!r} is the base model's name",
                                 param="lora_name")
    info = await engine.load_adapter(req.lora_name, req.lora_path)
    return AdapterResponse(lora_name=info.name, status="loaded", lora_path=info.path,
                           rank=info.rank, alpha=info.alpha, modules=list(info.modules),
                           num_bytes=info.num_bytes, resident=info.resident,
                           tier=info.tier)  # type: ignore[arg-type]


@router.post("/v1/unload_lora_adapter")
async def unload_adapter(req: UnloadAdapterRequest, engine: EngineDep) -> AdapterResponse:
    """Forget an adapter and free its memory."""
    await engine.unload_adapter(req.lora_name)
    return AdapterResponse(lora_name=req.lora_name, status="unloaded")
