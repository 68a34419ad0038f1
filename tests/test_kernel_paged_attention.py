"""The Triton paged attention kernels (decode with split-K, varlen causal prefill) vs torch twins.

Runs on the CPU under TRITON_INTERPRET=1 in float32 and float16 (the interpreter's bf16 dot is
wrong); bench/kernels/paged_attention_bench.py checks bf16 on the GPU. Every KV slot that no row
may read (padding entries of the block tables, the tail of each last page, free pages) holds NaN,
so a kernel that reads past a sequence's keys turns its output into NaN.
"""

from __future__ import annotations

import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")

from loraplane.engine.kernels.paged_attention import (  # noqa: E402
    paged_decode_attention,
    paged_decode_attention_ref,
    paged_prefill_attention,
    paged_prefill_attention_ref,
)

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("needs TRITON_INTERPRET=1 (set before triton was imported) or a GPU",
                allow_module_level=True)

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array:DeprecationWarning")
DEVICE = "cuda" if os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
TOL = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.float16: dict(atol=4e-3, rtol=4e-3)}


def make_cache(lengths: list[int], kvh: int, hd: int, bs: int, dtype: torch.dtype,
               gen: torch.Generator, spare_blocks: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """A pool layer [pages, bs, 2, kvh, hd] with shuffled pages per row and NaN everywhere else.

    Returns (kv_pages, block_tables [B, max_blocks + spare_blocks] int32); padding entries of
    the block tables point at a NaN page.
    """
    need = [-(-n // bs) for n in lengths]
    max_blocks = max(need, default=0) + spare_blocks
    num_pages = sum(need) + 3  # a few free pages, one of them the poison target
    # Like DevicePool.data[l].view(...): layer 1 of a two-layer [layers, pages, page_elems] tensor.
    data = torch.full((2, num_pages, bs * 2 * kvh * hd), float("nan"), dtype=dtype)
    kv = data[1].view(num_pages, bs, 2, kvh, hd)
    perm = torch.randperm(num_pages - 1, generator=gen)
    poison = num_pages - 1
    tables = torch.full((len(lengths), max_blocks), poison, dtype=torch.int32)
    used = 0
    for b, n in enumerate(lengths):
        pages = perm[used:used + need[b]]
        used += need[b]
        tables[b, :need[b]] = pages.to(torch.int32)
        flat = torch.randn(n, 2, kvh, hd, generator=gen).to(dtype)
        for i in range(n):
            kv[pages[i // bs], i % bs] = flat[i]
    return kv.to(DEVICE), tables.to(DEVICE)


# (head_dim, kv heads, query heads per KV head, block_size, context lengths, num_splits)
DECODE_CASES = [
    (16, 2, 1, 4, [1, 7, 16, 33, 100], 1),
    (64, 1, 4, 16, [100, 0, 33, 7], 3),
    (16, 3, 3, 16, [16, 1, 0, 100], 2),  # SmolLM2's 9 heads over 3 KV heads, per group
    (16, 2, 2, 4, [0, 0], 2),  # a CUDA graph's padded rows only
    (64, 2, 2, 16, [7, 100], None),
    (16, 1, 8, 4, [33, 1], 16),  # more splits than some rows have tiles
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", range(len(DECODE_CASES)))
def test_decode_matches_reference(case: int, dtype: torch.dtype) -> None:
    hd, kvh, group, bs, lengths, splits = DECODE_CASES[case]
    gen = torch.Generator().manual_seed(case)
    kv, tables = make_cache(lengths, kvh, hd, bs, dtype, gen)
    q = torch.randn(len(lengths), kvh * group, hd, generator=gen).to(dtype).to(DEVICE)
    ctx = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    scale = 1 / math.sqrt(hd)
    # block_n 16 makes several tiles per split on these short contexts.
    out = paged_decode_attention(q, kv, tables, ctx, scale, num_splits=splits, block_n=16)
    ref = paged_decode_attention_ref(q, kv, tables, ctx, scale)
    assert out.dtype == dtype and out.shape == q.shape
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, **TOL[dtype])
    for b, n in enumerate(lengths):
        if n == 0:
            assert (out[b] == 0).all()


def test_decode_default_tiles() -> None:
    """The wrapper's own choices of split count and tile (one tile covers these contexts)."""
    gen = torch.Generator().manual_seed(7)
    kv, tables = make_cache([100, 33, 0], 3, 64, 16, torch.float32, gen)
    q = torch.randn(3, 9, 64, generator=gen).to(DEVICE)
    ctx = torch.tensor([100, 33, 0], dtype=torch.int32, device=DEVICE)
    out = paged_decode_attention(q, kv, tables, ctx, 0.125)
    ref = paged_decode_attention_ref(q, kv, tables, ctx, 0.125)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])


# (head_dim, kv heads, group, block_size, [(query len, context len)], block_m)
PREFILL_CASES = [
    # (4, 18): a tile's first query at 14 sees keys 0..14, one short of the 16-key tile edge.
    (16, 2, 1, 4, [(7, 7), (5, 33), (1, 16), (4, 18)], 16),
    (64, 1, 4, 16, [(33, 33), (16, 100)], 32),
    (16, 3, 3, 16, [(7, 7), (33, 100), (16, 16)], 16),  # tiles cut tokens between heads
    (16, 2, 2, 4, [(1, 1), (0, 7), (9, 16)], None),  # an empty row, the wrapper's block_m
    (64, 2, 2, 16, [(100, 100)], 64),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", range(len(PREFILL_CASES)))
def test_prefill_matches_reference(case: int, dtype: torch.dtype) -> None:
    hd, kvh, group, bs, seqs, block_m = PREFILL_CASES[case]
    gen = torch.Generator().manual_seed(100 + case)
    kv, tables = make_cache([c for _, c in seqs], kvh, hd, bs, dtype, gen)
    qlens = [n for n, _ in seqs]
    cu = torch.tensor([0] + qlens, dtype=torch.int32).cumsum(0).to(torch.int32).to(DEVICE)
    q = torch.randn(sum(qlens), kvh * group, hd, generator=gen).to(dtype).to(DEVICE)
    ctx = torch.tensor([c for _, c in seqs], dtype=torch.int32, device=DEVICE)
    scale = 1 / math.sqrt(hd)
    args = (q, kv, tables, cu, ctx, max(qlens), scale)
    out = paged_prefill_attention(*args, block_m=block_m, block_n=16)
    ref = paged_prefill_attention_ref(*args)
    assert out.dtype == dtype and out.shape == q.shape
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, **TOL[dtype])


def test_prefill_of_one_token_is_decode() -> None:
    """A one-token chunk at the end of a cached context is a decode step."""
    gen = torch.Generator().manual_seed(5)
    kv, tables = make_cache([33, 7], 2, 16, 4, torch.float32, gen)
    q = torch.randn(2, 4, 16, generator=gen).to(DEVICE)
    ctx = torch.tensor([33, 7], dtype=torch.int32, device=DEVICE)
    cu = torch.tensor([0, 1, 2], dtype=torch.int32, device=DEVICE)
    pre = paged_prefill_attention(q, kv, tables, cu, ctx, 1, 0.25, block_n=16)
    dec = paged_decode_attention(q, kv, tables, ctx, 0.25, num_splits=2, block_n=16)
    torch.testing.assert_close(pre, dec, **TOL[torch.float32])


def test_wrappers_reject_bad_arguments() -> None:
    gen = torch.Generator().manual_seed(0)
    kv, tables = make_cache([5], 2, 16, 4, torch.float32, gen)
    q = torch.randn(1, 4, 16, device=DEVICE)
    ctx = torch.tensor([5], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="int32"):
        paged_decode_attention(q, kv, tables.long(), ctx, 1.0)
    with pytest.raises(ValueError, match="heads"):
        paged_decode_attention(q[:, :3], kv, tables, ctx, 1.0)
    with pytest.raises(ValueError, match="float"):
        paged_decode_attention(q.half(), kv, tables, ctx, 1.0)
    with pytest.raises(ValueError, match="contiguous in head_dim"):
        paged_decode_attention(q.transpose(1, 2).contiguous().transpose(1, 2), kv, tables,
                               ctx, 1.0)
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        paged_prefill_attention(q, kv, tables, ctx.long(), ctx, 1, 1.0)
