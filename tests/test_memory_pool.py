"""PagePool allocation and reference counts, PoolLayout sizes, and DevicePool's adapter writes."""

from __future__ import annotations

import pytest
import torch

from loraplane.engine.config import LORA_MODULES, NAMED_SHAPES
from loraplane.engine.memory_pool import (
    ADAPTER,
    KV,
    DevicePool,
    PagePool,
    PoolExhaustedError,
    PoolLayout,
)


def test_allocate_hands_out_low_ids_first_and_free_returns_them() -> None:
    pool = PagePool(8)
    a = pool.allocate(3, KV)
    assert a == [0, 1, 2]
    b = pool.allocate(2, ADAPTER)
    assert b == [3, 4]
    assert pool.num_free == 3
    pool.free(a)
    assert pool.num_free == 6
    assert sorted(pool.allocate(6, KV)) == [0, 1, 2, 5, 6, 7]
    pool.check_invariants()


def test_can_allocate_bounds() -> None:
    pool = PagePool(4)
    assert pool.can_allocate(0) and pool.can_allocate(4)
    assert not pool.can_allocate(5)
    assert not pool.can_allocate(-1)
    assert pool.allocate(0, KV) == []
    pool.allocate(3, KV)
    assert pool.can_allocate(1) and not pool.can_allocate(2)


def test_exhaustion_raises_and_changes_nothing() -> None:
    pool = PagePool(4)
    pool.allocate(3, KV)
    with pytest.raises(PoolExhaustedError, match="asked for 2 pages, 1 free"):
        pool.allocate(2, ADAPTER)
    assert pool.num_free == 1
    assert pool.num_used(ADAPTER) == 0
    pool.check_invariants()


def test_zero_pages_is_refused() -> None:
    with pytest.raises(ValueError):
        PagePool(0)


def test_double_free_and_out_of_range_free_raise() -> None:
    pool = PagePool(4)
    pages = pool.allocate(2, KV)
    pool.free(pages)
    with pytest.raises(RuntimeError, match="double free"):
        pool.free(pages[:1])
    with pytest.raises(RuntimeError, match="double free"):
        pool.free([2])  # never allocated
    with pytest.raises(RuntimeError, match="double free"):
        pool.free([4])
    with pytest.raises(RuntimeError, match="double free"):
        pool.free([-1])
    pool.check_invariants()


def test_incref_keeps_a_page_until_its_last_owner_frees_it() -> None:
    pool = PagePool(4)
    pages = pool.allocate(2, KV)
    pool.incref(pages[:1])
    pool.incref(pages[:1])
    pool.free(pages)  # page 0 has two references left, page 1 is free
    assert pool.num_free == 3
    assert pool.num_used(KV) == 1
    pool.free(pages[:1])
    assert pool.num_used(KV) == 1
    pool.check_invariants()
    pool.free(pages[:1])
    assert pool.num_free == 4
    assert pool.num_used(KV) == 0
    with pytest.raises(RuntimeError, match="double free"):
        pool.free(pages[:1])
    pool.check_invariants()


def test_incref_of_a_free_page_raises() -> None:
    pool = PagePool(2)
    with pytest.raises(RuntimeError, match="incref of free page 1"):
        pool.incref([1])


def test_usage_counters_per_kind() -> None:
    pool = PagePool(10)
    kv = pool.allocate(4, KV)
    ad = pool.allocate(3, ADAPTER)
    assert (pool.num_used(KV), pool.num_used(ADAPTER), pool.num_free) == (4, 3, 3)
    pool.free(kv[:2])
    pool.free(ad)
    assert (pool.num_used(KV), pool.num_used(ADAPTER), pool.num_free) == (2, 0, 8)
    # A freed page may come back as the other kind.
    again = pool.allocate(8, ADAPTER)
    assert set(again) >= set(ad) | set(kv[:2])
    assert (pool.num_used(KV), pool.num_used(ADAPTER), pool.num_free) == (2, 8, 0)
    pool.check_invariants()


@pytest.mark.parametrize("corrupt, message", [
    (lambda p: p._free.append(p._free[0]), "free list twice"),
    (lambda p: p._free.pop(), "leaked"),
    (lambda p: p._free.append(0), "owned"),
    (lambda p: p._used.update({KV: 1}), "usage counters"),
    (lambda p: p._kind.__setitem__(0, ADAPTER), "usage counters"),
])
def test_check_invariants_catches_corruption(corrupt, message) -> None:
    pool = PagePool(6)
    pool.allocate(2, KV)
    pool.check_invariants()
    corrupt(pool)
    with pytest.raises(AssertionError, match=message):
        pool.check_invariants()


@pytest.mark.parametrize("name", sorted(NAMED_SHAPES))
@pytest.mark.parametrize("block_size", [8, 16])
def test_layout_sizes_for_named_shapes(name: str, block_size: int) -> None:
    cfg = NAMED_SHAPES[name]
    lay = PoolLayout.for_model(cfg, block_size)
    per_layer = block_size * 2 * cfg.num_kv_heads * cfg.head_dim
    assert lay.page_elems_per_layer == per_layer
    assert lay.page_bytes(torch.bfloat16) == cfg.num_layers * per_layer * 2
    assert lay.page_bytes(torch.float32) == cfg.num_layers * per_layer * 4
    # A chunk divides a page, a KV head and every projection width, so no row straddles chunks.
    assert per_layer % lay.chunk == 0
    assert lay.chunks_per_page * lay.chunk == per_layer
    assert cfg.head_dim % lay.chunk == 0
    for m in LORA_MODULES:
        fan_in, fan_out = cfg.module_shape(m)
        assert fan_in % lay.chunk == 0 and fan_out % lay.chunk == 0
    assert lay.pages_for_chunks(0) == 0
    assert lay.pages_for_chunks(1) == 1
    assert lay.pages_for_chunks(lay.chunks_per_page) == 1
    assert lay.pages_for_chunks(lay.chunks_per_page + 1) == 2


@pytest.mark.parametrize("name, chunk", [("llama-2-7b", 128), ("llama-3-8b", 128),
                                         ("smollm2-135m", 64), ("tiny", 16)])
def test_chunk_sizes(name: str, chunk: int) -> None:
    assert PoolLayout.for_model(NAMED_SHAPES[name], 16).chunk == chunk


def test_write_pages_round_trip_through_chunks_layer() -> None:
    cfg = NAMED_SHAPES["tiny"]
    lay = PoolLayout.for_model(cfg, 8)
    pool = DevicePool(lay, 12, torch.float32, torch.device("cpu"))
    pool.data.fill_(-7.0)  # stale contents that the padding of the last page must overwrite
    cpp = lay.chunks_per_page
    num_chunks = 2 * cpp + 3  # the last page is partly used
    n = num_chunks * lay.chunk
    flat = torch.randn(cfg.num_layers, n, dtype=torch.float64)
    pages = [9, 2, 5]  # not consecutive, not sorted
    pool.write_pages(pages, flat)

    chunk_ids = (torch.tensor(pages)[:, None] * cpp + torch.arange(cpp)).view(-1)[:num_chunks]
    for layer in range(cfg.num_layers):
        got = pool.chunks_layer(layer)[chunk_ids].reshape(-1)
        torch.testing.assert_close(got, flat[layer].float())
        # The tail of the last page is zero-padded, pages not written keep their contents.
        tail = pool.chunks_layer(layer)[pages[-1] * cpp + 3:(pages[-1] + 1) * cpp]
        assert torch.all(tail == 0)
    untouched = [p for p in range(12) if p not in pages]
    assert torch.all(pool.data[:, untouched] == -7.0)
    # The KV view sees the same storage: page p holds token slots [p * bs, (p + 1) * bs).
    kv = pool.kv_layer(0)
    assert kv.shape == (12 * lay.block_size, 2, cfg.num_kv_heads, cfg.head_dim)
    torch.testing.assert_close(kv[9 * lay.block_size].reshape(-1)[: lay.chunk],
                               flat[0, : lay.chunk].float())
