"""Stateful property test of the real Scheduler + AdapterCache + DevicePool, without a model.

The engine's step is emulated: ``scheduler.schedule()``, then each scheduled sequence advances by
its token count and, once all its tokens are computed, gets a fake sampled token and finishes at
its max_tokens. Requests arrive, are aborted while waiting or running, and adapters are
registered and unregistered (also while requests that use them wait or run). After every rule the
pool's pages must be accounted for exactly; at the end, with admissions stopped, every request
must finish within a bounded number of steps and the pool must be empty once adapters are gone.

Rule derived from the scheduler: a waiting sequence holds no KV page and no adapter pin. Preemption
frees both; a failed admission allocates nothing (``make_room`` is checked before ``allocate``) and
releases the pin it took. So KV pages in use == the sum of running sequences' block tables.

Adapters come from memory sources through the host tier, bounded to two of the largest adapters
(so host evictions happen), with prefetch on (schedule() calls it every step); the host tier's
bytes must add up and stay within its capacity, and drop to zero once adapters are gone.

Decision on requests queued before their adapter is unregistered: they keep the adapter, like
running ones (``unload_adapter``: "running ones finish, then its pages are freed"); the adapter is
loaded again for them if it had been evicted, and dropped with its last user.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable

import hypothesis.strategies as st
import torch
from hypothesis import HealthCheck, Phase, event, settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from loraplane.engine.adapter_cache import Adapter, AdapterCache
from loraplane.engine.adapters import LoraWeights, random_lora_weights
from loraplane.engine.config import LORA_MODULES, NAMED_SHAPES, EngineConfig
from loraplane.engine.memory_pool import ADAPTER, KV, DevicePool, PoolLayout
from loraplane.engine.sampling_params import SamplingParams
from loraplane.engine.scheduler import ScheduledBatch, Scheduler
from loraplane.engine.sequence import Sequence, Status

CONFIG = NAMED_SHAPES["tiny"]
BLOCK_SIZE = 8
NUM_PAGES = 42
MAX_RANK = 16
MAX_PROMPT = 48
MAX_TOKENS = 32
ADAPTER_NAMES = ("a0", "a1", "a2", "a3")
ENGINE = EngineConfig(block_size=BLOCK_SIZE, max_num_seqs=6, max_num_batched_tokens=16)
LAYOUT = PoolLayout.for_model(CONFIG, BLOCK_SIZE)


def adapter_pages(rank: int, modules: tuple[str, ...]) -> int:
    elems = sum(rank * sum(CONFIG.module_shape(m)) for m in modules)
    return LAYOUT.pages_for_chunks(elems // LAYOUT.chunk)


# Host bytes of the largest adapter (rank MAX_RANK on every module, float32, whole pages), twice.
HOST_BYTES = 2 * adapter_pages(MAX_RANK, LORA_MODULES) * LAYOUT.page_bytes(torch.float32)


# Every request fits the pool alone (largest adapter + its KV), which is what rules out starvation.
assert adapter_pages(MAX_RANK, LORA_MODULES) + -(-(MAX_PROMPT + MAX_TOKENS) // BLOCK_SIZE) \
    <= NUM_PAGES


def random_weights(rank: int, modules: tuple[str, ...], seed: int) -> LoraWeights:
    """LoRA weights with A [L, r, in] and B^T [L, r, out] of random values."""
    return random_lora_weights(CONFIG, rank, modules, seed=seed)


def fake_step(scheduler: Scheduler) -> tuple[ScheduledBatch, list[Sequence]]:
    """LLMEngine.step with a fake model: advance, sample token 7, finish at max_tokens."""
    batch = scheduler.schedule()
    assert batch.num_tokens <= scheduler.config.max_num_batched_tokens
    assert len(batch) <= scheduler.config.max_num_seqs
    assert len(set(map(id, batch.seqs))) == len(batch)
    for seq, n in zip(batch.seqs, batch.num_new, strict=True):
        assert seq.status is Status.RUNNING and n >= 1
        seq.num_computed += n
        assert seq.num_computed <= seq.num_tokens
        # The KV of every computed token has a page.
        assert len(seq.block_table) * scheduler.block_size >= seq.num_computed
    done = []
    for seq in batch.seqs:
        if seq.num_computed == seq.num_tokens:
            seq.output_ids.append(7)
            if len(seq.output_ids) >= seq.params.max_tokens:
                seq.finish_reason = "length"
                scheduler.finish(seq)
                done.append(seq)
    return batch, done


def guarded(method: Callable[..., None]) -> Callable[..., None]:
    """Mark the machine failed while a rule or invariant runs, so teardown skips a broken state."""
    @functools.wraps(method)
    def wrapper(self: PoolMachine, *args: object, **kwargs: object) -> None:
        self.failed = True
        method(self, *args, **kwargs)
        self.failed = False
    return wrapper


module_subsets = st.lists(st.sampled_from(LORA_MODULES), min_size=1, max_size=7, unique=True) \
    .map(lambda ms: tuple(m for m in LORA_MODULES if m in ms))


class PoolMachine(RuleBasedStateMachine):
    """Requests and adapters come and go; every page has exactly one known owner."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = DevicePool(LAYOUT, NUM_PAGES, torch.float32, torch.device("cpu"))
        self.cache = AdapterCache(self.pool, CONFIG, host_cache_bytes=HOST_BYTES)
        self.scheduler = Scheduler(ENGINE, self.pool, self.cache)
        self.live: list[Sequence] = []  # added, not finished
        self.adapters: list[Adapter] = []  # every Adapter object ever registered
        self.ids = itertools.count()
        self.reloaded_unregistered = 0  # coverage of the interesting paths, reported as events
        self.evictions = 0
        self.failed = False
        self.flat: dict[int, torch.Tensor] = {}  # id(adapter) -> its [L, elems] pool layout

    # ---- rules ----------------------------------------------------------------------------

    @initialize(specs=st.lists(st.tuples(st.integers(1, MAX_RANK), module_subsets),
                               max_size=len(ADAPTER_NAMES)))
    @guarded
    def register_some(self, specs: list[tuple[int, tuple[str, ...]]]) -> None:
        for i, (rank, modules) in enumerate(specs):
            self._register(ADAPTER_NAMES[i], rank, modules, seed=i)

    @rule(name=st.sampled_from(ADAPTER_NAMES), rank=st.integers(1, MAX_RANK),
          modules=module_subsets, seed=st.integers(0, 2**16))
    @guarded
    def register_adapter(self, name: str, rank: int, modules: tuple[str, ...], seed: int) -> None:
        self._register(name, rank, modules, seed)

    def _register(self, name: str, rank: int, modules: tuple[str, ...], seed: int) -> None:
        if name in self.cache:
            return
        weights = random_weights(rank, modules, seed)
        adapter = self.cache.add(name, f"/adapters/{name}", weights)
        assert not adapter.resident  # source tier only until first use
        assert self.cache.pages_needed(adapter) == adapter_pages(rank, modules)
        self.adapters.append(adapter)
        self.flat[id(adapter)] = weights.flatten(CONFIG)

    @rule(name=st.sampled_from(ADAPTER_NAMES))
    @guarded
    def unregister_adapter(self, name: str) -> None:
        if name not in self.cache:
            return
        adapter = self.cache.get(name)
        self.cache.remove(name)
        assert name not in self.cache
        if adapter.active == 0:
            assert not adapter.resident

    @rule(requests=st.lists(st.tuples(st.integers(1, MAX_PROMPT), st.integers(1, MAX_TOKENS),
                                       st.integers(0, len(ADAPTER_NAMES))), min_size=1, max_size=4))
    @guarded
    def add_requests(self, requests: list[tuple[int, int, int]]) -> None:
        """Queue (prompt length, max_tokens, adapter pick) requests; pick 0 is the base model."""
        for prompt_len, max_tokens, pick in requests:
            # Like LLMEngine.add_request: only registered adapters (or the base model) are taken.
            names = [a.name for a in self.cache.all()]
            adapter = self.cache.get(names[pick % len(names)]) if names and pick else None
            seq = Sequence(f"req-{next(self.ids)}", [3] * prompt_len,
                           SamplingParams(max_tokens=max_tokens), adapter)
            self.scheduler.add(seq)
            self.live.append(seq)

    @rule()
    @guarded
    def step(self) -> None:
        self._step()

    @precondition(lambda self: self.live)
    @rule(pick=st.integers(0, 63))
    @guarded
    def abort(self, pick: int) -> None:
        # Like LLMEngine.abort, for a waiting or a running request.
        seq = self.live.pop(pick % len(self.live))
        seq.finish_reason = "abort"
        self.scheduler.finish(seq)
        assert seq.finished and not seq.block_table and not seq.holds_adapter

    @precondition(lambda self: self.scheduler.has_work())
    @rule(steps=st.integers(1, 8))
    @guarded
    def run_a_while(self, steps: int) -> None:
        for _ in range(steps):
            self._step()

    def _step(self) -> None:
        before = [a for a in self.adapters if a.resident]
        gone = [a for a in self.adapters if a.unloading and not a.resident]
        _, done = fake_step(self.scheduler)
        after = [a for a in self.adapters if a.resident]
        if after != before:  # only schedule() loads adapters: check what a load could overwrite
            self.check_resident_weights()
        self.reloaded_unregistered += sum(a.resident for a in gone)
        self.evictions += sum(not a.resident and not a.unloading for a in before)
        for seq in done:
            self.live.remove(seq)

    # ---- invariants -----------------------------------------------------------------------

    @invariant()
    @guarded
    def pages_have_exactly_one_owner(self) -> None:
        pages = self.pool.pages
        pages.check_invariants()
        self.cache.check_invariants()
        sched = self.scheduler
        for seq in sched.waiting:
            assert seq.status is Status.WAITING
            assert not seq.block_table and not seq.holds_adapter
            assert seq.num_computed == 0
        for seq in sched.running:
            assert seq.status is Status.RUNNING
            assert seq.holds_adapter == (seq.adapter is not None)
            assert seq.adapter is None or seq.adapter.resident
        assert {id(s) for s in self.live} == {id(s) for s in [*sched.waiting, *sched.running]}
        assert len(self.live) == len(sched.waiting) + len(sched.running)

        kv = [p for s in sched.running for p in s.block_table]
        assert pages.num_used(KV) == len(kv)
        resident = [a for a in self.adapters if a.resident]
        ad = [p for a in resident for p in a.pages]
        assert pages.num_used(ADAPTER) == len(ad)
        owned = kv + ad
        assert len(set(owned)) == len(owned), "a page has two owners"
        assert len(owned) == pages.num_pages - pages.num_free

        registered = {id(a) for a in self.cache.all()}
        dropping = {id(a) for a in self.cache._dropping}
        for a in self.adapters:
            users = sum(1 for s in sched.running if s.adapter is a)
            assert a.active == users, f"{a.name}: active {a.active}, {users} running users"
            assert (id(a) in registered) != a.unloading
            if a.resident:
                # Resident adapters are registered, or unregistered but still in use.
                assert id(a) in registered or (id(a) in dropping and a.active > 0)
                assert len(a.pages) == self.cache.pool.layout.pages_for_chunks(a.num_chunks)
            else:
                assert a.active == 0 and id(a) not in dropping

    def check_resident_weights(self) -> None:
        """Each resident adapter's chunks hold its weights (no load overwrote another's pages)."""
        for a in self.adapters:
            if not a.resident:
                continue
            flat = self.flat[id(a)]  # [L, elems]
            for layer in range(CONFIG.num_layers):
                got = self.pool.chunks_layer(layer)[a.chunk_table].reshape(-1)
                assert torch.equal(got, flat[layer]), f"{a.name}'s pages were overwritten"
            if a.contiguous_start is not None:
                start = a.contiguous_start
                assert a.chunk_table.tolist() == list(range(start, start + a.num_chunks))

    def teardown(self) -> None:
        if self.failed:
            return  # a rule or invariant raised: hypothesis reports that, not what follows
        # Stop admissions: everything queued finishes within a bounded number of steps. The
        # oldest running sequence is never preempted and advances every step, so each request
        # needs at most prompt + max_tokens steps once it leads, plus one step to be admitted.
        bound = sum(len(s.prompt_ids) + s.params.max_tokens + 1 for s in self.live)
        steps = 0
        while self.scheduler.has_work():
            assert steps <= bound, f"no progress after {steps} steps: {len(self.live)} left"
            self._step()
            self.pages_have_exactly_one_owner()
            steps += 1
        assert not self.live
        # The engine's next step (any step) frees what unregistered adapters took for queued
        # requests that were aborted since.
        self._step()
        for name in list(ADAPTER_NAMES):
            if name in self.cache:
                self.cache.remove(name)
        self.pages_have_exactly_one_owner()
        assert self.pool.pages.num_free == NUM_PAGES
        assert not self.cache._dropping
        assert self.cache.host.used == 0
        # Coverage of the interesting paths (pytest --hypothesis-show-statistics).
        event(f"preemptions > 0: {self.scheduler.num_preemptions > 0}")
        event(f"idle adapters evicted for room: {self.evictions > 0}")
        event(f"adapters reloaded after unregistering: {self.reloaded_unregistered > 0}")


PoolMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=60, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    phases=[p for p in Phase if p is not Phase.explain])  # explain traces every line: minutes
TestPool = PoolMachine.TestCase


def small_engine(num_pages: int) -> tuple[DevicePool, AdapterCache, Scheduler]:
    pool = DevicePool(LAYOUT, num_pages, torch.float32, torch.device("cpu"))
    cache = AdapterCache(pool, CONFIG)
    return pool, cache, Scheduler(ENGINE, pool, cache)


def drain(scheduler: Scheduler, max_steps: int = 1000) -> None:
    for _ in range(max_steps):
        if not scheduler.has_work():
            return
        fake_step(scheduler)
        scheduler.pool.pages.check_invariants()
    raise AssertionError(f"work left after {max_steps} steps")


def test_queued_request_keeps_its_unregistered_adapter() -> None:
    """Unregistered while its request waits (not resident): loaded for it, dropped after it."""
    pool, cache, scheduler = small_engine(NUM_PAGES)
    adapter = cache.add("a0", "/a0", random_weights(4, ("q_proj", "v_proj"), seed=0))
    seq = Sequence("r", [3] * 10, SamplingParams(max_tokens=3), adapter)
    scheduler.add(seq)
    cache.remove("a0")  # idle and not resident: nothing to free now
    assert pool.pages.num_free == NUM_PAGES
    fake_step(scheduler)
    assert adapter.resident and adapter.active == 1 and seq in scheduler.running
    drain(scheduler)
    assert seq.finish_reason == "length" and len(seq.output_ids) == 3
    assert not adapter.resident and adapter.active == 0 and not cache._dropping
    assert pool.pages.num_free == NUM_PAGES


def test_preempted_request_keeps_its_unregistered_adapter() -> None:
    """Unregistered while running, then preempted (the last pin goes): reloaded when readmitted."""
    # 8 pages of 8 tokens: B alone grows to 7 KV pages, A's adapter takes 1 page.
    pool, cache, scheduler = small_engine(8)
    adapter = cache.add("a0", "/a0", random_weights(1, ("q_proj",), seed=0))
    assert cache.pages_needed(adapter) == 1
    b = Sequence("b", [3] * 16, SamplingParams(max_tokens=40))
    a = Sequence("a", [3] * 16, SamplingParams(max_tokens=20), adapter)
    scheduler.add(b)
    scheduler.add(a)
    fake_step(scheduler)
    fake_step(scheduler)
    assert scheduler.running == [b, a] and adapter.active == 1
    cache.remove("a0")
    assert adapter.resident and cache._dropping == [adapter]
    while scheduler.num_preemptions == 0:
        fake_step(scheduler)
    # A's last pin went with the preemption, so did its pages. It is not readmitted in the same
    # step: its whole prefill (4 pages) + the adapter's page no longer fit beside B.
    assert scheduler.waiting[0] is a and not adapter.resident and not cache._dropping
    drain(scheduler)
    assert scheduler.num_preemptions == 1
    assert a.finish_reason == b.finish_reason == "length"
    assert len(a.output_ids) == 20 and len(b.output_ids) == 40
    assert not adapter.resident and adapter.active == 0 and not cache._dropping
    assert pool.pages.num_free == 8
