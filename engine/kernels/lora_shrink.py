"""LoRA shrink: s[rows of segment] = x[rows] · A_a^T, A gathered from the unified pool's chunks.

Projections that read the same input (q, k, v; gate, up) shrink in one launch: the output holds
one [T, max_rank] block per module side by side.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from loraplane.engine.kernels.common import dot_precision
from loraplane.engine.kernels.lora_meta import (
    LoraKernelMeta,
    pack_modules,
    rank_tile,
    segment_weights,
    tile_out,
    tile_rows,
    tile_segment,
)


@triton.jit
def _shrink_tile(x_ptr, out_ptr, pool_ptr, pages_ptr, row0, row_end, rank, ranks, first,
                 page_off, K, stride_xm, stride_om, j, out_width, k_start, k_end,
                 CHUNK: tl.constexpr, CPP: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, ATOMIC: tl.constexpr,
                 ROWS1: tl.constexpr, PRECISION: tl.constexpr):
    """One tile's partial product over [k_start, k_end), added (ATOMIC) or stored into out.

    ROWS1: the tile holds one row (decode rows of distinct adapters): acc [BLOCK_R] from a
    broadcast multiply and sum, no 16-row matrix product of which 15 rows would be padding;
    else acc [BLOCK_M, BLOCK_R] from tl.dot."""
    rows, row_mask, acc = tile_rows(row0, row_end, BLOCK_M, BLOCK_R, ROWS1)
    rank_mask = ranks < rank
    # Chunk of A's row r that holds column k: first + r * (K / CHUNK) + k / CHUNK.
    row_chunk = first + ranks * (K // CHUNK)  # [BLOCK_R]
    kk = tl.arange(0, BLOCK_K)
    c0 = row_chunk + k_start // CHUNK  # [BLOCK_R] first and last chunk of each row's span
    c1 = row_chunk + (k_end - 1) // CHUNK
    one_page = tl.min(tl.where(rank_mask, (c0 // CPP == c1 // CPP).to(tl.int32), 1), axis=0)
    if one_page == 1:
        # Every row's span lies in one page (the rule: a rank row's chunks are consecutive in
        # the adapter's layout), so it is contiguous there: one page lookup per row, and
        # addresses affine in k that the compiler can pipeline.
        page = tl.load(pages_ptr + page_off + c0 // CPP, mask=rank_mask, other=0).to(tl.int64)
        row_base = (page * CPP + c0 % CPP) * CHUNK - (k_start // CHUNK) * CHUNK  # [BLOCK_R]
        for k0 in range(k_start, k_end, BLOCK_K):
            a = tl.load(pool_ptr + row_base[:, None] + (k0 + kk)[None, :],
                        mask=rank_mask[:, None], other=0.0)
            acc = _shrink_acc(acc, a, x_ptr, rows, row_mask, stride_xm, k0 + kk, ROWS1,
                              PRECISION)
    else:  # a span crossing a page boundary: look the page up chunk by chunk
        for k0 in range(k_start, k_end, BLOCK_K):
            c = row_chunk + k0 // CHUNK
            page = tl.load(pages_ptr + page_off + c // CPP, mask=rank_mask,
                           other=0).to(tl.int64)
            base = (page * CPP + c % CPP) * CHUNK + k0 % CHUNK  # [BLOCK_R] element offsets
            a = tl.load(pool_ptr + base[:, None] + kk[None, :], mask=rank_mask[:, None],
                        other=0.0)
            acc = _shrink_acc(acc, a, x_ptr, rows, row_mask, stride_xm, k0 + kk, ROWS1,
                              PRECISION)
    out, mask = tile_out(out_ptr + j * out_width, rows, row_mask, stride_om, ranks, rank_mask,
                         ROWS1)
    if ATOMIC:
        tl.atomic_add(out, acc, mask=mask)
    else:
        tl.store(out, acc, mask=mask)


@triton.jit
def _shrink_acc(acc, a, x_ptr, rows, row_mask, stride_xm, k, ROWS1: tl.constexpr,
                PRECISION: tl.constexpr):
    """acc += x[rows, k] · a^T for one K block (a [BLOCK_R, BLOCK_K], k [BLOCK_K])."""
    if ROWS1:
        x = tl.load(x_ptr + rows * stride_xm + k)
        acc += tl.sum(a.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
    else:
        x = tl.load(x_ptr + rows[:, None] * stride_xm + k[None, :], mask=row_mask[:, None],
                    other=0.0)
        acc += tl.dot(x, tl.trans(a.to(x.dtype)), input_precision=PRECISION)
    return acc


# Triton compiles a variant per class of each integer argument (multiple of 16, equal to 1,
# other); one first met while serving costs a compile then. The output's widths are padded to
# multiples of 16 (shrink_width) so they stay in one class; the counts below vary from step to
# step and are not specialized on.
@triton.jit(do_not_specialize=["modules", "rank_blocks"])
def _shrink_kernel(x_ptr, out_ptr, pool_ptr, tiles_ptr, segs_ptr, offsets_ptr, pages_ptr,
                   K, stride_xm, stride_om, modules, rank_blocks, out_width, k_per_split,
                   CHUNK: tl.constexpr, CPP: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, ATOMIC: tl.constexpr,
                   PRECISION: tl.constexpr):
    tile = tl.program_id(0)
    split = tl.program_id(2)
    # Axis 1 enumerates (module j of the fused group, rank block); `modules` packs the group's
    # module indices 4 bits each.
    j = tl.program_id(1) // rank_blocks
    rank_block = tl.program_id(1) % rank_blocks
    module = (modules >> (4 * j)) & 15
    row0, row_end, rank, page_off, first = tile_segment(tiles_ptr, segs_ptr, offsets_ptr, tile,
                                                        module, 0)
    if first < 0 or rank_block * BLOCK_R >= rank:
        return
    ranks = rank_block * BLOCK_R + tl.arange(0, BLOCK_R)
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    # A tile of one row (a decode row whose adapter no other row of the step uses) takes the
    # multiply-and-sum path; wider tiles keep the matrix product. On the H200 at batch 64, one
    # adapter a row, the one-row path took o_proj's shrink from 12.0 to 9.9 us at rank 64 and
    # from 8.0 to 6.4 at rank 16 (q,k,v at rank 64: equal); the expand's from 18.6 to 13.5 and
    # 8.5 to 5.9 (bench/results/lora-variants-2026-11-30T2032-block-m-1-meta.json).
    if row_end - row0 == 1:
        _shrink_tile(x_ptr, out_ptr, pool_ptr, pages_ptr, row0, row_end, rank, ranks, first,
                     page_off, K, stride_xm, stride_om, j, out_width, k_start, k_end, CHUNK,
                     CPP, BLOCK_M, BLOCK_R, BLOCK_K, ATOMIC, True, PRECISION)
    else:
        _shrink_tile(x_ptr, out_ptr, pool_ptr, pages_ptr, row0, row_end, rank, ranks, first,
                     page_off, K, stride_xm, stride_om, j, out_width, k_start, k_end, CHUNK,
                     CPP, BLOCK_M, BLOCK_R, BLOCK_K, ATOMIC, False, PRECISION)


# Programs per module a shrink launch aims at (about 4 per SM of an H200): split-K fills the
# rest. On the H200 (bench/results/lora-kernels-nvidia-h200-2026-11-30-sweep.json) the fastest
# split at batch 1..64, ranks 16 and 64, was the one that brought tiles x rank blocks x splits
# to 512; a fused group keeps its members' split (best or within 15% of it at batch 64,
# bench/results/lora-kernels-nvidia-h200-2026-11-30-call2.json).
# With few tiles (a batch on a handful of adapters) splits past 16 only add atomics: at batch
# 64 on 5 adapters 8 or 16 was fastest (bench/results/lora-variants-2026-11-30T2037.json).
TARGET_PROGRAMS = 512
MAX_SPLIT = 16
# From this many tiles on (decode rows of distinct adapters) 2 warps and 2 stages beat 4 and 4
# at rank 16 (9.0 against 11.5 us for q,k,v at batch 64) and equal them at rank 64; with fewer
# tiles 4 and 4 win (lora-variants-2026-11-30T2037.json).
MANY_TILES = 32
SHRINK_WARPS_MANY, SHRINK_WARPS_FEW = 2, 4  # warps, and pipeline stages alike


def shrink_split(programs: int, k_blocks: int) -> int:
    """Split-K factor (a power of two, at most MAX_SPLIT) bringing `programs` up to
    TARGET_PROGRAMS."""
    split = 1
    while programs * split * 2 <= TARGET_PROGRAMS and split * 2 <= min(k_blocks, MAX_SPLIT):
        split *= 2
    return split


def shrink_width(max_rank: int) -> int:
    """Columns of one module's block in a shrink's output: max_rank rounded up to 16."""
    return triton.cdiv(max(max_rank, 1), 16) * 16


def lora_shrink(x: torch.Tensor, pool_layer: torch.Tensor, meta: LoraKernelMeta,
                module: str | tuple[str, ...], chunk: int, chunks_per_page: int, block_m: int,
                split_k: int | None = None, block_k: int = 128, num_warps: int | None = None,
                num_stages: int | None = None, block_r: int | None = None) -> torch.Tensor:
    """x [T, K] -> s [T, M * W] float32 for M modules reading x, W = shrink_width(max_rank)
    (module j's block at columns j * W...); rows outside every segment, and columns past a
    segment's rank, stay zero.

    Launch parameters left None follow the H200 sweeps: split-K from TARGET_PROGRAMS, 2 warps
    and 2 stages from MANY_TILES tiles on, else 4 and 4."""
    modules = (module,) if isinstance(module, str) else module
    t, k = x.shape
    if x.stride(1) != 1 or pool_layer.stride(-1) != 1:
        raise ValueError("x and the pool layer must be contiguous in their last dimension")
    if k % chunk:
        raise ValueError(f"input width {k} is not a multiple of the chunk {chunk}")
    if not 0 < len(modules) <= 7:
        raise ValueError(f"a fused shrink takes 1 to 7 modules, not {len(modules)}")
    width = shrink_width(meta.max_rank)
    out = torch.zeros(t, len(modules) * width, dtype=torch.float32, device=x.device)
    if meta.num_tiles == 0:
        return out
    block_k = min(chunk, block_k)
    if block_r is None:
        block_r = rank_tile(meta.max_rank)
    rank_blocks = triton.cdiv(meta.max_rank, block_r)
    if split_k is None:
        split_k = shrink_split(meta.num_tiles * rank_blocks, k // block_k)
    warps_stages = SHRINK_WARPS_MANY if meta.num_tiles >= MANY_TILES else SHRINK_WARPS_FEW
    if num_warps is None:
        num_warps = warps_stages
    if num_stages is None:
        num_stages = warps_stages
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    packed = pack_modules(modules)
    grid = (meta.num_tiles, len(modules) * rank_blocks, triton.cdiv(k, k_per_split))
    _shrink_kernel[grid](x, out, pool_layer, meta.tiles, meta.segs, meta.offsets, meta.pages,
                         k, x.stride(0), out.stride(0), packed, rank_blocks, width, k_per_split,
                         CHUNK=chunk, CPP=chunks_per_page, BLOCK_M=block_m, BLOCK_R=block_r,
                         BLOCK_K=block_k, ATOMIC=k_per_split < k,
                         PRECISION=dot_precision(x.dtype), num_warps=num_warps,
                         num_stages=num_stages)
    return out


def lora_shrink_ref(x: torch.Tensor, pool_layer: torch.Tensor, meta: LoraKernelMeta,
                    module: str | tuple[str, ...], chunk: int,
                    chunks_per_page: int) -> torch.Tensor:
    """Plain-torch twin of lora_shrink reading the same metadata."""
    modules = (module,) if isinstance(module, str) else module
    t, k = x.shape
    width = shrink_width(meta.max_rank)
    out = torch.zeros(t, len(modules) * width, dtype=torch.float32, device=x.device)
    for j, m in enumerate(modules):
        for start, end, a in segment_weights(pool_layer, meta, m, 0, chunk, chunks_per_page, k):
            out[start:end, j * width:j * width + a.shape[0]] = x[start:end].float() @ a.float().t()
    return out
