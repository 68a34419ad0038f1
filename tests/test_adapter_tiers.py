"""Adapter tiers (source -> host RAM -> GPU pool and back), eviction orders, prefetch and failures.

CPU only: host->GPU copies are synchronous here, source->host loads run on the real worker
threads (tests wait for them with `AdapterCache.wait`, never on timings).
"""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraplane.engine.adapter_cache import Adapter, AdapterCache
from loraplane.engine.adapter_source import FolderSource
from loraplane.engine.adapters import WEIGHTS_FILE, read_header, write_random_adapter
from loraplane.engine.async_engine import AsyncEngine
from loraplane.engine.config import NAMED_SHAPES, EngineConfig
from loraplane.engine.engine import LLMEngine
from loraplane.engine.errors import InvalidAdapterError
from loraplane.engine.memory_pool import DevicePool, PoolLayout
from loraplane.engine.outputs import RequestOutput
from loraplane.engine.sampling_params import SamplingParams

CONFIG = NAMED_SHAPES["tiny"]
LAYOUT = PoolLayout.for_model(CONFIG, 8)
MODULES = ("q_proj", "v_proj")
LIMITS = {"max_rank": 64, "max_bytes": 1 << 30}
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


def folder(tmp: Path, name: str, rank: int = 4, seed: int = 0) -> Path:
    return write_random_adapter(tmp / name, CONFIG, rank, MODULES, seed)


def source(path: Path, name: str) -> FolderSource:
    spec = read_header(path, name, CONFIG, **LIMITS)
    return FolderSource(path, name, CONFIG, spec, **LIMITS)


def cache_of(num_pages: int = 40, host_bytes: int = 1 << 30) -> AdapterCache:
    pool = DevicePool(LAYOUT, num_pages, torch.float32, torch.device("cpu"))
    return AdapterCache(pool, CONFIG, host_cache_bytes=host_bytes, prefetch=False)


def tier(cache: AdapterCache, adapter: Adapter) -> str:
    return cache.info(adapter).tier


def to_host(cache: AdapterCache, adapter: Adapter) -> None:
    """Bring an adapter to host RAM through acquire's miss path, then drop the GPU copy."""
    for _ in range(10_000):
        if cache.acquire(adapter):
            cache.release(adapter)
            return
        cache.wait(0.05)
    raise AssertionError(f"{adapter.name} never loaded")


def test_source_host_gpu_and_back(tmp_path: Path) -> None:
    cache = cache_of()
    a = cache.add("a", str(tmp_path / "a"), source(folder(tmp_path, "a"), "a"))
    assert tier(cache, a) == "source" and cache.host.used == 0
    assert not cache.acquire(a)  # a miss starts the host load and never blocks on it
    assert a.load is not None and a.load.origin == "demand"
    while cache.host.loading(a):
        cache.wait(0.05)
    assert tier(cache, a) == "host" and cache.host.used == cache.host_bytes(a)
    assert cache.acquire(a)  # CPU: the copy is synchronous
    assert tier(cache, a) == "gpu" and a.active == 1
    cache.admitted(a)
    assert cache.stats.prefetch_misses == 1 and a.load is None
    cache.release(a)
    assert cache.make_room(cache.pool.pages.num_pages)  # KV pressure evicts the idle adapter
    assert tier(cache, a) == "host" and cache.pool.pages.num_free == cache.pool.pages.num_pages
    cache.host.drop(a)
    assert tier(cache, a) == "source" and cache.host.used == 0
    cache.check_invariants()


def test_host_lru_by_bytes(tmp_path: Path) -> None:
    small = source(folder(tmp_path, "s", rank=2), "s")
    big = source(folder(tmp_path, "b", rank=8), "b")
    probe = cache_of()
    unit = probe.host_bytes(probe.add("s", "", small))
    assert probe.host_bytes(probe.add("b", "", big)) == 4 * unit
    cache = cache_of(host_bytes=8 * unit)
    ads = {n: cache.add(n, "", small if n.startswith("s") else big)
           for n in ("s1", "s2", "b1", "b2", "b3")}

    def on_host() -> list[str]:
        return [n for n, a in ads.items() if cache.host.loaded(a)]

    for n in ("s1", "s2", "b1"):
        to_host(cache, ads[n])
    assert cache.host.used == 6 * unit
    assert cache.host.blocks(ads["s1"]) is not None  # a use: s1 is now the most recent
    # b2 needs 2 more units: the least recently used go first until it fits: s2, then b1.
    to_host(cache, ads["b2"])
    assert on_host() == ["s1", "b2"] and cache.host.used == 5 * unit
    # b2 pinned by a running request: b3 makes room from s1 alone.
    assert cache.acquire(ads["b2"])
    to_host(cache, ads["b3"])
    assert on_host() == ["b2", "b3"] and cache.host.used == 8 * unit
    # Only pinned or being-loaded entries would be left: no room, acquire waits (False).
    assert cache.acquire(ads["b3"])
    assert not cache.make_room(cache.pool.pages.num_pages)  # idle ones leave the GPU
    assert not cache.acquire(ads["s2"]) and not cache.host.loading(ads["s2"])
    cache.release(ads["b3"])
    to_host(cache, ads["s2"])  # b3 unpinned: it goes
    assert on_host() == ["s2", "b2"]
    cache.release(ads["b2"])
    cache.check_invariants()


def test_gpu_eviction_order(tmp_path: Path) -> None:
    cache = cache_of()
    path = folder(tmp_path, "x")
    ads = [cache.add(f"a{i}", "", source(path, f"a{i}")) for i in range(4)]
    for a in ads:
        to_host(cache, a)
    assert all(a.ready for a in ads)
    for a in (ads[2], ads[0], ads[3], ads[1]):  # least recent first: a2, a0, a3, a1
        assert cache.acquire(a)
        cache.release(a)
    assert cache.acquire(ads[0])  # pinned: never evicted
    cache.prefetch([ads[3]])  # the queue needs a3 next: evicted last
    per = cache.size_in_pages(ads[0])
    free = cache.pool.pages.num_free
    evicted = []
    for k in range(1, 4):
        assert cache.make_room(free + k * per)
        evicted.append([a.name for a in ads if not a.resident])
    assert evicted == [["a2"], ["a1", "a2"], ["a1", "a2", "a3"]]
    assert not cache.make_room(cache.pool.pages.num_pages)  # a0 is pinned
    cache.release(ads[0])
    cache.check_invariants()


def engine_of(prefetch: bool, max_num_seqs: int = 1, host_bytes: int = 1 << 30) -> LLMEngine:
    cfg = EngineConfig(pool_bytes=4 << 20, max_num_seqs=max_num_seqs, prefetch=prefetch,
                       host_cache_bytes=host_bytes)
    return LLMEngine.from_spec("random:tiny", device="cpu", engine_config=cfg)


def test_prefetched_adapter_gives_the_same_tokens(tmp_path: Path) -> None:
    paths = [folder(tmp_path, f"p{i}", rank=4 + 2 * i, seed=i) for i in range(4)]
    prompts: list[str | list[int]] = [[5 + i, 9, 17, 33 + i] for i in range(8)]
    names: list[str | None] = [f"p{i % 4}" for i in range(8)]
    tokens = {}
    for prefetch in (False, True):
        engine = engine_of(prefetch)  # one request at a time: the rest wait in the queue
        for i, p in enumerate(paths):
            engine.load_adapter(f"p{i}", str(p))
        seqs = engine.generate(prompts, GREEDY, names)
        tokens[prefetch] = [s.output_ids for s in seqs]
        s = engine.stats()
        if prefetch:
            assert s.tiers.prefetch_hits >= 1
        else:
            assert s.tiers.prefetch_hits == 0 and s.tiers.prefetch_misses >= 4
        assert s.tiers.prefetch_hits + s.tiers.prefetch_misses >= 4
        assert s.tiers.load_hidden_s >= 0 and s.tiers.load_exposed_s >= 0
        engine.pool.pages.check_invariants()
        engine.adapters.check_invariants()
    assert tokens[True] == tokens[False]
    assert all(len(t) == GREEDY.max_tokens for t in tokens[True])


def poison(path: Path) -> None:
    """Put a NaN in the weights without changing the header (names, shapes, dtypes)."""
    tensors = load_file(str(path / WEIGHTS_FILE))
    key = sorted(tensors)[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(path / WEIGHTS_FILE))


def test_failing_weights_fail_their_requests_only(tmp_path: Path) -> None:
    engine = engine_of(prefetch=True, max_num_seqs=4)
    good, bad = folder(tmp_path, "good"), folder(tmp_path, "bad", seed=3)
    engine.load_adapter("good", str(good))
    engine.load_adapter("bad", str(bad))  # the header is fine: registration passes
    poison(bad)
    outs: dict[str, list[RequestOutput]] = {}
    for i, name in enumerate(["bad", "good", "bad", None]):
        rid = f"r{i}"
        outs[rid] = []
        engine.add_request(rid, [3, 4, 5], GREEDY, name, outs[rid].append)
    while engine.has_work():
        engine.step()
    for rid in ("r0", "r2"):
        last = outs[rid][-1]
        assert last.finished and last.finish_reason == "error" and not last.token_ids_delta
        assert isinstance(last.error, InvalidAdapterError)
        assert "NaN or infinite" in last.error.message and "'bad'" in last.error.message
    for rid in ("r1", "r3"):
        assert outs[rid][-1].finish_reason == "length"
        assert sum(len(o.token_ids_delta) for o in outs[rid]) == GREEDY.max_tokens
    with pytest.raises(InvalidAdapterError, match="NaN or infinite"):
        engine.add_request("late", [3], GREEDY, "bad")
    info = {a.name: a for a in engine.list_adapters()}
    assert info["bad"].tier == "source" and info["good"].tier in ("gpu", "host")
    assert engine.stats().tiers.load_failures == 1
    engine.pool.pages.check_invariants()
    engine.adapters.check_invariants()


def test_failing_weights_raise_from_the_async_engine(tmp_path: Path) -> None:
    engine = engine_of(prefetch=False)
    bad = folder(tmp_path, "bad")
    engine.load_adapter("bad", str(bad))
    poison(bad)

    async def main() -> None:
        front = AsyncEngine(engine)
        await front.start()
        try:
            with pytest.raises(InvalidAdapterError, match="NaN or infinite"):
                async for _ in front.generate("r", [3, 4], GREEDY, "bad"):
                    pass
            got = [o async for o in front.generate("b", [3, 4], GREEDY, None)]
            assert got[-1].finish_reason == "length"
        finally:
            await front.shutdown()

    asyncio.run(main())


def test_ten_thousand_registrations_hold_no_tensors(tmp_path: Path) -> None:
    engine = engine_of(prefetch=True)
    path = str(folder(tmp_path, "shared"))
    gc.collect()
    tensors_before = sum(issubclass(type(o), torch.Tensor) for o in gc.get_objects())
    for i in range(10_000):
        engine.load_adapter(f"n{i:05d}", path)
    gc.collect()
    tensors_after = sum(issubclass(type(o), torch.Tensor) for o in gc.get_objects())
    s = engine.stats()
    assert s.adapters_registered == 10_000
    assert s.host_cache_bytes_used == 0 and s.adapters_host == 0 and s.adapters_resident == 0
    assert tensors_after - tensors_before < 10
    assert {a.tier for a in engine.list_adapters()} == {"source"}
    # Any of them still serves.
    seq = engine.generate([[3, 4, 5]], GREEDY, ["n09999"])[0]
    assert len(seq.output_ids) == GREEDY.max_tokens
    assert engine.stats().host_cache_bytes_used == engine.adapters.host_bytes(
        engine.adapters.get("n09999"))


def test_adapter_larger_than_the_host_cache_is_refused(tmp_path: Path) -> None:
    engine = engine_of(prefetch=True, host_bytes=1024)
    with pytest.raises(InvalidAdapterError, match="host memory"):
        engine.load_adapter("a", str(folder(tmp_path, "a")))
