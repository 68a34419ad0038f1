"""What the engine hands back to callers: per-request increments and adapter records."""

from __future__ import annotations

from dataclasses import dataclass, field

from loraplane.engine.errors import EngineError
from loraplane.engine.prefetch import TierStats


@dataclass
class RequestOutput:
    """One increment of a request's output (a streamed delta, or the last one with finished)."""

    request_id: str
    text_delta: str
    token_ids_delta: list[int]
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # Set when the engine refused the request before its first token (early abort) or the
    # request ended on an error before any output (finish_reason "error", e.g. its adapter's
    # weights failed to load): the caller raises it instead of answering.
    error: EngineError | None = None


@dataclass(frozen=True)
class AdapterInfo:
    """A registered adapter as the API and metrics see it."""

    name: str
    path: str
    rank: int
    alpha: float
    modules: tuple[str, ...]
    num_bytes: int
    resident: bool  # its weights are in the device pool now
    tier: str = "source"  # "gpu" | "host" | "source": the fastest tier holding its weights


@dataclass
class EngineStats:
    """Counters for /metrics and the residency report."""

    running: int = 0
    waiting: int = 0
    pool_pages_total: int = 0
    pool_pages_kv: int = 0
    pool_pages_adapter: int = 0
    page_bytes: int = 0
    adapters_registered: int = 0
    adapters_resident: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    requests_finished: dict[str, int] = field(default_factory=dict)  # finish_reason -> count
    last_batch_size: int = 0
    steps_total: int = 0
    # Adapter tiers and prefetch (definitions in engine/prefetch.py).
    adapters_host: int = 0  # registered adapters whose weights are in host RAM
    host_cache_bytes_used: int = 0  # loaded + loading
    host_cache_bytes_total: int = 0
    tiers: TierStats = field(default_factory=TierStats)  # a copy of the cache's counters
