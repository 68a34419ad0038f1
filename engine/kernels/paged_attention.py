"""Paged attention over one layer of the unified pool: decode (split-K) and varlen causal prefill.

The KV view is ``kv_pages [num_pages, block_size, 2, num_kv_heads, head_dim]`` (K at index 0 of
dim 2, V at 1), i.e. ``pool.data[l].view(num_pages, block_size, 2, kvh, hd)``. A sequence's keys
are found through its row of ``block_tables [B, max_blocks]`` int32. One program handles all the
query heads of one KV head (GQA), so each K/V tile is read once per group; grids depend on shapes
only and the wrappers never wait on the device, so both can be captured in a CUDA graph.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from loraplane.engine.kernels.common import dot_precision

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Fewest keys a decode split should cover: below this the extra reduce pass costs more than it buys.
_MIN_KEYS_PER_SPLIT = 128
_MAX_SPLITS = 32


@triton.jit
def _attend_tile(acc, m_i, l_i, q, kv_ptr, bt_row_ptr, n0, kv_end, qpos, scale_log2,
                 stride_kp, stride_kt, stride_kv, BLOCK_SIZE: tl.constexpr,
                 BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr,
                 CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    """One online-softmax step over keys n0..n0+BLOCK_N-1 (kv_ptr already at the KV head)."""
    kpos = n0 + tl.arange(0, BLOCK_N)  # [BLOCK_N] key positions
    dd = tl.arange(0, HEAD_DIM)
    if MASKED:
        kmask = kpos < kv_end
        page = tl.load(bt_row_ptr + kpos // BLOCK_SIZE, mask=kmask, other=0).to(tl.int64)
    else:
        page = tl.load(bt_row_ptr + kpos // BLOCK_SIZE).to(tl.int64)
    # [BLOCK_N] element offset of each key's K row; V is stride_kv further.
    row = page * stride_kp + (kpos % BLOCK_SIZE) * stride_kt
    kp = kv_ptr + row[:, None] + dd[None, :]
    if MASKED:
        k = tl.load(kp, mask=kmask[:, None], other=0.0)
        v = tl.load(kp + stride_kv, mask=kmask[:, None], other=0.0)
    else:
        k = tl.load(kp)
        v = tl.load(kp + stride_kv)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2  # [M, BLOCK_N]
    if MASKED:
        keep = kmask[None, :]
        if CAUSAL:
            keep = keep & (kpos[None, :] <= qpos[:, None])
        s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if CAUSAL:
        # A row that has seen no key yet keeps m = -inf; exp2(-inf - -inf) would be NaN.
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i


# The block tables' row stride is the step's longest table: not specialized on (see lora_shrink).
@triton.jit(do_not_specialize=["stride_btb"])
def _decode_kernel(q_ptr, kv_ptr, bt_ptr, ctx_ptr, out_ptr, part_acc_ptr, part_ml_ptr,
                   scale_log2, stride_qb, stride_qh, stride_kp, stride_kt, stride_kv, stride_kh,
                   stride_btb, stride_ob, stride_oh,
                   GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
                   PRECISION: tl.constexpr):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(ctx_ptr + b)
    # This split's keys [start, end); a row with ctx 0 (CUDA-graph padding) reads no KV at all.
    per_split = tl.cdiv(tl.cdiv(ctx, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(ctx, start + per_split)
    g = tl.arange(0, GROUP_PAD)  # query heads of this KV head, padded for tl.dot
    gmask = g < GROUP
    heads = kvh * GROUP + g
    dd = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + dd[None, :],
                mask=gmask[:, None], other=0.0)  # [GROUP_PAD, HEAD_DIM]
    acc = tl.zeros((GROUP_PAD, HEAD_DIM), dtype=tl.float32)
    m_i = tl.full((GROUP_PAD,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((GROUP_PAD,), dtype=tl.float32)
    kv_head_ptr = kv_ptr + kvh * stride_kh
    bt_row = bt_ptr + b.to(tl.int64) * stride_btb
    for n0 in range(start, end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, kv_head_ptr, bt_row, n0, end, g,
                                     scale_log2, stride_kp, stride_kt, stride_kv,
                                     BLOCK_SIZE, BLOCK_N, HEAD_DIM, True, False, PRECISION)
    if NUM_SPLITS == 1:
        o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + dd[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=gmask[:, None])
    else:
        # Partials [B, num_heads, NUM_SPLITS, HEAD_DIM] and [B, num_heads, NUM_SPLITS, 2] (m, l).
        part = (b * (GROUP * tl.num_programs(1)) + heads) * NUM_SPLITS + split  # [GROUP_PAD]
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + dd[None, :], acc,
                 mask=gmask[:, None])
        tl.store(part_ml_ptr + part * 2, m_i, mask=gmask)
        tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=gmask)


@triton.jit
def _decode_reduce_kernel(part_acc_ptr, part_ml_ptr, out_ptr, stride_ob, stride_oh,
                          NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr,
                          HEAD_DIM: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    sp = tl.arange(0, SPLITS_PAD)
    smask = sp < NUM_SPLITS
    dd = tl.arange(0, HEAD_DIM)
    part = (b * tl.num_programs(1) + h) * NUM_SPLITS + sp  # [SPLITS_PAD]
    m = tl.load(part_ml_ptr + part * 2, mask=smask, other=float("-inf"))
    lsum = tl.load(part_ml_ptr + part * 2 + 1, mask=smask, other=0.0)
    acc = tl.load(part_acc_ptr + part[:, None] * HEAD_DIM + dd[None, :], mask=smask[:, None],
                  other=0.0)
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # every split empty: output zeros
    w = tl.exp2(m - m_max)  # empty splits (m = -inf) weigh 0
    denom = tl.sum(w * lsum, 0)
    o = tl.sum(acc * w[:, None], 0) / tl.where(denom == 0.0, 1.0, denom)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + dd, o.to(out_ptr.dtype.element_ty))


@triton.jit(do_not_specialize=["stride_btb"])
def _prefill_kernel(q_ptr, kv_ptr, bt_ptr, cu_ptr, ctx_ptr, out_ptr, scale_log2,
                    stride_qt, stride_qh, stride_kp, stride_kt, stride_kv, stride_kh,
                    stride_btb, stride_ot, stride_oh,
                    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    tile = tl.program_id(0)
    b = tl.program_id(1)
    kvh = tl.program_id(2)
    q_start = tl.load(cu_ptr + b)
    q_len = tl.load(cu_ptr + b + 1) - q_start
    ctx = tl.load(ctx_ptr + b)
    first_pos = ctx - q_len  # position of the sequence's first new token
    # Tile rows are (token, head-in-group) pairs flattened token-major: row r is token r // GROUP.
    r = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    tok = r // GROUP
    heads = kvh * GROUP + r % GROUP
    rmask = tok < q_len
    qpos = first_pos + tok  # [BLOCK_M]
    dd = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + (q_start + tok)[:, None].to(tl.int64) * stride_qt
                + heads[:, None] * stride_qh + dd[None, :], mask=rmask[:, None], other=0.0)
    tok_min = tile * BLOCK_M // GROUP
    tok_max = tl.minimum(((tile + 1) * BLOCK_M - 1) // GROUP, q_len - 1)
    # Keys every row of the tile sees (no mask), then the diagonal band up to the last row.
    kv_end = tl.where(tok_min < q_len, first_pos + tok_max + 1, 0)
    full_end = tl.minimum((first_pos + tok_min + 1) // BLOCK_N * BLOCK_N, kv_end)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    kv_head_ptr = kv_ptr + kvh * stride_kh
    bt_row = bt_ptr + b.to(tl.int64) * stride_btb
    for n0 in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, kv_head_ptr, bt_row, n0, kv_end, qpos,
                                     scale_log2, stride_kp, stride_kt, stride_kv,
                                     BLOCK_SIZE, BLOCK_N, HEAD_DIM, False, False, PRECISION)
    for n0 in range(full_end, kv_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, kv_head_ptr, bt_row, n0, kv_end, qpos,
                                     scale_log2, stride_kp, stride_kt, stride_kv,
                                     BLOCK_SIZE, BLOCK_N, HEAD_DIM, True, True, PRECISION)
    o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(out_ptr + (q_start + tok)[:, None].to(tl.int64) * stride_ot
             + heads[:, None] * stride_oh + dd[None, :], o.to(out_ptr.dtype.element_ty),
             mask=rmask[:, None])


def _check_common(q: torch.Tensor, kv_pages: torch.Tensor, block_tables: torch.Tensor,
                  context_lens: torch.Tensor, batch: int) -> tuple[int, int, int]:
    """Validates the shared arguments; returns (num_kv_heads, group size, block_size)."""
    if q.dim() != 3 or kv_pages.dim() != 5 or kv_pages.shape[2] != 2:
        raise ValueError(f"q must be 3-D and kv_pages [pages, block, 2, kvh, hd]; got "
                         f"{tuple(q.shape)} and {tuple(kv_pages.shape)}")
    _, num_heads, head_dim = q.shape
    _, block_size, _, kvh, kv_hd = kv_pages.shape
    if kv_hd != head_dim or num_heads % kvh:
        raise ValueError(f"{num_heads} query heads of {head_dim} over {kvh} KV heads of {kv_hd}")
    if head_dim < 16 or head_dim > 256 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim {head_dim} must be a power of two in [16, 256]")
    if q.dtype not in _DTYPES or kv_pages.dtype != q.dtype:
        raise ValueError(f"q {q.dtype} and kv_pages {kv_pages.dtype}: one of {_DTYPES}")
    if block_tables.dtype != torch.int32 or context_lens.dtype != torch.int32:
        raise ValueError("block_tables and context_lens must be int32")
    if block_tables.dim() != 2 or block_tables.shape[0] != batch or block_tables.stride(1) != 1:
        raise ValueError(f"block_tables must be [{batch}, max_blocks], contiguous in dim 1")
    if context_lens.shape != (batch,) or not context_lens.is_contiguous():
        raise ValueError(f"context_lens must be a contiguous [{batch}]")
    if q.stride(2) != 1 or kv_pages.stride(4) != 1:
        raise ValueError("q and kv_pages must be contiguous in head_dim")
    devices = {t.device for t in (q, kv_pages, block_tables, context_lens)}
    if len(devices) != 1:
        raise ValueError(f"tensors on several devices: {devices}")
    return kvh, num_heads // kvh, block_size


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


_SM_COUNTS: dict[int, int] = {}


def _sm_count(index: int) -> int:
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNTS[index]


def default_num_splits(batch: int, num_kv_heads: int, max_blocks: int, block_size: int,
                       device: torch.device) -> int:
    """Splits of the context per (row, KV head) so the grid fills the GPU twice; shapes only."""
    programs = max(batch * num_kv_heads, 1)
    want = triton.cdiv(2 * _num_sms(device), programs)
    by_length = max_blocks * block_size // _MIN_KEYS_PER_SPLIT
    return max(1, min(want, by_length, _MAX_SPLITS))


def paged_decode_attention(q: torch.Tensor, kv_pages: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, scale: float, num_splits: int | None = None,
                           block_n: int | None = None) -> torch.Tensor:
    """q [B, nh, hd] (one token per row, at position len-1) -> out [B, nh, hd] in q's dtype."""
    batch, num_heads, head_dim = q.shape
    kvh, group, block_size = _check_common(q, kv_pages, block_tables, context_lens, batch)
    out = torch.empty(batch, num_heads, head_dim, dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    if num_splits is None:
        num_splits = default_num_splits(batch, kvh, block_tables.shape[1], block_size, q.device)
    if block_n is None:
        block_n = 64 if head_dim <= 128 else 32
    if num_splits < 1 or block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"num_splits {num_splits} must be >= 1 and block_n {block_n} a power "
                         "of two >= 16")
    if num_splits > 1:
        part_acc = torch.empty(batch, num_heads, num_splits, head_dim, dtype=torch.float32,
                               device=q.device)
        part_ml = torch.empty(batch, num_heads, num_splits, 2, dtype=torch.float32,
                              device=q.device)
    else:
        part_acc = part_ml = out  # unused by the kernel when NUM_SPLITS == 1
    scale_log2 = scale * math.log2(math.e)
    grid = (batch, kvh, num_splits)
    _decode_kernel[grid](q, kv_pages, block_tables, context_lens, out, part_acc, part_ml,
                         scale_log2, q.stride(0), q.stride(1), kv_pages.stride(0),
                         kv_pages.stride(1), kv_pages.stride(2), kv_pages.stride(3),
                         block_tables.stride(0), out.stride(0), out.stride(1),
                         GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)),
                         HEAD_DIM=head_dim, BLOCK_SIZE=block_size, BLOCK_N=block_n,
                         NUM_SPLITS=num_splits, PRECISION=dot_precision(q.dtype),
                         num_warps=4, num_stages=2)
    if num_splits > 1:
        _decode_reduce_kernel[(batch, num_heads)](part_acc, part_ml, out, out.stride(0),
                                                  out.stride(1), NUM_SPLITS=num_splits,
                                                  SPLITS_PAD=triton.next_power_of_2(num_splits),
                                                  HEAD_DIM=head_dim, num_warps=4)
    return out


def paged_prefill_attention(q: torch.Tensor, kv_pages: torch.Tensor, block_tables: torch.Tensor,
                            cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor,
                            max_query_len: int, scale: float, block_m: int | None = None,
                            block_n: int | None = None) -> torch.Tensor:
    """q [T, nh, hd] packed by cu_seqlens_q [B+1]; causal with the cached context before it."""
    num_tokens, num_heads, head_dim = q.shape
    batch = cu_seqlens_q.shape[0] - 1
    if cu_seqlens_q.dim() != 1 or batch < 0 or cu_seqlens_q.dtype != torch.int32:
        raise ValueError("cu_seqlens_q must be a 1-D int32 [B+1]")
    if not cu_seqlens_q.is_contiguous() or cu_seqlens_q.device != q.device:
        raise ValueError("cu_seqlens_q must be contiguous and on q's device")
    kvh, group, block_size = _check_common(q, kv_pages, block_tables, context_lens, batch)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if batch == 0 or num_tokens == 0 or max_query_len <= 0:
        return out
    rows = max_query_len * group  # tile rows are (token, query head of the group) pairs
    if block_m is None:
        block_m = 64 if rows <= 64 else 128
    if block_n is None:
        block_n = 64 if head_dim <= 128 else 32
    for name, size in (("block_m", block_m), ("block_n", block_n)):
        if size < 16 or size & (size - 1):
            raise ValueError(f"{name} {size} must be a power of two >= 16")
    scale_log2 = scale * math.log2(math.e)
    grid = (triton.cdiv(rows, block_m), batch, kvh)
    _prefill_kernel[grid](q, kv_pages, block_tables, cu_seqlens_q, context_lens, out, scale_log2,
                          q.stride(0), q.stride(1), kv_pages.stride(0), kv_pages.stride(1),
                          kv_pages.stride(2), kv_pages.stride(3), block_tables.stride(0),
                          out.stride(0), out.stride(1),
                          GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
                          BLOCK_M=block_m, BLOCK_N=block_n, PRECISION=dot_precision(q.dtype),
                          num_warps=8 if block_m >= 128 else 4, num_stages=2)
    return out


def _gather_kv(kv_pages: torch.Tensor, pages: torch.Tensor,
               length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V [kvh, length, hd] in float32 of the first `length` positions of a page list."""
    bs = kv_pages.shape[1]
    blocks = kv_pages[pages[: -(-length // bs)].long()]  # [n, bs, 2, kvh, hd]
    flat = blocks.reshape(-1, *kv_pages.shape[2:])[:length].float()  # [length, 2, kvh, hd]
    return flat[:, 0].transpose(0, 1), flat[:, 1].transpose(0, 1)


def _attend_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qpos: torch.Tensor,
                scale: float) -> torch.Tensor:
    """q [n, nh, hd] at positions qpos [n] over k, v [kvh, C, hd] -> [n, nh, hd] float32."""
    n, nh, hd = q.shape
    kvh = k.shape[0]
    qg = q.float().view(n, kvh, nh // kvh, hd)
    s = torch.einsum("nkgd,kcd->nkgc", qg, k) * scale  # [n, kvh, groups, C]
    visible = torch.arange(k.shape[1], device=q.device)[None, :] <= qpos[:, None]  # [n, C]
    s = s.masked_fill(~visible[:, None, None, :], float("-inf"))
    return torch.einsum("nkgc,kcd->nkgd", s.softmax(-1), v).reshape(n, nh, hd)


def paged_decode_attention_ref(q: torch.Tensor, kv_pages: torch.Tensor,
                               block_tables: torch.Tensor, context_lens: torch.Tensor,
                               scale: float) -> torch.Tensor:
    """Plain-torch twin of paged_decode_attention (rows with no context give zeros)."""
    out = torch.zeros_like(q)
    for b, length in enumerate(context_lens.tolist()):
        if length == 0:
            continue
        k, v = _gather_kv(kv_pages, block_tables[b], length)
        qpos = torch.tensor([length - 1], device=q.device)
        out[b] = _attend_ref(q[b:b + 1], k, v, qpos, scale)[0].to(q.dtype)
    return out


def paged_prefill_attention_ref(q: torch.Tensor, kv_pages: torch.Tensor,
                                block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor,
                                context_lens: torch.Tensor, max_query_len: int,
                                scale: float) -> torch.Tensor:
    """Plain-torch twin of paged_prefill_attention."""
    out = torch.zeros_like(q)
    cu = cu_seqlens_q.tolist()
    for b, length in enumerate(context_lens.tolist()):
        start, end = cu[b], cu[b + 1]
        if end == start:
            continue
        k, v = _gather_kv(kv_pages, block_tables[b], length)
        qpos = torch.arange(length - (end - start), length, device=q.device)
        out[start:end] = _attend_ref(q[start:end], k, v, qpos, scale).to(q.dtype)
    return out
