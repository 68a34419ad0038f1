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
    MODULE_INDEX,
    LoraKernelMeta,
    segment_weights,
)


# Triton compiles a variant per class of each integer argument (multiple of 16, equal to 1,
# other); one first met while serving costs a compile then. The output's widths are padded to
# multiples of 16 (shrink_width) so they stay in one class; the counts below vary from step to
# step and are not specialized on.
@triton.jit
def _shrink_acc(acc, x_ptr, rows, row_mask, stride_xm, k0, kk, a_ptrs, rank_mask,
                ROWS1: tl.constexpr, PRECISION: tl.constexpr):
    """acc += x[rows, k0 + kk] · A-tile^T for one K block (a_ptrs [BLOCK_R, BLOCK_K]).

    ROWS1: the tile is one row (`rows` a scalar, acc [BLOCK_R]): a broadcast multiply and sum
    instead of a matrix product whose other 15 rows would be padding; else acc [BLOCK_M,
    BLOCK_R] and tl.dot."""
    a = tl.load(a_ptrs, mask=rank_mask[:, None], other=0.0)
    if ROWS1:
        x = tl.load(x_ptr + rows * stride_xm + k0 + kk)
        acc += tl.sum(a.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
    else:
        x = tl.load(x_ptr + rows[:, None] * stride_xm + (k0 + kk)[None, :],
                    mask=row_mask[:, None], other=0.0)
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
    # Axis 1 enumerates (module j of the fused group, rank block); `modules` packs the group's
    # module indices 4 bits each.
    j = tl.program_id(1) // rank_blocks
    rank_block = tl.program_id(1) % rank_blocks
    module = (modules >> (4 * j)) & 15
    split = tl.program_id(2)
    seg = tl.load(tiles_ptr + tile * 2)
    row0 = tl.load(tiles_ptr + tile * 2 + 1)
    row_end = tl.load(segs_ptr + seg * 4 + 1)
    rank = tl.load(segs_ptr + seg * 4 + 2)
    page_off = tl.load(segs_ptr + seg * 4 + 3)
    first = tl.load(offsets_ptr + seg * 14 + module * 2)
    if first < 0 or rank_block * BLOCK_R >= rank:
        return
    # BLOCK_M == 1: tiles of one row each (metadata built with block_m 1, decode).
    ROWS1: tl.constexpr = BLOCK_M == 1
    if ROWS1:
        rows = row0
        row_mask = row0 < row_end
        acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    else:
        rows = row0 + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    ranks = rank_block * BLOCK_R + tl.arange(0, BLOCK_R)
    rank_mask = ranks < rank
    # Chunk of A's row r that holds column k: first + r * (K / CHUNK) + k / CHUNK.
    row_chunk = first + ranks * (K // CHUNK)  # [BLOCK_R]
    kk = tl.arange(0, BLOCK_K)
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
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
            acc = _shrink_acc(acc, x_ptr, rows, row_mask, stride_xm, k0, kk,
                              pool_ptr + row_base[:, None] + (k0 + kk)[None, :], rank_mask,
                              ROWS1, PRECISION)
    else:  # a span crossing a page boundary: look the page up chunk by chunk
        for k0 in range(k_start, k_end, BLOCK_K):
            c = row_chunk + k0 // CHUNK
            page = tl.load(pages_ptr + page_off + c // CPP, mask=rank_mask,
                           other=0).to(tl.int64)
            base = (page * CPP + c % CPP) * CHUNK + k0 % CHUNK  # [BLOCK_R] element offsets
            acc = _shrink_acc(acc, x_ptr, rows, row_mask, stride_xm, k0, kk,
                              pool_ptr + base[:, None] + kk[None, :], rank_mask, ROWS1,
                              PRECISION)
    if ROWS1:
        out = out_ptr + rows * stride_om + j * out_width + ranks
        mask = rank_mask & row_mask
    else:
        out = out_ptr + rows[:, None] * stride_om + j * out_width + ranks[None, :]
        mask = row_mask[:, None] & rank_mask[None, :]
    if ATOMIC:
        tl.atomic_add(out, acc, mask=mask)
    else:
        tl.store(out, acc, mask=mask)


# Programs per module a shrink launch aims at (about 4 per SM of an H200): split-K fills the
# rest. On the H200 (bench/results/lora-kernels-nvidia-h200-2026-11-30-sweep.json) the fastest
# split at batch 1..64, ranks 16 and 64, was the one that brought tiles x rank blocks x splits
# to 512; a fused group keeps its members' split (best or within 15% of it at batch 64,
# bench/results/lora-kernels-nvidia-h200-2026-11-30-call2.json).
TARGET_PROGRAMS = 512


def shrink_split(programs: int, k_blocks: int) -> int:
    """Split-K factor (a power of two) bringing `programs` up to TARGET_PROGRAMS."""
    split = 1
    while programs * split * 2 <= TARGET_PROGRAMS and split * 2 <= k_blocks:
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

    Launch parameters left None follow the H200 sweep: split-K from TARGET_PROGRAMS, 4 warps
    and 4 stages for rank tiles of 16, 2 and 2 for wider ones."""
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
        block_r = 16 if meta.max_rank <= 16 else 32
    rank_blocks = triton.cdiv(meta.max_rank, block_r)
    if split_k is None:
        split_k = shrink_split(meta.num_tiles * rank_blocks, k // block_k)
    if num_warps is None:
        num_warps = 4 if block_r == 16 else 2
    if num_stages is None:
        num_stages = 4 if block_r == 16 else 2
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    packed = sum(MODULE_INDEX[m] << (4 * j) for j, m in enumerate(modules))
    grid = (meta.num_tiles, len(modules) * rank_blocks, triton.cdiv(k, k_per_split))
    _shrink_kernel[grid](x, out, pool_layer, meta.tiles, meta.segs, meta.offsets, meta.pages,
                         k, x.stride(0), out.stride(0), packed, rank_blocks, width, k_per_split,
                         CHUNK=chunk, CPP=chunks_per_page, BLOCK_M=block_m, BLOCK_R=block_r,
                         BLOCK_K=block_k, ATOMIC=grid[2] > 1,
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
