"""LoRA shrink: s[rows of segment] = x[rows] · A_a^T, A gathered from the unified pool's chunks."""

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
def _shrink_kernel(x_ptr, out_ptr, pool_ptr, tiles_ptr, segs_ptr, offsets_ptr, pages_ptr,
                   K, stride_xm, stride_om, module, k_per_split,
                   CHUNK: tl.constexpr, CPP: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, ATOMIC: tl.constexpr,
                   PRECISION: tl.constexpr):
    tile = tl.program_id(0)
    rank_block = tl.program_id(1)
    split = tl.program_id(2)
    seg = tl.load(tiles_ptr + tile * 2)
    row0 = tl.load(tiles_ptr + tile * 2 + 1)
    row_end = tl.load(segs_ptr + seg * 4 + 1)
    rank = tl.load(segs_ptr + seg * 4 + 2)
    page_off = tl.load(segs_ptr + seg * 4 + 3)
    first = tl.load(offsets_ptr + seg * 14 + module * 2)
    if first < 0 or rank_block * BLOCK_R >= rank:
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    ranks = rank_block * BLOCK_R + tl.arange(0, BLOCK_R)
    rank_mask = ranks < rank
    # Chunk of A's row r that holds column k: first + r * (K / CHUNK) + k / CHUNK.
    row_chunk = first + ranks * (K // CHUNK)  # [BLOCK_R]
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    k_start = split * k_per_split
    for k0 in range(k_start, tl.minimum(k_start + k_per_split, K), BLOCK_K):
        x = tl.load(x_ptr + rows[:, None] * stride_xm + (k0 + kk)[None, :],
                    mask=row_mask[:, None], other=0.0)
        c = row_chunk + k0 // CHUNK
        page = tl.load(pages_ptr + page_off + c // CPP, mask=rank_mask, other=0).to(tl.int64)
        base = (page * CPP + c % CPP) * CHUNK + k0 % CHUNK  # [BLOCK_R] element offsets
        a = tl.load(pool_ptr + base[:, None] + kk[None, :], mask=rank_mask[:, None], other=0.0)
        acc += tl.dot(x, tl.trans(a.to(x.dtype)), input_precision=PRECISION)
    out = out_ptr + rows[:, None] * stride_om + ranks[None, :]
    mask = row_mask[:, None] & rank_mask[None, :]
    if ATOMIC:
        tl.atomic_add(out, acc, mask=mask)
    else:
        tl.store(out, acc, mask=mask)


def lora_shrink(x: torch.Tensor, pool_layer: torch.Tensor, meta: LoraKernelMeta, module: str,
                chunk: int, chunks_per_page: int, block_m: int, split_k: int = 1) -> torch.Tensor:
    """x [T, K] -> s [T, max_rank] float32 (rows outside every segment stay zero)."""
    t, k = x.shape
    if x.stride(1) != 1 or pool_layer.stride(-1) != 1:
        raise ValueError("x and the pool layer must be contiguous in their last dimension")
    if k % chunk:
        raise ValueError(f"input width {k} is not a multiple of the chunk {chunk}")
    out = torch.zeros(t, max(meta.max_rank, 1), dtype=torch.float32, device=x.device)
    if meta.num_tiles == 0:
        return out
    block_k = min(chunk, 64)
    block_r = 16 if meta.max_rank <= 16 else 32
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    grid = (meta.num_tiles, triton.cdiv(meta.max_rank, block_r), triton.cdiv(k, k_per_split))
    _shrink_kernel[grid](x, out, pool_layer, meta.tiles, meta.segs, meta.offsets, meta.pages,
                         k, x.stride(0), out.stride(0), MODULE_INDEX[module], k_per_split,
                         CHUNK=chunk, CPP=chunks_per_page, BLOCK_M=block_m, BLOCK_R=block_r,
                         BLOCK_K=block_k, ATOMIC=grid[2] > 1,
                         PRECISION=dot_precision(x.dtype))
    return out


def lora_shrink_ref(x: torch.Tensor, pool_layer: torch.Tensor, meta: LoraKernelMeta, module: str,
                    chunk: int, chunks_per_page: int) -> torch.Tensor:
    """Plain-torch twin of lora_shrink reading the same metadata."""
    t, k = x.shape
    out = torch.zeros(t, max(meta.max_rank, 1), dtype=torch.float32, device=x.device)
    for start, end, a in segment_weights(pool_layer, meta, module, 0, chunk, chunks_per_page, k):
        out[start:end, :a.shape[0]] = x[start:end].float() @ a.float().t()
    return out
