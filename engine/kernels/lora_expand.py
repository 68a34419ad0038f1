"""LoRA expand: y[rows of segment] += s[rows] · B_a^T (scale folded in), B^T read from the pool."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from loraplane.engine.kernels.common import dot_precision
from loraplane.engine.kernels.lora_meta import (
    LoraKernelMeta,
    pack_modules,
    segment_weights,
    tile_out,
    tile_rows,
    tile_segment,
)


# Widths and offsets are multiples of the chunk or of 16 (see the shrink): only the packed module
# indices, which differ between call sites, are not specialized on.
@triton.jit(do_not_specialize=["modules"])
def _expand_kernel(s_ptr, y_ptr, pool_ptr, tiles_ptr, segs_ptr, offsets_ptr, pages_ptr,
                   stride_sm, stride_ym, s_width, modules, N0, N1, N2, Y1, Y2,
                   CHUNK: tl.constexpr, CPP: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                   PRECISION: tl.constexpr):
    tile = tl.program_id(0)
    # Axis 1 enumerates the column blocks of up to three members of a fused group side by side
    # (N1 = N2 = 0 for one module): member j has width Nj, its output starts Yj columns after
    # member 0's, its shrink block j * s_width columns into s; `modules` packs their module
    # indices 4 bits each.
    col_block = tl.program_id(1)
    nb0 = N0 // BLOCK_N
    nb01 = nb0 + N1 // BLOCK_N
    in1 = col_block >= nb0
    in2 = col_block >= nb01
    j = in1.to(tl.int32) + in2.to(tl.int32)
    col_block -= tl.where(in2, nb01, tl.where(in1, nb0, 0))
    N = tl.where(in2, N2, tl.where(in1, N1, N0))
    y_col = tl.where(in2, Y2, tl.where(in1, Y1, 0))
    module = (modules >> (4 * j)) & 15
    row0, row_end, rank, page_off, first = tile_segment(tiles_ptr, segs_ptr, offsets_ptr, tile,
                                                        module, 1)
    if first < 0:
        return
    # A tile of one row (a decode row whose adapter no other row of the step uses) takes the
    # multiply-and-sum path (27-31% faster for the expand at batch 64, one adapter a row: see
    # the shrink's note); wider tiles keep the matrix product.
    if row_end - row0 == 1:
        _expand_tile(s_ptr, y_ptr, pool_ptr, pages_ptr, row0, row_end, rank, first, page_off,
                     stride_sm, stride_ym, j * s_width, y_col, col_block * BLOCK_N, N, CHUNK,
                     CPP, BLOCK_M, BLOCK_N, BLOCK_R, True, PRECISION)
    else:
        _expand_tile(s_ptr, y_ptr, pool_ptr, pages_ptr, row0, row_end, rank, first, page_off,
                     stride_sm, stride_ym, j * s_width, y_col, col_block * BLOCK_N, N, CHUNK,
                     CPP, BLOCK_M, BLOCK_N, BLOCK_R, False, PRECISION)


@triton.jit
def _expand_tile(s_ptr, y_ptr, pool_ptr, pages_ptr, row0, row_end, rank, first, page_off,
                 stride_sm, stride_ym, s_col, y_col, n0, N, CHUNK: tl.constexpr,
                 CPP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_R: tl.constexpr, ROWS1: tl.constexpr, PRECISION: tl.constexpr):
    """y[tile rows, n0 + BLOCK_N columns] += s[rows, s_col..] · B^T[:, those columns].

    ROWS1: the tile holds one row: acc [BLOCK_N] from a broadcast multiply and sum over the
    rank; else acc [BLOCK_M, BLOCK_N] from tl.dot."""
    cols = n0 + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    rr = tl.arange(0, BLOCK_R)
    rows, row_mask, acc = tile_rows(row0, row_end, BLOCK_M, BLOCK_N, ROWS1)
    for r0 in range(0, rank, BLOCK_R):
        ranks = r0 + rr
        rank_mask = ranks < rank
        # Chunk of B^T's row r that holds column n: first + r * (N / CHUNK) + n / CHUNK.
        if BLOCK_N <= CHUNK:  # the block lies in one chunk: one page lookup per rank row
            c = first + ranks * (N // CHUNK) + n0 // CHUNK
            page = tl.load(pages_ptr + page_off + c // CPP, mask=rank_mask,
                           other=0).to(tl.int64)
            base = (page * CPP + c % CPP) * CHUNK + n0 % CHUNK  # [BLOCK_R]
            b = tl.load(pool_ptr + base[:, None] + (cols - n0)[None, :],
                        mask=rank_mask[:, None] & col_mask[None, :], other=0.0)
        else:  # BLOCK_N / CHUNK chunks a row, each looked up (they may lie on two pages)
            c2 = first + ranks[:, None] * (N // CHUNK) + cols[None, :] // CHUNK
            m2 = rank_mask[:, None] & col_mask[None, :]
            page2 = tl.load(pages_ptr + page_off + c2 // CPP, mask=m2, other=0).to(tl.int64)
            b = tl.load(pool_ptr + (page2 * CPP + c2 % CPP) * CHUNK + cols[None, :] % CHUNK,
                        mask=m2, other=0.0)
        if ROWS1:
            s = tl.load(s_ptr + rows * stride_sm + s_col + ranks, mask=rank_mask, other=0.0)
            acc += tl.sum(s[:, None] * b.to(tl.float32), axis=0)
        else:
            s = tl.load(s_ptr + rows[:, None] * stride_sm + s_col + ranks[None, :],
                        mask=row_mask[:, None] & rank_mask[None, :], other=0.0)
            acc += tl.dot(s.to(b.dtype), b, input_precision=PRECISION)
    y, mask = tile_out(y_ptr + y_col, rows, row_mask, stride_ym, cols, col_mask, ROWS1)
    prev = tl.load(y, mask=mask, other=0.0)
    tl.store(y, (prev.to(tl.float32) + acc).to(prev.dtype), mask=mask)


# One warp per tile; more when few tiles hold wide ranks (the H200 sweep).
EXPAND_WARPS, EXPAND_WARPS_FEW_WIDE = 1, 4
# A program's block: 16 rank rows by 256 columns (two chunks of a 7B shape). At decode batch 64
# on the H200 (one warp, graph metadata; bench/results/lora-variants-2026-12-01T0156-*.json,
# ...T0200-mix-new-rule.json) against 32 x 128, the rule before, the q,k,v / o_proj expand took,
# one adapter a row: S2's rank mix 23.4 / 10.6 us against 28.3 / 11.7, rank 64 35.1 / 11.6
# against 42.8 / 13.1 (rank 16: 11.3 / 5.3 against 12.4 / 6.6 at 16 x 128); on 5 adapters
# (16-row tiles) it lost: 13.4 / 12.7 against 12.5 / 8.8, about 0.15 ms a 7B decode step, where
# many adapters a step gain 0.19 (S2's mix) to 0.29 ms (rank 64). 16 x 128 beat 32 x 128 on the
# mix and on 5 adapters but lost for o_proj at rank 64 (16.4 us).
EXPAND_RANK_TILE, EXPAND_BLOCK_N = 16, 256
# Benchmarks compare another rule in one call: LORAPLANE_LORA_EXPAND_TILE=32x128 (rank rows x
# columns).
EXPAND_TILE_ENV = "LORAPLANE_LORA_EXPAND_TILE"
if _tile := os.environ.get(EXPAND_TILE_ENV):
    try:
        EXPAND_RANK_TILE, EXPAND_BLOCK_N = (int(v) for v in _tile.split("x"))
    except ValueError:
        raise ValueError(f"{EXPAND_TILE_ENV}={_tile!r}: expected RANKSxCOLUMNS, e.g. 32x128") \
            from None


def column_offsets(ys: Sequence[torch.Tensor]) -> list[int] | None:
    """Columns from ys[0] to each of ys, when all are column blocks of one tensor's rows (the
    same storage, row stride and row count, each block within a row); None otherwise."""
    y0 = ys[0]
    size = y0.element_size()
    offs = []
    for y in ys:
        d = y.data_ptr() - y0.data_ptr()
        if (y.untyped_storage().data_ptr() != y0.untyped_storage().data_ptr()
                or y.shape[0] != y0.shape[0] or y.stride() != y0.stride() or d % size):
            return None
        offs.append(d // size)
    stride = y0.stride(0)
    if min(offs) < 0 or any(o + y.shape[1] > stride for o, y in zip(offs, ys, strict=True)):
        return None
    return offs


def lora_expand(s: torch.Tensor, y: torch.Tensor | Sequence[torch.Tensor],
                pool_layer: torch.Tensor, meta: LoraKernelMeta, module: str | Sequence[str],
                chunk: int, chunks_per_page: int, block_m: int, block_n: int | None = None,
                num_warps: int | None = None, num_stages: int = 1,
                offsets: list[int] | None = None, block_r: int | None = None) -> None:
    """y [T, N] += s [T, >= max_rank] · B^T for each segment's adapter, in place.

    A fused group in one launch: `module` up to three modules and `y` their outputs, column
    blocks of one tensor's rows (column_offsets; `offsets`: what it returned, when the caller
    has checked already), with member j's shrink at columns j * width.. of s (width = s's
    columns / members), as a fused shrink lays it out.
    s may be one module's column block of a fused shrink's output (row stride larger than its
    width). On the H200 one warp per [16 x 128] output tile was fastest from 16 rows up
    (bench/results/lora-kernels-nvidia-h200-2026-11-30-sweep.json); few rows of wide ranks
    want more warps."""
    modules = [module] if isinstance(module, str) else list(module)
    ys = [y] if isinstance(y, torch.Tensor) else list(y)
    if not 0 < len(modules) == len(ys) <= 3:
        raise ValueError(f"one to three modules, one output each (got {len(modules)} modules, "
                         f"{len(ys)} outputs)")
    offs = list(offsets) if offsets is not None else [0] if len(ys) == 1 else column_offsets(ys)
    if offs is None:
        raise ValueError("a group's outputs must be column blocks of one tensor's rows")
    y0 = ys[0]
    if y0.stride(1) != 1 or s.stride(1) != 1 or pool_layer.stride(-1) != 1:
        raise ValueError("s, y and the pool layer must be contiguous in their last dimension")
    widths = [t.shape[1] for t in ys]
    if any(n % chunk for n in widths):
        raise ValueError(f"output widths {widths} are not multiples of the chunk {chunk}")
    if meta.num_tiles == 0:
        return
    # Blocks wider than a chunk (a page lookup per chunk instead of per rank row) must tile
    # every width exactly (the kernel counts a member's blocks as width // BLOCK_N); else at
    # most a chunk, 128 columns.
    if block_n is None:
        block_n = EXPAND_BLOCK_N
    if block_n > chunk and any(n % block_n for n in widths):
        block_n = min(chunk, 128)
    if num_warps is None:
        wide_few = meta.num_tiles < 16 and meta.max_rank > 32
        num_warps = EXPAND_WARPS_FEW_WIDE if wide_few else EXPAND_WARPS
    if block_r is None:
        block_r = EXPAND_RANK_TILE
    s_width = s.shape[1] // len(modules)
    ns = widths + [0] * (3 - len(widths))
    offs += [0] * (3 - len(offs))
    packed = pack_modules(modules)
    grid = (meta.num_tiles, sum(triton.cdiv(n, block_n) for n in widths))
    _expand_kernel[grid](s, y0, pool_layer, meta.tiles, meta.segs, meta.offsets, meta.pages,
                         s.stride(0), y0.stride(0), s_width, packed, ns[0], ns[1], ns[2],
                         offs[1], offs[2],
                         CHUNK=chunk, CPP=chunks_per_page, BLOCK_M=block_m, BLOCK_N=block_n,
                         BLOCK_R=block_r, PRECISION=dot_precision(pool_layer.dtype),
                         num_warps=num_warps, num_stages=num_stages)


def lora_expand_ref(s: torch.Tensor, y: torch.Tensor, pool_layer: torch.Tensor,
                    meta: LoraKernelMeta, module: str, chunk: int, chunks_per_page: int) -> None:
    """Plain-torch twin of lora_expand reading the same metadata."""
    n = y.shape[1]
    for start, end, bt in segment_weights(pool_layer, meta, module, 1, chunk, chunks_per_page, n):
        y[start:end] += (s[start:end, :bt.shape[0]] @ bt.float()).to(y.dtype)
