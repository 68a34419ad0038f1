"""Scheduling policies: pure-logic tests of engine/policies.py on scripted queues, the real engine
(tiny random model on CPU, a fake clock where time matters) for each policy's guarantees, and real
processes for the HTTP answer of an early abort and the gateway's tenant header."""

from __future__ import annotations

import dataclasses
import json
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, Phase, event, settings
from hypothesis.stateful import invariant

from loraplane.engine.config import LORA_MODULES, EngineConfig
from loraplane.engine.engine import LLMEngine
from loraplane.engine.errors import SloUnattainableError
from loraplane.engine.outputs import RequestOutput
from loraplane.engine.policies import AbortPolicy, ClusterPolicy, Policy, VtcPolicy, make_policy
from loraplane.engine.sampling_params import SamplingParams
from loraplane.engine.scheduler import Scheduler
from loraplane.engine.sequence import Sequence, Status
from tests.gateway_procs import (
    ADMIN_TOKEN,
    Proc,
    metric,
    start_engine,
    start_gateway,
    start_redis,
    wait_engine,
)
from tests.test_pool_properties import ENGINE, PoolMachine, random_weights

PAGE_BYTES = 8192  # one pool page of the tiny model in float32 (block size 16)
ADAPTER_PAGES = 8  # a rank-8 adapter on all seven projections of the tiny model


class FakeClock:
    """The engine's clock in tests: time moves only when the test moves it."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def engine_with(clock: Callable[[], float] = time.monotonic, pool_pages: int = 256,
                adapters: int = 0, **config: object) -> LLMEngine:
    """The tiny random model on CPU with ``adapters`` rank-8 adapters named a0, a1, ..."""
    cfg = EngineConfig(pool_bytes=pool_pages * PAGE_BYTES, **config)  # type: ignore[arg-type]
    engine = LLMEngine.from_spec("random:tiny", device="cpu", engine_config=cfg, clock=clock)
    for i in range(adapters):
        engine.add_adapter(f"a{i}", "memory", random_weights(8, LORA_MODULES, seed=i))
    assert not adapters or engine.adapters.size_in_pages(engine.adapters.get("a0")) == \
        ADAPTER_PAGES
    return engine


def params(max_tokens: int = 4) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def seq(rid: str, arrival: float = 0.0, tenant: str | None = None, prompt: int = 4) -> Sequence:
    return Sequence(rid, [5] * prompt, params(), tenant=tenant, arrival=arrival)


def run_until_idle(engine: LLMEngine, max_steps: int = 2000,
                   each: Callable[[], None] | None = None) -> int:
    """Step until no work is left; returns the steps taken (fails past ``max_steps``)."""
    for step in range(max_steps):
        if not engine.has_work():
            return step
        engine.step()
        if each is not None:
            each()
    raise AssertionError(f"work left after {max_steps} steps")


# ---- pure logic on scripted queues ------------------------------------------------------------


def test_make_policy_by_name() -> None:
    assert type(make_policy(EngineConfig(scheduling_policy="fcfs"))) is Policy
    assert isinstance(make_policy(EngineConfig(scheduling_policy="cluster")), ClusterPolicy)
    abort = make_policy(EngineConfig(scheduling_policy="abort", slo_first_token=2.5))
    assert isinstance(abort, AbortPolicy) and abort.slo_s == 2.5
    assert isinstance(make_policy(EngineConfig()), VtcPolicy)  # the default
    with pytest.raises(ValueError, match="unknown scheduling policy"):
        make_policy(EngineConfig(scheduling_policy="lifo"))
    with pytest.raises(ValueError, match="positive"):
        AbortPolicy(0.0)


def test_fcfs_order_is_queue_order() -> None:
    waiting = deque(seq(f"r{i}") for i in range(5))
    assert [s.request_id for s in Policy().order(waiting, [])] == ["r0", "r1", "r2", "r3", "r4"]


def test_cluster_prefers_adapters_the_batch_runs() -> None:
    engine = engine_with(adapters=3)
    a = [engine.adapters.get(f"a{i}") for i in range(3)]
    running = [seq("run")]
    running[0].adapter = a[1]
    waiting = deque(seq(f"r{i}") for i in range(5))
    for s, ad in zip(waiting, (a[0], a[1], None, a[2], a[1]), strict=True):
        s.adapter = ad
    order = [s.request_id for s in ClusterPolicy().order(waiting, running)]
    # a1 runs already, and base-model requests use no adapter: they go first, in queue order.
    assert order == ["r1", "r2", "r4", "r0", "r3"]


def test_vtc_least_served_tenant_first_and_newcomers_lifted() -> None:
    vtc = VtcPolicy()
    waiting: deque[Sequence] = deque()
    for i in range(4):
        s = seq(f"big{i}", tenant="big", prompt=10)
        vtc.on_add(s)
        waiting.append(s)
    # "big" is served 100 prompt tokens; then "small" arrives: it starts at big's counter, not 0,
    # so it gets no credit for having been idle.
    vtc.on_scheduled([waiting.popleft()], [10])
    vtc.counters["big"] += 90
    s = seq("small0", tenant="small", prompt=10)
    vtc.on_add(s)
    waiting.append(s)
    assert vtc.counters == {"big": 100.0, "small": 100.0}
    # Equal counters: alternate, each pick charged its prompt.
    order = [s.request_id for s in vtc.order(waiting, [])]
    assert order == ["big1", "small0", "big2", "big3"]
    # A decoded token weighs twice a prompt token.
    waiting[0].num_computed = 10  # big1 decodes its first output token
    vtc.on_scheduled([waiting[0], waiting[-1]], [1, 10])
    assert vtc.counters == {"big": 102.0, "small": 110.0}
    assert [s.request_id for s in vtc.order(waiting, [])][:2] == ["big1", "big2"]
    # A tenant that leaves takes its counter with it; returning after the others were served
    # more, it starts at the smallest active counter again.
    vtc.on_finish(s, 0.0)
    assert "small" not in vtc.counters
    vtc.counters["big"] = 500.0
    back = seq("small1", tenant="small")
    vtc.on_add(back)
    assert vtc.counters["small"] == 500.0


def test_vtc_with_nobody_active_lifts_to_the_last_departure() -> None:
    vtc = VtcPolicy()
    a, b = seq("a", tenant="a"), seq("b", tenant="b")
    vtc.on_add(a)
    vtc.on_scheduled([a], [4])
    vtc.on_finish(a, 0.0)
    vtc.on_add(b)  # nobody active: b cannot start below what a had been served
    assert vtc.counters == {"b": 4.0}


def abort_round(policy: AbortPolicy, now: float, admitted: int,
                waiting: deque[Sequence]) -> list[bool]:
    """One scheduler round on a scripted queue: ``admitted`` requests were admitted at ``now``
    (the running ones here), then the policy decides; returns which waiting ones it refused."""
    running = [seq(f"admitted{i}") for i in range(admitted)]
    for s in running:
        s.admitted_at = now
    return [e is not None for e in policy.refusals(waiting, running, now, estimate=True)]


def served(admitted_at: float, first_token: float) -> Sequence:
    done = seq("done")
    done.admitted_at, done.first_token_time, done.finish_reason = admitted_at, first_token, \
        "length"
    return done


def test_abort_before_measuring_refuses_only_certain_misses() -> None:
    policy = AbortPolicy(slo_s=6.0)
    preempted = seq("preempted", arrival=0.0)
    preempted.first_token_time = 1.0  # already streamed: never refused
    waiting = deque([preempted, seq("old", arrival=0.0),
                     *(seq(f"r{i}", arrival=9.0) for i in range(50))])
    # No backlog was measured yet: however long the queue, only the request past its SLO goes.
    assert abort_round(policy, 10.0, 0, waiting) == [False, True] + [False] * 50
    assert policy.admission_rate(10.0) is None
    assert waiting[2].expected_first_token is None


def test_abort_refuses_from_measured_admission_rate_and_first_token_time() -> None:
    policy = AbortPolicy(slo_s=6.0)
    policy.on_finish(served(admitted_at=3.0, first_token=4.0), 4.0)  # 1 s to the first token
    assert policy.to_first_token() == pytest.approx(1.0)
    queue = deque([seq("q", arrival=0.0)])
    # Two admissions a second while requests wait: 2 / s, measured over 2 s (a third of the
    # SLO, more than the quarter needed).
    for t in (0.0, 1.0):
        abort_round(policy, t, 2, queue)
    preempted = seq("preempted", arrival=0.0)
    preempted.first_token_time = 1.0
    waiting = deque([preempted, seq("old", arrival=-3.5),
                     *(seq(f"r{i}", arrival=1.0) for i in range(10))])
    refused = abort_round(policy, 2.0, 2, waiting)
    assert policy.admission_rate(2.0) == pytest.approx(2.0)
    # The next admission is 0.5 s away, then one every 0.5 s; the preempted request takes the
    # first. In the queue a request is kept unless even its admission passes the SLO: "old"
    # (waited 5.5 s) would be admitted at 6.5 s: refused, and its place goes to r0. r_k waited
    # 1 s and is admitted after 0.5 + 0.5 (k + 1) s, 2 + 0.5 k s after its arrival: r0..r8 make
    # 6 s, r9 does not.
    assert refused == [False, True] + [False] * 9 + [True]
    # Its expected first token adds the measured second from admission to first token.
    assert waiting[2].expected_first_token == pytest.approx(2.0 + 1.0 + 1.0)
    errors = policy.refusals(waiting, [], 2.0, estimate=False)
    # Before admission: refused if even admission now would miss (5.5 s waited + 1 s to the
    # first token); the queue ahead does not count.
    assert [e is not None for e in errors] == [False, True] + [False] * 10
    err = policy.refusals(waiting, [], 2.0 + 1e-9, estimate=True)[-1]
    assert isinstance(err, SloUnattainableError)
    assert err.status_code == 503 and err.code == "slo_unattainable"
    assert err.headers == {"Retry-After": "6"}  # when the ten kept ahead have their places


def test_abort_rate_follows_the_last_slo_of_backlog_and_ignores_idle_time() -> None:
    policy = AbortPolicy(slo_s=6.0)
    filler = seq("preempted", arrival=0.0)
    filler.first_token_time = 0.0  # a request that stays queued (never refused): a backlog
    queue = deque([filler])
    for t in range(4):
        abort_round(policy, float(t), 2, queue)
    assert policy.admission_rate(3.0) == pytest.approx(2.0)
    # The engine slows down to one admission every 2 s: once the 2 / s rounds are more than an
    # SLO's worth of backlog ago, the estimate is 0.5 / s.
    for t in range(4, 12):
        abort_round(policy, float(t), t % 2, queue)
    assert policy.admission_rate(11.0) == pytest.approx(0.5)
    # Just after that admission the next is expected 2 s later, then one every 2 s.
    waiting = deque([filler, seq("w", arrival=11.0)])
    abort_round(policy, 11.0 + 1e-9, 0, waiting)
    assert waiting[1].expected_first_token == pytest.approx(11.0 + 2.0 + 2.0)
    # An idle engine (nothing waiting after a round) measures nothing: the first round of a
    # burst hours later does not count the idle time as time without admissions.
    abort_round(policy, 12.0, 1, deque())
    rate = policy.admission_rate(12.0)
    abort_round(policy, 5000.0, 3, queue)
    assert policy.admission_rate(5000.0) == rate


# ---- the engine -------------------------------------------------------------------------------


def test_fcfs_default_and_tenants_change_nothing_for_one_tenant() -> None:
    engine = engine_with(max_num_seqs=1)
    seqs = [engine.add_request(f"r{i}", [5] * 4, params(2), tenant="t") for i in range(4)]
    first_tokens = []
    run_until_idle(engine, each=lambda: first_tokens.extend(
        s.request_id for s in seqs if s.first_token_time is not None
        and s.request_id not in first_tokens))
    assert first_tokens == ["r0", "r1", "r2", "r3"]


def test_cluster_cap_holds_in_every_step() -> None:
    engine = engine_with(adapters=6, pool_pages=512, scheduling_policy="cluster",
                         max_adapters_per_batch=2, max_num_seqs=8)
    seqs = [engine.add_request(f"r{i}", [5] * 6, params(3), f"a{i % 6}") for i in range(30)]
    widths = []

    def check() -> None:
        running = {s.adapter.name for s in engine.scheduler.running if s.adapter is not None}
        assert len(running) <= 2
        widths.append(len(running))

    run_until_idle(engine, each=check)
    assert all(s.finish_reason == "length" for s in seqs)
    assert max(widths) == 2  # the cap was reached, and held


def test_no_starvation_on_a_pool_that_holds_one_adapter() -> None:
    # 12 pages: one adapter (8) and KV for a few requests; two adapters never fit together.
    engine = engine_with(adapters=6, pool_pages=12, max_num_seqs=4)
    assert engine.pool.pages.num_pages < 2 * ADAPTER_PAGES
    seqs = [engine.add_request(f"r{i}", [5] * 6, params(4), f"a{(i * 7) % 6}")
            for i in range(24)]

    def check() -> None:
        assert len({s.adapter for s in engine.scheduler.running}) <= 1
        engine.pool.pages.check_invariants()

    run_until_idle(engine, each=check)
    assert all(s.finish_reason == "length" for s in seqs)
    assert engine.pool.pages.num_free + ADAPTER_PAGES >= engine.pool.pages.num_pages


@pytest.mark.parametrize("bound", [4, 1_000_000])
def test_a_stream_of_hot_requests_cannot_starve_a_cold_adapter(bound: int) -> None:
    """Requests for the resident adapter keep coming; the one for an adapter that does not fit
    beside it is skipped (no head-of-line blocking) but only ``max_passed_over`` times."""
    engine = engine_with(adapters=2, pool_pages=12, max_num_seqs=2, max_passed_over=bound)
    hot = [engine.add_request("hot0", [5] * 4, params(3), "a0")]
    engine.step()
    cold = engine.add_request("cold", [5] * 4, params(3), "a1")
    for i in range(1, 200):
        hot.append(engine.add_request(f"hot{i}", [5] * 4, params(3), "a0"))
        engine.step()
        if cold.finished:
            break
    if bound < 1000:
        assert cold.finish_reason == "length"
        # Hot requests were admitted past it while it waited (no head-of-line blocking) ...
        assert sum(s.first_token_time is not None for s in hot) > 1
    else:
        # ... and without the bound they would have kept it out for ever.
        assert not cold.finished and cold.passed_over > 100
    run_until_idle(engine)


def test_many_requests_for_an_adapter_without_room_do_not_block_the_queue() -> None:
    engine = engine_with(adapters=2, pool_pages=12, max_num_seqs=4)
    engine.add_request("hot0", [5] * 4, params(8), "a0")
    engine.step()  # a0 is resident and pinned: a1 has no room until hot0 ends
    cold = [engine.add_request(f"cold{i}", [5] * 4, params(2), "a1") for i in range(100)]
    hot = engine.add_request("hot1", [5] * 4, params(2), "a0")
    assert len(cold) > engine.engine_config.admission_lookahead
    engine.step()
    # The look-ahead counts adapters turned down, not requests: hot1 goes past all 100.
    assert hot.status is Status.RUNNING
    assert all(s.status is Status.WAITING and s.passed_over == 1 for s in cold)
    run_until_idle(engine)
    assert all(s.finish_reason == "length" for s in cold)


def test_early_abort_refuses_the_requests_that_would_miss_the_slo() -> None:
    clock = FakeClock()
    engine = engine_with(clock, scheduling_policy="abort", slo_first_token=6.0, max_num_seqs=1)
    outputs: dict[str, list[RequestOutput]] = {}

    def add(rid: str) -> Sequence:
        return engine.add_request(rid, [5] * 4, params(3), None,
                                  on_output=outputs.setdefault(rid, []).append)

    def step() -> None:  # one engine step takes one second of the fake clock
        engine.step()
        clock.t += 1.0

    # A first request measures the hold time: 3 tokens one step (a second) apart, and the step
    # after the last that admits the next: 3 s.
    add("warm")
    while engine.has_work():
        step()
    # A burst of ten at once: the first gets the place now, the second in 3 s, the third in
    # 6 s; the fourth would wait 9 s.
    burst = [add(f"r{i}") for i in range(10)]
    while engine.has_work():
        step()
    refused = [s.request_id for s in burst if s.error is not None]
    served = [s for s in burst if s.error is None]
    # The tail of the burst is refused, at once; the head is served in order, within the SLO.
    assert refused == [f"r{i}" for i in range(3, 10)]
    for s in served:
        assert s.finish_reason == "length" and s.first_token_time is not None
        assert s.first_token_time - s.arrival <= 6.0
    for rid in refused:
        (out,) = outputs[rid]  # one output: the refusal, with no token
        assert out.finished and out.finish_reason == "abort" and not out.token_ids_delta
        assert isinstance(out.error, SloUnattainableError)
    # Refused requests free nothing because they held nothing; a later request is served.
    late = add("late")
    while engine.has_work():
        step()
    assert late.error is None and late.finish_reason == "length"
    assert engine.pool.pages.num_free == engine.pool.pages.num_pages
    assert engine.stats().requests_finished == {"length": 5, "abort": 7}


@pytest.mark.parametrize("policy", ["vtc", "fcfs"])
def test_a_flooding_tenant_cannot_starve_a_light_one(policy: str) -> None:
    engine = engine_with(scheduling_policy=policy, max_num_seqs=2)
    flood = [engine.add_request(f"f{i}", [5] * 8, params(4), tenant="flood") for i in range(30)]
    for _ in range(3):
        engine.step()
    light = engine.add_request("light", [5] * 8, params(4), tenant="light")
    admitted_before = sum(s.status is not Status.WAITING for s in flood)
    while light.status is Status.WAITING:
        engine.step()
    ahead = sum(s.status is not Status.WAITING for s in flood) - admitted_before
    if policy == "vtc":
        assert ahead <= 1  # the light tenant's request takes one of the next two places
    else:
        assert ahead >= 25  # FCFS: behind the whole flood
    run_until_idle(engine)
    assert light.finish_reason == "length"


def admissions_per_step(engine: LLMEngine, steps: int = 400) -> list[tuple[int, int, int]]:
    """Step until idle; (requests admitted, slots free before, requests waiting before) of
    each step that admitted some or held back with a free slot and requests waiting."""
    sched = engine.scheduler
    out = []
    for _ in range(steps):
        if not engine.has_work():
            return out
        waiting, free = len(sched.waiting), engine.engine_config.max_num_seqs - len(sched.running)
        engine.step()
        admitted = waiting - len(sched.waiting)
        if admitted or (free and waiting):
            out.append((admitted, free, waiting))
    raise AssertionError("the engine did not finish")


def staggered(engine: LLMEngine, running: int, waiting: int) -> None:
    """`running` requests that finish one per step, then `waiting` long ones behind them."""
    for i in range(running):
        engine.add_request(f"r{i}", [5] * 4, params(max_tokens=2 + i))
    engine.step()  # all admitted at once: the batch was empty
    for i in range(waiting):
        engine.add_request(f"w{i}", [5] * 4, params(max_tokens=40))


def test_admissions_join_a_nearly_full_graph_batch_several_at_a_time() -> None:
    """With decode graphs (batch_admissions), slots freed one per step are refilled four at a
    time (a quarter of max_num_seqs), so one eager step admits them all."""
    engine = engine_with(max_num_seqs=16, admission_batch=8, admission_hold_steps=100,
                         scheduling_policy="fcfs")
    engine.scheduler.batch_admissions = True
    staggered(engine, running=16, waiting=12)
    rounds = [a for a, _, _ in admissions_per_step(engine) if a]
    assert sum(rounds) == 12
    assert rounds == [4, 4, 4], rounds
    assert engine.scheduler.num_held_steps > 0


def test_admission_hold_is_bounded_and_off_without_graphs() -> None:
    """A request is held at most admission_hold_steps decode steps while a slot is free; and
    without decode graphs (CPU, or admission_batch 1) every free slot is filled at once."""
    engine = engine_with(max_num_seqs=16, admission_hold_steps=2, scheduling_policy="fcfs")
    engine.scheduler.batch_admissions = True
    staggered(engine, running=16, waiting=12)
    seen = admissions_per_step(engine)
    held = 0
    for admitted, _, _ in seen:
        held = 0 if admitted else held + 1
        assert held <= 2, seen
    assert sum(a for a, _, _ in seen) == 12
    cpu = engine_with(max_num_seqs=16, scheduling_policy="fcfs")
    assert not cpu.scheduler.batch_admissions  # no decode graphs on the CPU
    one = engine_with(max_num_seqs=16, admission_batch=1, scheduling_policy="fcfs")
    one.scheduler.batch_admissions = True
    for engine in (cpu, one):
        staggered(engine, running=16, waiting=12)
        seen = admissions_per_step(engine)
        assert all(a == min(free, waiting) for a, free, waiting in seen), seen


def test_prefetch_gets_the_queue_adapters_in_admission_order() -> None:
    engine = engine_with(adapters=4, pool_pages=512, scheduling_policy="cluster",
                         max_num_seqs=1)
    calls: list[list[str]] = []
    prefetch = engine.adapters.prefetch
    engine.adapters.prefetch = lambda upcoming: (  # type: ignore[method-assign]
        calls.append([a.name for a in upcoming]), prefetch(upcoming))[-1]
    for i, name in enumerate(("a0", "a2", "a0", "a3", "a2", "a1")):
        engine.add_request(f"r{i}", [5] * 4, params(2), name)
    engine.step()
    # r0 (a0) runs; the cluster policy admits a0's r2 next, then the rest in queue order.
    assert calls == [["a0", "a2", "a3", "a1"]]
    run_until_idle(engine)


class ClusterCapMachine(PoolMachine):
    """The pool's state machine (random adapters, requests, aborts, unregistering) under the
    cluster policy with a cap of two adapters per batch, and skips and starvation bounds small
    enough to be hit: every page still has one owner, the cap holds, and all requests finish."""

    def __init__(self) -> None:
        super().__init__()
        config = dataclasses.replace(ENGINE, scheduling_policy="cluster", max_adapters_per_batch=2,
                                     admission_lookahead=2, max_passed_over=3)
        self.scheduler = Scheduler(config, self.pool, self.cache)

    @invariant()
    def cap_holds(self) -> None:
        assert len({s.adapter for s in self.scheduler.running if s.adapter is not None}) <= 2
        passed = max((s.passed_over for s in self.scheduler.waiting), default=0)
        event(f"most passed over: {min(passed, 3)}")  # coverage of the skip and starvation paths


ClusterCapMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=60, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    phases=[p for p in Phase if p is not Phase.explain])
TestClusterCapPool = ClusterCapMachine.TestCase


# ---- real processes ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def procs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, Proc]]]:
    folder = tmp_path_factory.mktemp("policies")
    running: dict[str, Proc] = {}
    try:
        yield folder, running
    finally:
        for p in reversed(running.values()):
            p.stop()


def test_http_early_abort_is_a_503_before_any_token(
        procs: tuple[Path, dict[str, Proc]]) -> None:
    folder, running = procs
    # One place in the batch and a 50 ms SLO: while a 600-token request holds the place (many
    # steps, far longer than 50 ms), any other request waits past its SLO and is refused.
    running["abort"], url = start_engine(folder, "engine-abort", [
        "--scheduling-policy", "abort", "--slo-first-token", "0.05", "--max-num-seqs", "1"])
    wait_engine(running["abort"], url)
    body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 600, "ignore_eos": True}
    with httpx.Client(base_url=url, timeout=60) as client:
        for _ in range(5):  # the long request itself is refused only on a stalled machine
            with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                if r.status_code != 200:
                    continue
                lines = r.iter_lines()
                assert next(lines).startswith("data: ")  # its first token: it holds the place
                short = {"model": "tiny", "prompt": [5], "max_tokens": 2}
                plain = client.post("/v1/completions", json=short)
                stream = client.post("/v1/chat/completions", json={
                    "model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 2, "stream": True})
                break
        else:
            pytest.fail("the long request was refused five times")
    for r in (plain, stream):
        assert r.status_code == 503, r.text
        assert r.headers["content-type"].startswith("application/json")
        assert int(r.headers["retry-after"]) >= 1
        error = r.json()["error"]
        assert error["code"] == "slo_unattainable" and error["type"] == "server_error"
        assert "SLO" in error["message"]
    assert metric(url, "loraplane_request_errors_total", code="slo_unattainable") == 2


def test_gateway_sends_the_tenant_to_the_engine(procs: tuple[Path, dict[str, Proc]]) -> None:
    folder, running = procs
    running["redis"], redis_url = start_redis(folder)
    running["engine"], engine = start_engine(folder, "engine-tenants")
    wait_engine(running["engine"], engine)
    running["gateway"], gateway = start_gateway(folder, "gateway", redis_url, [engine])
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    keys = {}
    for tenant in ("acme", "beta"):
        r = httpx.post(gateway + "/admin/v1/tenants", json={"name": tenant, "limits": {}},
                       headers=admin)
        assert r.status_code == 201, r.text
        r = httpx.post(gateway + f"/admin/v1/tenants/{tenant}/keys", json={"name": "k"},
                       headers=admin)
        keys[tenant] = r.json()["key"]
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 3}
    r = httpx.post(gateway + "/v1/completions", json=body, timeout=60,
                   headers={"Authorization": f"Bearer {keys['acme']}"})
    assert r.status_code == 200, r.text
    with httpx.stream("POST", gateway + "/v1/completions", json={**body, "stream": True},
                      headers={"Authorization": f"Bearer {keys['beta']}"}, timeout=60) as s:
        assert s.status_code == 200
        events = [line for line in s.iter_lines() if line.startswith("data: {")]
    assert json.loads(events[-1][6:])["choices"][0]["finish_reason"] is not None
    # The engine counted each request's tokens under the tenant the gateway authenticated.
    usage = r.json()["usage"]
    assert metric(engine, "loraplane_tenant_tokens_total", tenant="acme") == \
        usage["prompt_tokens"] + usage["completion_tokens"]
    assert metric(engine, "loraplane_tenant_tokens_total", tenant="beta") > 0
    # Straight to the engine, a malformed tenant is a 400, not a crash.
    r = httpx.post(engine + "/v1/completions", json=body, timeout=60,
                   headers={"x-loraplane-tenant": "a b"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "x-loraplane-tenant"
