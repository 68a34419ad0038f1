"""Token buckets, the outcome of admitting a request, and OpenAI's rate-limit headers.

A limit of N per minute is a bucket of capacity N refilled at N/60 per second; a request takes 1
from the requests bucket and (prompt + max completion tokens) from the tokens bucket. Both stores
implement this same arithmetic (the Redis store in Lua).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

MINUTE_MS = 60_000


class Outcome(str, Enum):
    OK = "ok"
    UNAUTHORIZED = "unauthorized"
    NOT_FOUND = "not_found"  # no such adapter, or not one this tenant may use
    LIMITED = "limited"


@dataclass
class Admission:
    """What the store decided about one request, with what the response headers report."""

    outcome: Outcome
    tenant: str = ""
    reason: str = ""  # when limited: "requests" | "tokens" | "too_large" | "concurrency"
    retry_after_s: float = 0.0
    limit_requests: int | None = None
    remaining_requests: float = 0.0
    limit_tokens: int | None = None
    remaining_tokens: float = 0.0
    engine_name: str = ""  # admitted for an adapter: the name engines serve it under


@dataclass
class Settlement:
    """The end of one admitted request: tokens it reserved and used, metered or not."""

    tenant: str
    request_id: str
    model: str
    reserved: int
    prompt_tokens: int = 0
    completion_tokens: int = 0
    metered: bool = True  # False when no engine served it


def refill(level: float | None, last_ms: float | None, now_ms: float, capacity: int) -> float:
    """A bucket's level now: full when new, else topped up for the time since ``last_ms``."""
    if level is None or last_ms is None:
        return float(capacity)
    return min(float(capacity), level + max(0.0, now_ms - last_ms) * capacity / MINUTE_MS)


def wait_ms(level: float, need: float, capacity: int) -> float:
    """Milliseconds until a bucket at ``level`` holds ``need``."""
    return max(0.0, need - level) * MINUTE_MS / capacity


def format_duration(seconds: float) -> str:
    """OpenAI's reset format: "20ms", "1s", "6m0s"."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    minutes, secs = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


def ratelimit_headers(a: Admission) -> dict[str, str]:
    """``x-ratelimit-*`` headers (and ``retry-after`` when limited) for an admission."""
    headers: dict[str, str] = {}
    if a.limit_requests is not None:
        left = max(0.0, a.remaining_requests)
        headers["x-ratelimit-limit-requests"] = str(a.limit_requests)
        headers["x-ratelimit-remaining-requests"] = str(math.floor(left))
        reset = wait_ms(left, a.limit_requests, a.limit_requests) / 1000
        headers["x-ratelimit-reset-requests"] = format_duration(reset)
    if a.limit_tokens is not None:
        left = max(0.0, a.remaining_tokens)
        headers["x-ratelimit-limit-tokens"] = str(a.limit_tokens)
        headers["x-ratelimit-remaining-tokens"] = str(math.floor(left))
        reset = wait_ms(a.remaining_tokens, a.limit_tokens, a.limit_tokens) / 1000
        headers["x-ratelimit-reset-tokens"] = format_duration(reset)
    if a.outcome is Outcome.LIMITED:
        headers["retry-after"] = str(max(1, math.ceil(a.retry_after_s)))
        headers["retry-after-ms"] = str(math.ceil(a.retry_after_s * 1000))
    return headers
