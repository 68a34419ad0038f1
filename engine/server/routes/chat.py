"""POST /v1/chat/completions: a reply to a conversation, rendered with the model's chat template."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request, Response

from loraplane.engine.errors import BadRequestError
from loraplane.engine.server.deps import EngineDep, MetricsDep, TenantDep
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
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
)
from loraplane.engine.server.streaming import DONE, EventStreamResponse, error_event, sse

router = APIRouter()


def check_supported(req: ChatCompletionRequest) -> None:
    """Refuse the chat features this server does not implement, rather than ignore them."""
    if req.logprobs or req.top_logprobs:
        raise unsupported("logprobs", "logprobs")
    if req.tools:
        raise unsupported("tools", "Tool calling")
    if req.response_format and req.response_format.get("type", "text") != "text":
        raise unsupported("response_format", "A response_format other than text")


def template_messages(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """Messages as the chat template takes them: role and plain-text content."""
    rendered = []
    for i, m in enumerate(messages):
        if m.content is None or isinstance(m.content, str):
            text = m.content or ""
        else:
            for part in m.content:
                if part.type != "text" or part.text is None:
                    raise BadRequestError(f"Content parts of type {part.type!r} are not "
                                          "supported; only 'text' parts are",
                                          param=f"messages.{i}.content")
            text = "\n".join(part.text or "" for part in m.content)
        role = "system" if m.role == "developer" else m.role
        rendered.append({"role": role, "content": text})
    return rendered


@router.post("/v1/chat/completions", response_model=None)
async def create_chat_completion(req: ChatCompletionRequest, request: Request, engine: EngineDep,
                                 metrics: MetricsDep,
                                 tenant: TenantDep) -> ChatCompletionResponse | Response:
    """Reply to a conversation, as one JSON response or as a stream of chunks."""
    check_supported(req)
    messages = template_messages(req.messages)
    try:
        prompt = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    except Exception as exc:  # a template's raise_exception(), e.g. roles that do not alternate
        raise BadRequestError(f"The chat template cannot render these messages: {exc}",
                              param="messages") from exc
    prompt_tokens = len(engine.tokenizer.encode(prompt))
    max_tokens = req.max_tokens if req.max_completion_tokens is None else req.max_completion_tokens
    params = sampling_params(req, max_tokens, prompt_tokens, engine.max_model_len, "messages")
    request_id = f"chatcmpl-{uuid.uuid4().hex}"

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
    choice = ChatChoice(message=AssistantMessage(content=text), finish_reason=g.finish_reason)
    return ChatCompletionResponse(id=request_id, model=req.model, choices=[choice],
                                  usage=g.usage())


async def _events(g: Generation, req: ChatCompletionRequest) -> AsyncIterator[str]:
    created = int(time.time())

    def chunk(delta: dict[str, str], finish_reason: str | None = None) -> str:
        choice = ChatChunkChoice(delta=delta, finish_reason=finish_reason)
        return sse(ChatCompletionChunk(id=g.request_id, created=created, model=req.model,
                                       choices=[choice]))

    yield chunk({"role": "assistant", "content": ""})
    try:
        while (out := await g.next()) is not None:
            if out.text_delta:
                yield chunk({"content": out.text_delta})
            if out.finished:
                yield chunk({}, g.finish_reason)
    except Exception as exc:
        yield error_event(g, exc)
        return
    if req.stream_options and req.stream_options.include_usage:
        yield sse(ChatCompletionChunk(id=g.request_id, created=created, model=req.model,
                                      choices=[], usage=g.usage()))
    yield DONE
