"""LoRA expand: y[rows of segment] += s[rows] · B_a^T (scale folded in), B^T read from the pool."""

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


@triton.jit
def _expand_kernel(s_ptr, y_ptr, pool_ptr, tiles_ptr, segs_ptr, offsets_ptr, pages_ptr,
                   N, stride_sm, stride_ym, module,
                   CHUNK: tl.constexpr, CPP: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                   PRECISION: tl.constexpr):
    tile = tl.program_id(0)
    col_block = tl.program_id(1)
    seg = tl.load(tiles_ptr + tile * 2)
    row0 = tl.load(tiles_ptr + tile * 2 + 1)
    row_end = tl.load(segs_ptr + seg * 4 + 1)
    rank = tl.load(segs_ptr + seg * 4 + 2)
    page_off = tl.load(segs_ptr + seg * 4 + 3)
    first = tl.load(offsets_ptr + seg * 14 + module * 2 + 1)
    if first < 0:
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    n0 = col_block * BLOCK_N
    cols = n0 + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    rr = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        ranks = r0 + rr
        rank_mask = ranks < rank
        s = tl.load(s_ptr + rows[:, None] * stride_sm + ranks[None, :],
                    mask=row_mask[:, None] & rank_mask[None, :], other=0.0)
        # Chunk of B^T's row r that holds column n: first + r * (N / CHUNK) + n / CHUNK.
        c = first + ranks * (N // CHUNK) + n0 // CHUNK
        page = tl.load(pages_ptr + page_off + c // CPP, mask=rank_mask, other=0).to(tl.int64)
        base = (page * CPP + c % CPP) * CHUNK + n0 % CHUNK  # [BLOCK_R]
        b = tl.load(pool_ptr + base[:, None] + (cols - n0)[None, :],
                    mask=rank_mask[:, None] & col_mask[None, :], other=0.0)
        acc += tl.dot(s.to(b.dtype), b, input_precision=PRECISION)
    y = y_ptr + rows[:, None] * stride_ym + cols[None, :]
    mask = row_mask[:, None] & col_mask[None, :]
    prev = tl.load(y, mask=mask, other=0.0)
    tl.store(y, (prev.to(tl.float32) + acc).to(prev.dtype), mask=mask)


def lora_expand(s: torch.Tensor, y: torch.Tensor, pool_layer: torch.Tensor, meta: LoraKernelMeta,
                module: str, chunk: int, chunks_per_page: int, block_m: int,
                block_n: int = 128, num_warps: int | None = None, num_stages: int = 1) -> None:
    """y [T, N] += s [T, >= max_rank] · B^T for each segment's adapter, in place.

    s may be one module's column block of a fused shrink's output (row stride larger than its
    width). On the H200 one warp per [16 x 128] output tile was fastest from 16 rows up
    (bench/results/lora-kernels-nvidia-h200-2026-11-30-sweep.json); few rows of wide ranks
    want more warps."""
    t, n = y.shape
    if y.stride(1) != 1 or s.stride(1) != 1 or pool_layer.stride(-1) != 1:
        raise ValueError("s, y and the pool layer must be contiguous in their last dimension")
    if n % chunk:
        raise ValueError(f"output width {n} is not a multiple of the chunk {chunk}")
    if meta.num_tiles == 0:
        return
    block_n = min(chunk, block_n)
    if num_warps is None:
        num_warps = 4 if meta.num_tiles < 16 and meta.max_rank > 32 else 1
    block_r = 16 if meta.max_rank <= 16 else 32
    grid = (meta.num_tiles, triton.cdiv(n, block_n))
    _expand_kernel[grid](s, y, pool_layer, meta.tiles, meta.segs, meta.offsets, meta.pages,
                         n, s.stride(0), y.stride(0), MODULE_INDEX[module],
                         CHUNK=chunk, CPP=chunks_per_page, BLOCK_M=block_m, BLOCK_N=block_n,
                         BLOCK_R=block_r, PRECISION=dot_precision(pool_layer.dtype),
                         num_warps=num_warps, num_stages=num_stages)


def lora_expand_ref(s: torch.Tensor, y: torch.Tensor, pool_layer: torch.Tensor,
                    meta: LoraKernelMeta, module: str, chunk: int, chunks_per_page: int) -> None:
    """Plain-torch twin of lora_expand reading the same metadata."""
    n = y.shape[1]
    for start, end, bt in segment_weights(pool_layer, meta, module, 1, chunk, chunks_per_page, n):
        y[start:end] += (s[start:end, :bt.shape[0]] @ bt.float()).to(y.dtype)
