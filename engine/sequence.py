"""The one object a request travels as: prompt, adapter, page table, counters and output state."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from loraplane.engine.outputs import RequestOutput
from loraplane.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from loraplane.engine.adapter_cache import Adapter
    from loraplane.engine.errors import EngineError


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """A request inside the engine, from admission to its last token."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    adapter: Adapter | None = None
    tenant: str | None = None  # who asked (the gateway's tenant), for fair scheduling
    arrival: float = field(default_factory=time.monotonic)
    status: Status = Status.WAITING
    output_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)  # KV pages, in position order
    num_computed: int = 0  # tokens whose K/V are in the cache
    holds_adapter: bool = False  # the adapter is pinned on this sequence's behalf
    sample_seed: int | None = None  # the request's seed, or one drawn at its first sample
    finish_reason: str | None = None
    # Why the engine ended it without serving it: refused by the policy (finish_reason "abort")
    # or its adapter's weights failed to load ("error").
    error: EngineError | None = None
    # Admission rounds in which a request behind it was admitted while it waited (the
    # scheduler's starvation bound).
    passed_over: int = 0
    # Detokenizer state: output text so far, what was sent, and the incremental decode window.
    text: str = ""
    sent_chars: int = 0
    sent_tokens: int = 0
    prefix_offset: int = 0
    read_offset: int = 0
    first_token_time: float | None = None
    # When the scheduler last admitted it (a preempted request is admitted again), and when the
    # abort policy last expected its first token (engine clock; None until it estimated one).
    admitted_at: float | None = None
    expected_first_token: float | None = None
    # Called with each RequestOutput (on the engine's thread); None for synchronous use.
    on_output: Callable[[RequestOutput], None] | None = None

    def token_at(self, i: int) -> int:
        """The i-th token of prompt + output, without building that list."""
        n = len(self.prompt_ids)
        return self.prompt_ids[i] if i < n else self.output_ids[i - n]

    def ids_between(self, start: int, end: int) -> list[int]:
        """Tokens start..end-1 of prompt + output (a prompt chunk needs no concatenation)."""
        return self.prompt_ids[start:end] if end <= len(self.prompt_ids) \
            else self.all_ids[start:end]

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_uncomputed(self) -> int:
        """Tokens to feed the model before the next sample (prompt rest, or the last output)."""
        return self.num_tokens - self.num_computed

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
