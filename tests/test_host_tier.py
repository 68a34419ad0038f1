"""The host tier's own memory (page-sized blocks from chunks) and the bounds on prefetch work.

CPU only: loads run on the real worker threads (waited for with `wait`, never on timings). A
host->GPU copy in flight is stood in for by an event that completes when the test says so (on
the CPU copies are synchronous), the only part not real here.
"""

from __future__ import annotations

import random

import pytest
import torch

from loraplane.engine.adapter_cache import MAX_COPIES, Adapter, AdapterCache
from loraplane.engine.adapter_source import AdapterSource, MemorySource
from loraplane.engine.adapters import LoraWeights, random_lora_weights
from loraplane.engine.config import NAMED_SHAPES
from loraplane.engine.errors import InvalidAdapterError
from loraplane.engine.host_tier import HostTier
from loraplane.engine.memory_pool import DevicePool, PoolLayout
from loraplane.engine.prefetch import GPU_AHEAD

CONFIG = NAMED_SHAPES["tiny"]
LAYOUT = PoolLayout.for_model(CONFIG, 8)
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
BLOCK = LAYOUT.page_bytes(torch.float32)


def weights(rank: int, seed: int) -> LoraWeights:
    return random_lora_weights(CONFIG, rank, MODULES, seed=seed)


def pages_of(w: LoraWeights) -> int:
    return -(-w.elems_per_layer(CONFIG) // LAYOUT.page_elems_per_layer)


class Threaded(MemorySource):
    """In-memory weights read on a loader thread (as a folder's are), or failing there."""

    def __init__(self, weights: LoraWeights, fail: bool = False) -> None:
        super().__init__(weights, threaded=True)
        self.fail = fail

    def read(self, dtype: torch.dtype) -> LoraWeights:
        if self.fail:
            raise InvalidAdapterError("unreadable")
        return self.weights


def settle(host: HostTier[str]) -> list[tuple[str, InvalidAdapterError | None]]:
    done = []
    while host.num_loading:
        host.wait(0.05)
        done += host.poll()
    return done


def test_blocks_hold_the_pool_layout_and_bytes_are_whole_pages() -> None:
    host: HostTier[str] = HostTier(64 * BLOCK, CONFIG, LAYOUT, torch.float32, pin=False,
                                   workers=2)
    w = weights(5, 0)  # the last page is partly used
    n = pages_of(w)
    assert w.elems_per_layer(CONFIG) % LAYOUT.page_elems_per_layer
    stale = weights(16, 1)  # fills blocks first: the tail must not keep its values
    assert host.start("stale", MemorySource(stale), pages_of(stale), lambda k: True)
    host.drop("stale")
    assert host.start("a", Threaded(w), n, lambda k: True)
    assert host.used == n * BLOCK and host.loading("a") and host.blocks("a") is None
    assert settle(host) == [("a", None)]
    runs = host.blocks("a")
    assert runs is not None and sum(len(r) for r in runs) == n
    got = torch.cat([p for run in runs for p in run], dim=1)  # [L, n * page_elems]
    flat = w.flatten(CONFIG)
    torch.testing.assert_close(got[:, :flat.shape[1]], flat)
    assert torch.all(got[:, flat.shape[1]:] == 0)
    host.check_invariants()

    # Into the pool through write_blocks: the same as the flat layout through write_pages.
    pages = [7, 2, 9, 4, 11, 0][:n]
    a, b = (DevicePool(LAYOUT, 12, torch.float32, torch.device("cpu")) for _ in range(2))
    a.data.fill_(-1.0)
    b.data.fill_(-1.0)
    a.write_blocks(pages, runs)
    b.write_pages(pages, flat)
    assert torch.equal(a.data, b.data)


def test_lru_eviction_frees_blocks_for_the_next_load() -> None:
    w = weights(8, 0)
    n = pages_of(w)
    host: HostTier[str] = HostTier(3 * n * BLOCK + BLOCK - 1, CONFIG, LAYOUT, torch.float32,
                                   pin=False, workers=2)
    assert host.num_blocks == 3 * n  # bytes under a whole block do not count
    for k in "abc":
        assert host.start(k, Threaded(w), n, lambda k: True)
    settle(host)
    assert host.free < n * BLOCK
    host.blocks("a")  # a use: b is now the least recent
    assert not host.start("d", Threaded(w), n, lambda k: k == "x")  # nothing may go
    assert host.start("d", Threaded(w), n, lambda k: True)
    settle(host)
    assert [k for k in "abcd" if host.loaded(k)] == ["a", "c", "d"]
    assert host.used == 3 * n * BLOCK
    host.check_invariants()


@pytest.mark.parametrize("seed", range(4))
def test_no_block_leaks_after_random_loads_drops_and_failures(seed: int) -> None:
    rng = random.Random(seed)
    sets = [weights(r, i) for i, r in enumerate((1, 4, 8, 16))]
    host: HostTier[str] = HostTier(20 * BLOCK, CONFIG, LAYOUT, torch.float32, pin=False,
                                   workers=2)
    keys = [f"k{i}" for i in range(12)]
    expected: dict[str, LoraWeights] = {}
    for _ in range(300):
        k = rng.choice(keys)
        op = rng.random()
        if op < 0.5 and k not in host:
            w = rng.choice(sets)
            source: AdapterSource = Threaded(w, fail=rng.random() < 0.2) \
                if rng.random() < 0.7 else MemorySource(w)
            keep = set(rng.sample(keys, 3))  # entries that may not be evicted
            if host.start(k, source, pages_of(w), lambda v, keep=keep: v not in keep):
                expected[k] = w
        elif op < 0.8:
            host.drop(k)
        elif op < 0.9:
            host.wait(0.01)
            for key, error in host.poll():
                assert (error is None) == host.loaded(key)
        else:
            host.blocks(k)
        host.check_invariants()
    settle(host)
    host.check_invariants()
    for k in keys:  # every loaded entry holds its own weights: no two share a block
        runs = host.blocks(k)
        if runs is not None:
            flat = expected[k].flatten(CONFIG)
            got = torch.cat([p for run in runs for p in run], dim=1)[:, :flat.shape[1]]
            assert torch.equal(got, flat)
    for k in keys:
        host.drop(k)
    assert host.used == 0
    host.check_invariants()


class PendingCopy:
    """Stands in for a copy's CUDA event: done when the test says so."""

    def __init__(self) -> None:
        self.done = False

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.done = True


def loaded_cache(n: int) -> tuple[AdapterCache, list[Adapter]]:
    """A cache with prefetch whose n adapters are all in host RAM and none on the GPU."""
    w = weights(4, 0)
    pool = DevicePool(LAYOUT, 40 * n * pages_of(w), torch.float32, torch.device("cpu"))
    cache = AdapterCache(pool, CONFIG, host_cache_bytes=4 * n * pages_of(w) * BLOCK)
    ads = [cache.add(f"a{i}", "", w) for i in range(n)]  # in memory: loads at once
    for a in ads:
        assert cache.start_host_load(a, lambda v: False) and cache.host.loaded(a)
    return cache, ads


def test_gpu_prefetch_only_for_the_next_admissions() -> None:
    cache, ads = loaded_cache(GPU_AHEAD + 6)
    cache.prefetch(ads)
    assert [a.resident for a in ads] == [True] * GPU_AHEAD + [False] * 6
    assert cache.stats.prefetch_unused == 0
    cache.check_invariants()


def test_copies_in_flight_are_bounded_and_started_in_admission_order() -> None:
    cache, ads = loaded_cache(MAX_COPIES + 3)
    busy, rest = ads[:MAX_COPIES], ads[MAX_COPIES:]
    events = []
    for a in busy:  # their copies are in flight
        cache.prefetch([a])
        assert a.resident
        a.copy_event = ev = PendingCopy()  # type: ignore[assignment]
        cache._copying.append(a)
        events.append(ev)
    cache.prefetch(rest)
    assert not any(a.resident for a in rest)
    assert not cache.acquire(rest[1])  # a demand copy waits for a place too
    assert not rest[1].resident
    events[0].done = True  # one copy ends: a place is free
    assert cache.acquire(rest[1]) and rest[1].ready and busy[0].ready
    cache.release(rest[1])
    cache.prefetch(rest)  # on the CPU copies end at once: each takes the free place in turn
    assert all(a.ready for a in rest)
    for ev in events[1:]:
        ev.done = True
    cache.poll()
    assert not cache._copying
    cache.check_invariants()
