"""The benchmark's request trace: arrival statistics, popularity, lengths, ranks, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from loraplane.engine.bench.metrics import StepRecord, decode_steps
from loraplane.engine.bench.workload import (
    SETTINGS,
    WorkloadSpec,
    adapter_ranks,
    make_trace,
    prompt_ids,
)


@pytest.mark.parametrize("cv", [0.5, 1.0, 2.0])
def test_arrival_rate_and_cv(cv: float) -> None:
    trace = make_trace(WorkloadSpec(20_000, 10, rate=8.0, cv=cv, seed=1))
    gaps = np.diff([r.arrival for r in trace])
    assert trace[0].arrival == 0.0
    assert np.all(gaps >= 0)
    assert 1 / gaps.mean() == pytest.approx(8.0, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.1)


def test_popularity_uniform_and_skewed() -> None:
    n = 100
    uniform = np.bincount([r.adapter for r in make_trace(WorkloadSpec(20_000, n, 1.0))],
                          minlength=n)
    skewed = np.bincount([r.adapter for r in make_trace(WorkloadSpec(20_000, n, 1.0,
                                                                     alpha=0.3))], minlength=n)
    assert uniform.max() < 2 * uniform.mean()
    # power(0.3): P(index < n/10) = 0.1**0.3 ≈ 0.50
    assert skewed[: n // 10].sum() / skewed.sum() == pytest.approx(0.1**0.3, abs=0.03)
    assert skewed[0] > 10 * skewed[-10:].mean()


def test_lengths_in_range_and_adapters_valid() -> None:
    spec = WorkloadSpec(2_000, 7, 1.0, input_range=(8, 512), output_range=(3, 9))
    trace = make_trace(spec)
    assert {r.input_len for r in trace} <= set(range(8, 513))
    assert {r.output_len for r in trace} == set(range(3, 10))
    assert min(r.input_len for r in trace) < 20 and max(r.input_len for r in trace) > 500
    assert {r.adapter for r in trace} == set(range(7))


def test_no_lora_and_round_robin() -> None:
    assert all(r.adapter is None for r in make_trace(WorkloadSpec(50, 0, 1.0)))
    rr = make_trace(WorkloadSpec(10, 4, 1.0, round_robin_adapters=True))
    assert [r.adapter for r in rr] == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]


def test_ranks_round_robin() -> None:
    assert adapter_ranks(6, SETTINGS["S2"].ranks) == [8, 16, 32, 64, 8, 16]
    assert adapter_ranks(3, SETTINGS["S1"].ranks) == [8, 8, 8]
    assert adapter_ranks(0, SETTINGS["S4"].ranks) == []


def test_deterministic_by_seed() -> None:
    spec = WorkloadSpec(100, 10, 2.0, alpha=0.5, seed=3)
    assert make_trace(spec) == make_trace(spec)
    assert make_trace(spec) != make_trace(WorkloadSpec(100, 10, 2.0, alpha=0.5, seed=4))
    r = make_trace(spec)[5]
    assert prompt_ids(r, 32000, 0) == prompt_ids(r, 32000, 0)
    ids = prompt_ids(r, 32000, 0)
    assert len(ids) == r.input_len and len(set(ids)) > 1 and min(ids) >= 3


def test_invalid_specs() -> None:
    with pytest.raises(ValueError, match="num_requests"):
        make_trace(WorkloadSpec(0, 1, 1.0))
    with pytest.raises(ValueError, match="input range"):
        make_trace(WorkloadSpec(1, 1, 1.0, input_range=(9, 8)))


def test_adapter_count_keeps_arrivals_and_lengths() -> None:
    def shape(n: int) -> list[tuple[float, int, int]]:
        return [(r.arrival, r.input_len, r.output_len) for r in make_trace(WorkloadSpec(50, n,
                                                                                        3.0))]

    assert shape(0) == shape(5) == shape(2000)


def test_decode_split_reports_the_adapter_bytes_a_decode_step_read() -> None:
    steps = [StepRecord(0.5, 4, False), StepRecord(0.010, 4, True, 2, 4_270_000_000),
             StepRecord(0.012, 4, True, 3, 6_405_000_000), StepRecord(0.011, 3, True, 3,
                                                                      6_405_000_000)]
    d = decode_steps(steps)
    assert d["decode_steps"] == 3 and d["other_steps_s"] == 0.5
    assert d["decode_adapters_p50"] == 3 and d["decode_lora_mb_p50"] == 6405.0
    # 6.405 GB at the H200's 4.27 TB/s copy bandwidth: 1.5 ms at the least.
    assert d["decode_lora_floor_ms_p50"] == 1.5
