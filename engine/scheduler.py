"""Continuous batching: each step mixes decode rows with prefill chunks under a token budget."""

from __future__ import annotations

import itertools
import logging
from collections import deque
from dataclasses import dataclass

from loraplane.engine.adapter_cache import AdapterCache
from loraplane.engine.config import EngineConfig
from loraplane.engine.memory_pool import KV, DevicePool
from loraplane.engine.sequence import Sequence, Status

log = logging.getLogger(__name__)


@dataclass
class ScheduledBatch:
    """The sequences of one step and how many of their tokens it computes."""

    seqs: list[Sequence]
    num_new: list[int]

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new)


class Scheduler:
    """FCFS admission; running sequences first; preempts the newest when KV pages run out."""

    def __init__(self, config: EngineConfig, pool: DevicePool, adapters: AdapterCache) -> None:
        self.config = config
        self.pool = pool
        self.adapters = adapters
        self.block_size = pool.layout.block_size
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        """Pick this step's work; allocates KV pages and pins adapters for what it picks."""
        batch = ScheduledBatch([], [])
        budget = self.config.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed, budget)
            while not self._grow_kv(seq, n):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is Status.RUNNING:
                batch.seqs.append(seq)
                batch.num_new.append(n)
                budget -= n
                i += 1
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if seq.adapter is not None:
                if not self.adapters.acquire(seq.adapter):
                    break
                seq.holds_adapter = True
            n = min(seq.num_uncomputed, budget)
            # Admit only if the rest of the prefill fits too, leaving a page per running sequence:
            # otherwise it is preempted before its prefill ends, and readmitted, step after step.
            rest = self._pages(seq.num_tokens) - self._pages(seq.num_computed + n)
            if not self._grow_kv(seq, n, reserve=len(self.running) + rest):
                self._release_adapter(seq)  # an idle pinned adapter would block eviction
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new.append(n)
            budget -= n
        self.adapters.prefetch(list(dict.fromkeys(
            s.adapter for s in itertools.islice(self.waiting, 256) if s.adapter))[:64])
        return batch

    def _pages(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _grow_kv(self, seq: Sequence, n: int, reserve: int = 0) -> bool:
        """Ensure KV pages for n more tokens, evicting idle adapters if pages are short."""
        need = self._pages(seq.num_computed + n) - len(seq.block_table)
        if need <= 0:
            return True
        if not self.adapters.make_room(need + reserve):
            return False
        seq.block_table.extend(self.pool.pages.allocate(need, KV))
        return True

    def _free_kv(self, seq: Sequence) -> None:
        if seq.block_table:
            self.pool.pages.free(seq.block_table)
            seq.block_table = []

    def _release_adapter(self, seq: Sequence) -> None:
        if seq.holds_adapter and seq.adapter is not None:
            self.adapters.release(seq.adapter)
        seq.holds_adapter = False

    def _preempt(self, seq: Sequence) -> None:
        """Drop a running sequence's KV (it recomputes later) and put it first in line."""
        self.running.remove(seq)
        self._free_kv(seq)
        self._release_adapter(seq)
        seq.num_computed = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        log.info("preempted %s (KV pool full)", seq.request_id)

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence and free its pages at once."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self._free_kv(seq)
        self._release_adapter(seq)
        seq.status = Status.FINISHED
