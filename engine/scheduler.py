"""Continuous batching: each step mixes decode rows with prefill chunks under a token budget."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from loraplane.engine.adapter_cache import Adapter, AdapterCache
from loraplane.engine.config import EngineConfig
from loraplane.engine.memory_pool import KV, DevicePool
from loraplane.engine.policies import Policy, make_policy, upcoming_adapters
from loraplane.engine.sequence import Sequence, Status

log = logging.getLogger(__name__)

PREFETCH_LIMIT = 64  # adapters of the queue, in admission order, handed to the cache's prefetch
PREFETCH_SCAN = 1024  # waiting requests looked at for them (later ones are far off anyway)


@dataclass
class ScheduledBatch:
    """The sequences of one step and how many of their tokens it computes; and the waiting
    requests the policy refused this step (each with its ``error`` set), for the engine to end."""

    seqs: list[Sequence]
    num_new: list[int]
    refused: list[Sequence] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new)


class Scheduler:
    """Running sequences first; then admission in the policy's order, skipping requests whose
    adapter cannot be used this step; preempts the newest when KV pages run out."""

    def __init__(self, config: EngineConfig, pool: DevicePool, adapters: AdapterCache,
                 policy: Policy | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.pool = pool
        self.adapters = adapters
        self.policy = policy or make_policy(config)
        self.clock = clock
        self.block_size = pool.layout.block_size
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        # Waiting requests passed over max_passed_over times, in queue order: they go first.
        self._starving: list[Sequence] = []
        # Set by the engine when pure decode steps replay CUDA graphs: admissions are then
        # batched (EngineConfig.admission_batch), since each admitting step runs eagerly.
        self.batch_admissions = False
        self.held_steps = 0  # decode steps admission was held back while a slot was free
        self.num_held_steps = 0  # all such steps (benchmarks report it)

    def set_policy(self, policy: Policy) -> None:
        """Switch policies between workloads (its accounting starts empty, so must the engine)."""
        if self.has_work():
            raise RuntimeError("the scheduling policy changes only while no request is queued")
        self.policy = policy

    def add(self, seq: Sequence) -> None:
        self.policy.on_add(seq)
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
        now = self.clock()
        self._refuse(batch, now, estimate=False)
        if self._hold(batch):
            self.held_steps += 1
            self.num_held_steps += 1
        else:
            self.held_steps = 0
            self._admit(batch, budget, now)
        self._refuse(batch, now, estimate=True)
        self.policy.on_scheduled(batch.seqs, batch.num_new)
        self.adapters.prefetch(upcoming_adapters(self._candidates(), PREFETCH_LIMIT,
                                                PREFETCH_SCAN))
        return batch

    def _hold(self, batch: ScheduledBatch) -> bool:
        """Keep waiting requests out of a nearly full decode batch for now (batch_admissions)?

        Held only while every scheduled row decodes (a step that computes a prefill chunk runs
        eagerly anyway), fewer than the admission batch's slots are free, and the queue's
        requests have been held fewer than admission_hold_steps steps."""
        cfg = self.config
        free = cfg.max_num_seqs - len(self.running)
        want = min(cfg.admission_batch, cfg.max_num_seqs // 4, len(self.waiting))
        return (self.batch_admissions and 0 < free < want and bool(batch.seqs)
                and self.held_steps < cfg.admission_hold_steps
                and all(n == 1 for n in batch.num_new))

    def _refuse(self, batch: ScheduledBatch, now: float, estimate: bool) -> None:
        """Take the requests the policy refuses out of the queue (they hold no pages or pins)."""
        errors = self.policy.refusals(self.waiting, self.running, now, estimate)
        if not any(errors):
            return
        kept = [s for s, e in zip(self.waiting, errors, strict=True) if e is None]
        for seq, error in zip(self.waiting, errors, strict=True):
            if error is not None:
                seq.error = error
                seq.status = Status.FINISHED
                self.policy.on_finish(seq, now)
                batch.refused.append(seq)
        self.waiting.clear()
        self.waiting.extend(kept)

    def _candidates(self) -> Iterator[Sequence]:
        """Waiting requests in admission order: starving ones first, then the policy's order."""
        self._starving = [s for s in self._starving if s.status is Status.WAITING]
        yield from self._starving
        limit = self.config.max_passed_over
        for seq in self.policy.order(self.waiting, self.running):
            if seq.status is Status.WAITING and seq.passed_over < limit:
                yield seq

    def _admit(self, batch: ScheduledBatch, budget: int, now: float) -> None:
        """Admit waiting requests in order while budget, batch slots and KV pages last.

        A request whose adapter is over the batch's adapter cap, or that the adapter cache cannot
        serve this step (no room, or still loading), is skipped, and the ones behind it are tried,
        until ``admission_lookahead`` distinct adapters were turned down (a popular adapter that
        is loading does not use up the look-ahead); a starving request is never skipped: nothing
        behind it is admitted until it is. KV pages are not skipped over: a request that does not
        fit stops admission (smaller ones behind it would keep it out forever).
        """
        cfg = self.config
        in_batch = {s.adapter for s in self.running if s.adapter is not None}
        blocked: set[Adapter] = set()  # over the cap or refused by the cache, this round
        skipped: list[tuple[Sequence, int]] = []  # (request, admissions before it was skipped)
        admitted: list[Sequence] = []
        for seq in self._candidates():
            if (budget <= 0 or len(self.running) >= cfg.max_num_seqs
                    or len(blocked) >= cfg.admission_lookahead):
                break
            if not self._pin_adapter(seq, in_batch, blocked):
                if seq.passed_over >= cfg.max_passed_over:
                    break
                skipped.append((seq, len(admitted)))
                continue
            n = min(seq.num_uncomputed, budget)
            # Admit only if the rest of the prefill fits too, leaving a page per running sequence:
            # otherwise it is preempted before its prefill ends, and readmitted, step after step.
            rest = self._pages(seq.num_tokens) - self._pages(seq.num_computed + n)
            if not self._grow_kv(seq, n, reserve=len(self.running) + rest):
                self._release_adapter(seq)  # an idle pinned adapter would block eviction
                break
            seq.status = Status.RUNNING
            seq.admitted_at = now
            seq.passed_over = 0
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new.append(n)
            budget -= n
            admitted.append(seq)
            if seq.adapter is not None:
                in_batch.add(seq.adapter)
        if admitted:
            self._leave_queue(admitted, [s for s, before in skipped if before < len(admitted)])

    def _pin_adapter(self, seq: Sequence, in_batch: set[Adapter], blocked: set[Adapter]) -> bool:
        """Pin the request's adapter if the batch's cap and the cache allow it this step; an
        adapter turned down goes into ``blocked`` (the cache is asked once a round)."""
        adapter = seq.adapter
        if adapter is None:
            return True
        if adapter in blocked:
            return False
        cap = self.config.max_adapters_per_batch
        if (adapter not in in_batch and cap and len(in_batch) >= cap) \
                or not self.adapters.acquire(adapter):
            blocked.add(adapter)
            return False
        seq.holds_adapter = True
        return True

    def _leave_queue(self, admitted: list[Sequence], skipped: list[Sequence]) -> None:
        """Remove admitted requests from the queue and count who they passed over.

        A waiting request is passed over when a request tried after it was admitted (it was
        skipped), or one behind it in the queue was admitted and the policy keeps their order
        (same ``lane``: everyone under FCFS, a tenant under VTC).
        """
        head = 0
        while self.waiting and self.waiting[0].status is not Status.WAITING:
            self.waiting.popleft()
            head += 1
        if head == len(admitted) and not skipped:
            return  # admitted in queue order from its head: nobody was passed over
        passed = {id(s) for s in skipped}
        lanes: set[object] = set()  # lanes with an admitted request later in the queue
        for seq in reversed(self.waiting):
            if seq.status is not Status.WAITING:
                lanes.add(self.policy.lane(seq))
            elif self.policy.lane(seq) in lanes:
                passed.add(id(seq))
        kept = [s for s in self.waiting if s.status is Status.WAITING]
        limit = self.config.max_passed_over
        for seq in kept:
            if id(seq) in passed:
                seq.passed_over += 1
                if seq.passed_over == limit:
                    log.info("request %s waited through %d admissions: it goes first now",
                             seq.request_id, limit)
        self.waiting.clear()
        self.waiting.extend(kept)
        self._starving = [s for s in kept if s.passed_over >= limit]

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
        if seq.status is Status.FINISHED:
            return  # refused by the policy: already out of the queue, holding nothing
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self._free_kv(seq)
        self._release_adapter(seq)
        seq.status = Status.FINISHED
        self.policy.on_finish(seq, self.clock())
