"""What a completion request reserves at admission: its prompt and its max completion tokens.

The gateway has no tokenizer, so the prompt is estimated (one token per 4 bytes of text, at
least one per message); the reservation is reconciled with the engine's actual usage after the
response, so the estimate only decides how early a tenant near its limit is held back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from loraplane.gateway.errors import bad_request

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's (and the engine's) default for /v1/completions


@dataclass
class RequestShape:
    """The fields of a completion body the gateway acts on."""

    model: str
    stream: bool
    client_wants_usage: bool  # stream_options.include_usage as the client sent it
    prompt_tokens: int  # estimate
    max_tokens: int | None  # None: up to the model's context

    def reserved(self, max_model_len: int) -> int:
        """Tokens to reserve: prompt estimate + max completion tokens (capped by the context)."""
        room = max(max_model_len - self.prompt_tokens, 0)
        if self.max_tokens is None:
            return self.prompt_tokens + room
        if max_model_len > 0:
            return self.prompt_tokens + min(self.max_tokens, room)
        return self.prompt_tokens + self.max_tokens


def _text_tokens(text: str) -> int:
    return len(text.encode()) // 4 + 1


def _prompt_tokens(prompt: Any) -> int:
    if isinstance(prompt, str):
        return _text_tokens(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return len(prompt)
    if isinstance(prompt, list):
        return sum(_prompt_tokens(p) for p in prompt)
    return 1


def _message_tokens(messages: Any) -> int:
    if not isinstance(messages, list):
        return 1
    total = 0
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):  # content parts
            content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
        total += 4 + _text_tokens(content if isinstance(content, str) else "")
    return total


def _int_field(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise bad_request(f"{name}: expected a non-negative integer", param=name)
    return value


def request_shape(body: Any, chat: bool) -> RequestShape:
    """Read the model, streaming and size fields of a /v1/completions or chat body."""
    if not isinstance(body, dict):
        raise bad_request("Request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("model: a model id is required", param="model")
    options = body.get("stream_options")
    wants_usage = isinstance(options, dict) and options.get("include_usage") is True
    if chat:
        prompt = _message_tokens(body.get("messages"))
        max_tokens = _int_field(body, "max_completion_tokens")
        if max_tokens is None:
            max_tokens = _int_field(body, "max_tokens")
    else:
        prompt = _prompt_tokens(body.get("prompt"))
        max_tokens = _int_field(body, "max_tokens")
        if max_tokens is None:
            max_tokens = COMPLETION_DEFAULT_MAX_TOKENS
    return RequestShape(model=model, stream=body.get("stream") is True,
                        client_wants_usage=wants_usage, prompt_tokens=prompt,
                        max_tokens=max_tokens)
