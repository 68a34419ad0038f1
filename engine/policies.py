"""Admission policies: the order waiting requests are tried in, and which are refused early.

The scheduler owns the mechanics (token budget, KV pages, adapter pins, the per-batch adapter cap,
skipping a request whose adapter cannot be used this step, the starvation bound); a policy only
says, from the waiting queue, which request to try next, and keeps the accounting it needs:

- ``fcfs``: queue order (arrival order, preempted requests first).
- ``cluster`` (S-LoRA's adapter clustering): requests whose adapter the running batch already uses
  first, the others after them in queue order; with ``max_adapters_per_batch`` it bounds the
  distinct adapters of a batch.
- ``abort`` (S-LoRA's early abort): queue order, but a request that can no longer get its first
  token within the SLO, from its wait so far and when a place in the batch frees for it (after
  those ahead; each request holds its place for the measured hold time), is refused at once with
  ``SloUnattainableError`` instead of being served late.
- ``vtc`` (virtual token counters, Sheng et al., "Fairness in Serving LLMs"): the waiting request
  of the tenant with the smallest counter of served tokens goes first; a tenant that becomes active
  starts at the smallest active counter, so idling banks no credit. With one tenant (or none named)
  this is ``fcfs``.
"""

from __future__ import annotations

import heapq
import itertools
import math
import statistics
from collections import deque
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from loraplane.engine.config import POLICIES, EngineConfig
from loraplane.engine.errors import SloUnattainableError
from loraplane.engine.sequence import Sequence

if TYPE_CHECKING:
    from loraplane.engine.adapter_cache import Adapter

# VTC's weights of a prompt token and an output token (the paper's w_p = 1, w_q = 2: a decoded
# token costs about twice a prefilled one).
PROMPT_WEIGHT = 1.0
OUTPUT_WEIGHT = 2.0
# Finished requests whose time in the batch the early-abort estimate averages over.
SERVICE_WINDOW = 64


class Policy:
    """First come, first served; the base of the others, whose hooks default to no-ops."""

    name = "fcfs"

    def order(self, waiting: deque[Sequence], running: list[Sequence]) -> Iterator[Sequence]:
        """Waiting requests in the order to try them (lazily: admission stops early)."""
        return iter(waiting)

    def lane(self, seq: Sequence) -> object:
        """Requests of one lane keep their queue order: admitting one while an older one of its
        lane waits passes that one over, which the scheduler's starvation bound counts. One lane
        here; VTC reorders tenants on purpose (that is its fairness), so a lane per tenant."""
        return None

    def on_add(self, seq: Sequence) -> None:
        """A request joins the queue (before it is appended)."""

    def on_scheduled(self, seqs: list[Sequence], num_new: list[int]) -> None:
        """A batch was picked: ``num_new[i]`` tokens of ``seqs[i]`` are computed this step."""

    def on_finish(self, seq: Sequence, now: float) -> None:
        """A request left the engine (finished, aborted or refused)."""

    def refusals(self, waiting: deque[Sequence], running: list[Sequence], now: float,
                 estimate: bool) -> list[SloUnattainableError | None]:
        """For each waiting request in queue order, the error to refuse it with, or None;
        called before admission (``estimate`` False) and after it (True)."""
        return []


class ClusterPolicy(Policy):
    """S-LoRA's adapter clustering: requests for adapters already running go first."""

    name = "cluster"

    def order(self, waiting: deque[Sequence], running: list[Sequence]) -> Iterator[Sequence]:
        hot = {s.adapter for s in running}
        later: list[Sequence] = []
        for seq in waiting:
            if seq.adapter is None or seq.adapter in hot:
                yield seq
            else:
                later.append(seq)
        yield from later


class AbortPolicy(Policy):
    """S-LoRA's early abort: refuse at once the requests that would miss the first-token SLO."""

    name = "abort"

    def __init__(self, slo_s: float) -> None:
        if not slo_s > 0:
            raise ValueError(f"the first-token SLO must be positive, not {slo_s}")
        self.slo_s = slo_s
        # Seconds from first token to finish of recently completed requests.
        self._service: deque[float] = deque(maxlen=SERVICE_WINDOW)
        # Seconds between admission rounds (engine steps); the median ignores idle gaps.
        self._steps: deque[float] = deque(maxlen=SERVICE_WINDOW)
        self._last_round: float | None = None

    def on_finish(self, seq: Sequence, now: float) -> None:
        if seq.first_token_time is not None and seq.finish_reason in ("stop", "length"):
            self._service.append(now - seq.first_token_time)

    def hold_time(self) -> float | None:
        """Seconds a request holds its place in the batch: from its first token to its finish,
        plus one engine step (its prefill, or the wait for the round that admits the next);
        None before any request has finished."""
        if not self._service:
            return None
        step = statistics.median(self._steps) if self._steps else 0.0
        return sum(self._service) / len(self._service) + step

    def admission_times(self, running: list[Sequence], now: float) -> Iterator[float]:
        """Seconds from now until the 1st, 2nd, ... waiting request gets a place: each running
        request frees its place after the rest of its hold time, and so does each admitted one.
        Nothing when no request runs or the hold time is not measured yet."""
        hold = self.hold_time()
        if hold is None or not running:
            return
        # [places]: seconds until each place of the batch is free.
        free = [hold if s.first_token_time is None else max(0.0, hold - (now - s.first_token_time))
                for s in running]
        heapq.heapify(free)
        while True:
            t = heapq.heappop(free)
            yield t
            heapq.heappush(free, t + hold)

    def refusals(self, waiting: deque[Sequence], running: list[Sequence], now: float,
                 estimate: bool) -> list[SloUnattainableError | None]:
        """Walk the queue in order: a request whose wait so far plus the time until a place
        frees for it (after those kept ahead of it) passes the SLO is refused; the others are
        kept and served in order. A request that already streamed tokens (preempted) is never
        refused. Without ``estimate`` (before admission) only requests already past the SLO
        are; with it, before anything was measured, likewise."""
        if estimate:
            if self._last_round is not None:
                self._steps.append(now - self._last_round)
            self._last_round = now
        places = self.admission_times(running, now) if estimate else iter(())
        out: list[SloUnattainableError | None] = []
        ahead = 0
        for seq in waiting:
            if seq.first_token_time is not None:
                out.append(None)
                ahead += 1
                next(places, None)
                continue
            waited = now - seq.arrival
            wait = next(places, 0.0)
            if waited + wait > self.slo_s:
                out.append(self._error(waited + wait, ahead, wait))
                places = itertools.chain([wait], places)  # the place goes to the next one
            else:
                out.append(None)
                ahead += 1
                if estimate and self._service:
                    seq.expected_first_token = now + wait
        return out

    def _error(self, expected: float, ahead: int, wait: float) -> SloUnattainableError:
        # Retry when the requests kept ahead have their places.
        return SloUnattainableError(
            f"The engine cannot produce the first token within the {self.slo_s:g} s SLO "
            f"(expected {expected:.1f} s with {ahead} requests ahead); the request was not "
            "served. Retry later or on another replica.", retry_after_s=max(1, math.ceil(wait)))


class VtcPolicy(Policy):
    """Virtual token counters: the least-served active tenant's oldest request goes first."""

    name = "vtc"

    def __init__(self) -> None:
        # Counters of active tenants (requests waiting or running); an inactive tenant's entry is
        # dropped, as lifting on its return overrides it anyway.
        self.counters: dict[str, float] = {}
        self._active: dict[str, int] = {}  # tenant -> requests waiting or running
        self._floor = 0.0  # the largest counter a tenant had when it went idle

    @staticmethod
    def tenant(seq: Sequence) -> str:
        return seq.tenant or ""

    def lane(self, seq: Sequence) -> object:
        return self.tenant(seq)

    def on_add(self, seq: Sequence) -> None:
        t = self.tenant(seq)
        if self._active.get(t, 0) == 0:
            # Newly active: lift to the smallest active counter (or, with nobody active, to the
            # largest counter seen when tenants left), so time spent idle is not credit.
            active = [self.counters[u] for u, n in self._active.items() if n > 0]
            self.counters[t] = max(self.counters.get(t, 0.0),
                                   min(active) if active else self._floor)
        self._active[t] = self._active.get(t, 0) + 1

    def on_finish(self, seq: Sequence, now: float) -> None:
        t = self.tenant(seq)
        n = self._active.get(t, 0) - 1
        if n > 0:
            self._active[t] = n
            return
        self._active.pop(t, None)
        self._floor = max(self._floor, self.counters.pop(t, 0.0))

    def on_scheduled(self, seqs: list[Sequence], num_new: list[int]) -> None:
        for seq, n in zip(seqs, num_new, strict=True):
            prompt = max(0, min(n, len(seq.prompt_ids) - seq.num_computed))
            t = self.tenant(seq)
            self.counters[t] = (self.counters.get(t, 0.0) + PROMPT_WEIGHT * prompt
                                + OUTPUT_WEIGHT * (n - prompt))

    def order(self, waiting: deque[Sequence], running: list[Sequence]) -> Iterator[Sequence]:
        """Simulates VTC's picks: the smallest counter's next request, charged its prompt."""
        if len(self._active) <= 1:
            return iter(waiting)  # one tenant: queue order, without a pass over the queue
        return self._fair_order(waiting)

    def _fair_order(self, waiting: deque[Sequence]) -> Iterator[Sequence]:
        queues: dict[str, deque[Sequence]] = {}
        for seq in waiting:
            queues.setdefault(self.tenant(seq), deque()).append(seq)
        heap = [(self.counters.get(t, 0.0), i, t) for i, t in enumerate(queues)]
        heapq.heapify(heap)
        while heap:
            counter, i, t = heapq.heappop(heap)
            seq = queues[t].popleft()
            yield seq
            if queues[t]:
                heapq.heappush(heap, (counter + PROMPT_WEIGHT * seq.num_uncomputed, i, t))


def make_policy(config: EngineConfig) -> Policy:
    """The policy an engine config names."""
    name = config.scheduling_policy
    if name == "fcfs":
        return Policy()
    if name == "cluster":
        return ClusterPolicy()
    if name == "abort":
        return AbortPolicy(config.slo_first_token)
    if name == "vtc":
        return VtcPolicy()
    raise ValueError(f"unknown scheduling policy {name!r}; choose one of {', '.join(POLICIES)}")


def upcoming_adapters(seqs: Iterable[Sequence], limit: int, scan: int) -> list[Adapter]:
    """The first ``limit`` distinct adapters of the first ``scan`` requests in the given order."""
    out: dict[int, Adapter] = {}
    for seq in itertools.islice(seqs, scan):
        if seq.adapter is not None and seq.adapter.id not in out:
            out[seq.adapter.id] = seq.adapter
            if len(out) >= limit:
                break
    return list(out.values())
