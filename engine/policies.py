"""Admission policies: the order waiting requests are tried in, and which are refused early.

The scheduler owns the mechanics (token budget, KV pages, adapter pins, the per-batch adapter cap,
skipping a request whose adapter cannot be used this step, the starvation bound); a policy only
says, from the waiting queue, which request to try next, and keeps the accounting it needs:

- ``fcfs``: queue order (arrival order, preempted requests first).
- ``cluster`` (S-LoRA's adapter clustering): requests whose adapter the running batch already uses
  first, the others after them in queue order; with ``max_adapters_per_batch`` it bounds the
  distinct adapters of a batch.
- ``abort`` (S-LoRA's early abort): queue order, but a request that can no longer get its first
  token within the SLO, from its wait so far, when it would be admitted (after those kept ahead,
  at the admission rate measured while requests waited) and the measured time from admission to
  first token, is refused at once with ``SloUnattainableError`` instead of being served late.
- ``vtc`` (virtual token counters, Sheng et al., "Fairness in Serving LLMs"): the waiting request
  of the tenant with the smallest counter of served tokens goes first; a tenant that becomes active
  starts at the smallest active counter, so idling banks no credit. With one tenant (or none named)
  this is ``fcfs``.
"""

from __future__ import annotations

import heapq
import itertools
import math
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
# Finished requests whose admission -> first token time the early-abort estimate averages over.
SERVICE_WINDOW = 64
# Share of the SLO of measured backlog before the early-abort estimate trusts its admission rate.
MEASURED_SHARE = 0.25


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
    """S-LoRA's early abort: refuse at once the requests that would miss the first-token SLO.

    A waiting request's first token is expected after the requests kept ahead of it and itself
    are admitted, at the admission rate measured while requests waited (whatever bounds it:
    batch places, token budget, KV pages, adapter loads), plus the measured time from admission
    to first token (its prefill, in chunks under the token budget). Both are measured, not
    modelled: an estimate from the service times of finished requests favours the short ones
    that finish first, and leaves out the prefill.
    """

    name = "abort"

    def __init__(self, slo_s: float) -> None:
        if not slo_s > 0:
            raise ValueError(f"the first-token SLO must be positive, not {slo_s}")
        self.slo_s = slo_s
        # Admission rounds that followed a round which left requests waiting (so any place that
        # freed in between was taken at once): (seconds since that round, requests admitted),
        # the last slo_s seconds of them, with their sums.
        self._rounds: deque[tuple[float, int]] = deque()
        self._span = 0.0
        self._admitted = 0
        self._last_round: float | None = None
        self._backlog = False  # the last round left requests waiting
        self._last_admission: float | None = None  # the last round that admitted any
        # Seconds from (last) admission to first token of recently finished requests.
        self._to_first: deque[float] = deque(maxlen=SERVICE_WINDOW)

    def on_finish(self, seq: Sequence, now: float) -> None:
        first, admitted = seq.first_token_time, seq.admitted_at
        if first is not None and admitted is not None and first >= admitted \
                and seq.finish_reason in ("stop", "length"):
            self._to_first.append(first - admitted)

    def admission_rate(self, now: float) -> float | None:
        """Requests admitted per second while requests waited, up to the last admission (the
        time since then is part of the next interval); None until a quarter of the SLO of such
        time was seen; one per measured span if nothing was admitted in it (never 0)."""
        if self._span < MEASURED_SHARE * self.slo_s:
            return None
        since = self._span if self._last_admission is None else \
            min(self._span, now - self._last_admission)
        if self._admitted == 0 or since >= self._span:
            return 1.0 / self._span
        return self._admitted / (self._span - since)

    def to_first_token(self) -> float:
        """Mean seconds from admission to first token of recent requests (0 before any)."""
        return sum(self._to_first) / len(self._to_first) if self._to_first else 0.0

    def _note_round(self, running: list[Sequence], now: float) -> None:
        """Count this round's admissions (the running requests admitted ``now``) if requests
        waited since the last round; drop rounds older than the SLO's worth of them."""
        admitted = sum(1 for s in running if s.admitted_at == now)
        if self._last_round is not None and self._backlog:
            self._rounds.append((now - self._last_round, admitted))
            self._span += now - self._last_round
            self._admitted += admitted
            while self._span - self._rounds[0][0] >= self.slo_s:
                dt, n = self._rounds.popleft()
                self._span -= dt
                self._admitted -= n
        if admitted:
            self._last_admission = now
        self._last_round = now

    def refusals(self, waiting: deque[Sequence], running: list[Sequence], now: float,
                 estimate: bool) -> list[SloUnattainableError | None]:
        """Walk the queue in order: the k-th request kept is expected to be admitted k / rate
        seconds after the next admission (one interval after the last, or now if that is
        overdue), and to get its first token ``to_first_token()`` later; one whose wait so far
        plus that passes the SLO is refused, and its place goes to the next one. A request that
        already streamed tokens (preempted) is never refused. Without ``estimate`` (before
        admission) a request is refused if even admission now would miss; before the rate is
        measured, only requests already past the SLO are."""
        if estimate:
            self._note_round(running, now)
        rate = self.admission_rate(now)
        to_first = self.to_first_token() if rate is not None else 0.0
        first = 0.0  # seconds from now to the next admission
        if estimate and rate is not None:
            last = now if self._last_admission is None else self._last_admission
            first = max(0.0, last + 1.0 / rate - now)
        out: list[SloUnattainableError | None] = []
        ahead = 0
        for seq in waiting:
            if seq.first_token_time is not None:
                out.append(None)
                ahead += 1
                continue
            # Kept in the queue unless even the optimistic estimate misses (a request kept in
            # vain is refused later at no cost); not admitted if admission now would miss.
            wait = first + ahead / rate if estimate and rate is not None else to_first
            expected = now - seq.arrival + wait
            if expected > self.slo_s:
                out.append(self._error(expected, ahead, wait))
            else:
                out.append(None)
                ahead += 1
                if estimate and rate is not None:
                    seq.expected_first_token = now + wait + to_first
        if estimate:
            self._backlog = ahead > 0
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
