"""POST /v1/completions: text completion of one prompt (a string or token ids)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import cast

from fastapi import APIRouter, Request, Response

from loraplane.engine.errors import BadRequestError
from loraplane.engine.server.deps import EngineClient, EngineDep, MetricsDep, TenantDep
from loraplane.engine.server.generation import (
    CLIENT_GONE,
    Generation,
    collect,
    sampling_params,
    start_generation,
    unsupported,
    until_disconnect,
)
from loraplane.engine.server.protocol import (
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
)
from loraplane.engine.server.streaming import DONE, EventStreamResponse, error_event, sse

router = APIRouter()

def prompt_of(req: CompletionRequest, engine: EngineClient) -> tuple[str | list[int], int]:
    """The one prompt of a request and its length in tokens."""
    if req.echo:
        raise unsupported("echo", "echo")
    if req.logprobs is not None:
        raise unsupported("logprobs", "logprobs")
    if req.best_of not in (None, 1):
        raise unsupported("best_of", "best_of other than 1")
    if req.suffix:
        raise unsupported("suffix", "suffix")
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        if len(prompt) != 1:
            raise BadRequestError("Send one prompt per request; lists of several prompts are "
                                  "not supported", param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt, len(engine.tokenizer.encode(prompt))
    if not prompt:
        raise BadRequestError("prompt must not be empty", param="prompt")
    ids = cast(list[int], prompt)
    return ids, len(ids)


@router.post("/v1/completions", response_model=None)
async def create_completion(req: CompletionRequest, request: Request, engine: EngineDep,
                            metrics: MetricsDep,
                            tenant: TenantDep) -> CompletionResponse | Response:
    """Complete a prompt, as one JSON response or as a stream of events."""
    prompt, prompt_tokens = prompt_of(req, engine)
    max_tokens = 16 if req.max_tokens is None else req.max_tokens
    params = sampling_params(req, max_tokens, prompt_tokens, engine.max_model_len, "prompt")
    request_id = f"cmpl-{uuid.uuid4().hex}"

    async def start() -> Generation:
        return await start_generation(engine, metrics, request_id, prompt, params, req.model,
                                      prompt_tokens, tenant)

    if req.stream:
        g = await until_disconnect(request, start)
        if g is None:
            return Response(status_code=CLIENT_GONE)
        return EventStreamResponse(_events(g, req), g)

    async def run() -> tuple[str, Generation]:
        g = await start()
        return await collect(g), g

    result = await until_disconnect(request, run)
    if result is None:
        return Response(status_code=CLIENT_GONE)
    text, g = result
    choice = CompletionChoice(text=text, finish_reason=g.finish_reason)
    return CompletionResponse(id=request_id, model=req.model, choices=[choice], usage=g.usage())


async def _events(g: Generation, req: CompletionRequest) -> AsyncIterator[str]:
    created = int(time.time())

    def chunk(text: str, finish_reason: str | None) -> str:
        choice = CompletionChoice(text=text, finish_reason=finish_reason)
        return sse(CompletionResponse(id=g.request_id, created=created, model=req.model,
                                      choices=[choice]))

    try:
        while (out := await g.next()) is not None:
            if out.text_delta or out.finished:
                yield chunk(out.text_delta, out.finish_reason if out.finished else None)
    except Exception as exc:
        yield error_event(g, exc)
        return
    if req.stream_options and req.stream_options.include_usage:
        yield sse(CompletionResponse(id=g.request_id, created=created, model=req.model,
                                     choices=[], usage=g.usage()))
    yield DONE

