"""GET /v1/models: the base model and every registered adapter."""

from __future__ import annotations

from fastapi import APIRouter, Request

from loraplane.engine.errors import ModelNotFoundError
from loraplane.engine.server.deps import EngineClient, EngineDep
from loraplane.engine.server.protocol import ModelCard, ModelList

router = APIRouter()


def model_cards(engine: EngineClient, created: int) -> list[ModelCard]:
    """The base model first, then its adapters (``parent`` is the base model)."""
    base = ModelCard(id=engine.model_name, created=created, root=engine.model_name,
                     max_model_len=engine.max_model_len)
    adapters = [ModelCard(id=a.name, created=created, root=a.path, parent=engine.model_name,
                          max_model_len=engine.max_model_len)
                for a in engine.list_adapters()]
    return [base, *adapters]


@router.get("/v1/models")
async def list_models(request: Request, engine: EngineDep) -> ModelList:
    """List the models a request may name."""
    return ModelList(data=model_cards(engine, request.app.state.created))


@router.get("/v1/models/{model:path}")
async def get_model(model: str, request: Request, engine: EngineDep) -> ModelCard:
    """One model by name."""
    for card in model_cards(engine, request.app.state.created):
        if card.id == model:
            return card
    raise ModelNotFoundError(f"The model {model!r} does not exist", param="model")
