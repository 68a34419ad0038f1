"""Rotary position embedding (rotate-half layout) in one launch, rounding as the torch module;
`rotary_qk` rotates a layer's queries and keys together in that one launch.

Its plain-torch twin is the model's own `models.llama.rotate` (compared in the tests).

The torch version gathers cos/sin rows, casts them, builds the rotated copy with a cat and does
three element-wise ops: eight launches per call, two calls per layer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(x_ptr, out_ptr, t, head_block, H, stride_xt, stride_xh, stride_ot, stride_oh,
                  c1, c2, s1, s2, HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    heads = head_block * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = heads[:, None] < H
    d = tl.arange(0, HALF)
    dt = out_ptr.dtype.element_ty
    src = x_ptr + t * stride_xt + heads[:, None] * stride_xh + d[None, :]
    x1 = tl.load(src, mask=hmask, other=0.0).to(tl.float32)  # [BLOCK_H, HALF]
    x2 = tl.load(src + HALF, mask=hmask, other=0.0).to(tl.float32)
    # out = x * cos + cat(-x2, x1) * sin, each product rounded before the sum.
    o1 = ((x1 * c1).to(dt).to(tl.float32) + (-x2 * s1).to(dt).to(tl.float32)).to(dt)
    o2 = ((x2 * c2).to(dt).to(tl.float32) + (x1 * s2).to(dt).to(tl.float32)).to(dt)
    dst = out_ptr + t * stride_ot + heads[:, None] * stride_oh + d[None, :]
    tl.store(dst, o1, mask=hmask)
    tl.store(dst + HALF, o2, mask=hmask)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, pos_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr, HQ, HK, q_blocks,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_qot, stride_qoh,
                   stride_kot, stride_koh, stride_c,
                   v_ptr, cache_ptr, slot_ptr, stride_vt, stride_vh, stride_cs, stride_ckv,
                   stride_ch,
                   HALF: tl.constexpr, BLOCK_H: tl.constexpr, STORE: tl.constexpr):
    # Axis 1: the query head blocks, then the key head blocks, then (STORE) the value head
    # blocks. STORE: rotated keys and the values go straight into their KV-cache slot
    # (cache [slots, 2, kvh, hd]) instead of ko, which replaces two scatter launches (and
    # their copies) a layer.
    t = tl.program_id(0)
    hb = tl.program_id(1)
    d = tl.arange(0, HALF)
    k_blocks = tl.cdiv(HK, BLOCK_H)
    if STORE:
        slot = tl.load(slot_ptr + t).to(tl.int64)
        if hb >= q_blocks + k_blocks:  # values: a plain copy into the slot
            heads = (hb - q_blocks - k_blocks) * BLOCK_H + tl.arange(0, BLOCK_H)
            hmask = heads[:, None] < HK
            dd = tl.arange(0, 2 * HALF)
            v = tl.load(v_ptr + t * stride_vt + heads[:, None] * stride_vh + dd[None, :],
                        mask=hmask, other=0.0)
            dst = cache_ptr + slot * stride_cs + stride_ckv + heads[:, None] * stride_ch
            tl.store(dst + dd[None, :], v.to(cache_ptr.dtype.element_ty), mask=hmask)
            return
    pos = tl.load(pos_ptr + t).to(tl.int64)
    dt = qo_ptr.dtype.element_ty
    # cos/sin rows [hd] in float32, rounded to the working dtype as the module does.
    c1 = tl.load(cos_ptr + pos * stride_c + d).to(dt).to(tl.float32)[None, :]
    c2 = tl.load(cos_ptr + pos * stride_c + HALF + d).to(dt).to(tl.float32)[None, :]
    s1 = tl.load(sin_ptr + pos * stride_c + d).to(dt).to(tl.float32)[None, :]
    s2 = tl.load(sin_ptr + pos * stride_c + HALF + d).to(dt).to(tl.float32)[None, :]
    if hb < q_blocks:
        _rotate_heads(q_ptr, qo_ptr, t, hb, HQ, stride_qt, stride_qh, stride_qot, stride_qoh,
                      c1, c2, s1, s2, HALF, BLOCK_H)
    elif STORE:  # keys into the slot's k half (row offset 0: the slot's base pointer)
        _rotate_heads(k_ptr, cache_ptr + slot * stride_cs, t, hb - q_blocks, HK, stride_kt,
                      stride_kh, 0, stride_ch, c1, c2, s1, s2, HALF, BLOCK_H)
    else:
        _rotate_heads(k_ptr, ko_ptr, t, hb - q_blocks, HK, stride_kt, stride_kh, stride_kot,
                      stride_koh, c1, c2, s1, s2, HALF, BLOCK_H)


def _no_store(x: torch.Tensor, positions: torch.Tensor) -> tuple[object, ...]:
    """The STORE arguments of a launch without a cache: tensors of the launch's device as
    pointers, zero strides; never read."""
    return (x, x, positions, 0, 0, 0, 0, 0)


def rotary_supported(head_dim: int) -> bool:
    """The kernel needs a power-of-two half head."""
    return head_dim % 2 == 0 and triton.next_power_of_2(head_dim // 2) == head_dim // 2


def _check(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
           sin: torch.Tensor) -> None:
    t, _, hd = x.shape
    if x.stride(2) != 1 or cos.stride(1) != 1 or sin.stride() != cos.stride():
        raise ValueError("x, cos and sin must be contiguous in their last dimension")
    if not rotary_supported(hd) or cos.shape[1] != hd or positions.shape != (t,) \
            or positions.stride(0) != 1:
        raise ValueError(f"rotary: head_dim {hd}, cos {tuple(cos.shape)}, positions "
                         f"{tuple(positions.shape)} do not fit")


def rotary_qk(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
              sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, nh, hd] and k [T, kvh, hd] (any row and head strides) rotated by each row's position,
    in one launch; cos/sin [max_positions, hd] float32. Returns new contiguous tensors."""
    _check(q, positions, cos, sin)
    _check(k, positions, cos, sin)
    if k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2] or k.dtype != q.dtype:
        raise ValueError(f"rotary: q {tuple(q.shape)} {q.dtype} and k {tuple(k.shape)} "
                         f"{k.dtype} differ in rows, head_dim or dtype")
    t, hq, hd = q.shape
    hk = k.shape[1]
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if t:
        block_h = min(triton.next_power_of_2(max(hq, hk)), 16)
        q_blocks = triton.cdiv(hq, block_h)
        grid = (t, q_blocks + triton.cdiv(hk, block_h))
        _rotary_kernel[grid](
            q, k, positions, cos, sin, q_out, k_out, hq, hk, q_blocks, q.stride(0), q.stride(1),
            k.stride(0), k.stride(1), q_out.stride(0), q_out.stride(1), k_out.stride(0),
            k_out.stride(1), cos.stride(0), *_no_store(q, positions), HALF=hd // 2, BLOCK_H=block_h,
            STORE=False, num_warps=2)
    return q_out, k_out


def rotary_qk_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                    cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor,
                    slot_mapping: torch.Tensor) -> torch.Tensor:
    """Rotate q [T, nh, hd] and k [T, kvh, hd] by each row's position and write the rotated k
    and v [T, kvh, hd] into row t's slot slot_mapping[t] of kv_cache [slots, 2, kvh, hd], all in
    one launch (any row and head strides; cos/sin [max_positions, hd] float32). Returns the
    rotated q, a new contiguous tensor."""
    _check(q, positions, cos, sin)
    _check(k, positions, cos, sin)
    t, hq, hd = q.shape
    hk = k.shape[1]
    if k.shape[0] != t or k.shape[2] != hd or k.dtype != q.dtype or v.shape != k.shape \
            or v.stride(2) != 1:
        raise ValueError(f"rotary: q {tuple(q.shape)} {q.dtype}, k {tuple(k.shape)} {k.dtype} "
                         f"and v {tuple(v.shape)} do not fit together")
    if kv_cache.dim() != 4 or kv_cache.shape[1:] != (2, hk, hd) or kv_cache.stride(3) != 1 \
            or slot_mapping.shape != (t,) or slot_mapping.stride(0) != 1:
        raise ValueError(f"rotary: cache {tuple(kv_cache.shape)} or slots "
                         f"{tuple(slot_mapping.shape)} do not fit k {tuple(k.shape)}")
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if t:
        block_h = min(triton.next_power_of_2(max(hq, hk)), 16)
        q_blocks = triton.cdiv(hq, block_h)
        kv_blocks = triton.cdiv(hk, block_h)
        _rotary_kernel[(t, q_blocks + 2 * kv_blocks)](
            q, k, positions, cos, sin, q_out, q_out, hq, hk, q_blocks, q.stride(0), q.stride(1),
            k.stride(0), k.stride(1), q_out.stride(0), q_out.stride(1), 0, 0, cos.stride(0),
            v, kv_cache, slot_mapping, v.stride(0), v.stride(1), kv_cache.stride(0),
            kv_cache.stride(1), kv_cache.stride(2), HALF=hd // 2, BLOCK_H=block_h, STORE=True,
            num_warps=2)
    return q_out


def rotary(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
           sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, hd] rotated by each row's position; cos/sin [max_positions, hd] float32."""
    _check(x, positions, cos, sin)
    t, h, hd = x.shape
    out = torch.empty_like(x)
    if t:
        block_h = min(triton.next_power_of_2(h), 16)
        q_blocks = triton.cdiv(h, block_h)
        # The same kernel with no key heads (k arguments repeat x's and are never read).
        _rotary_kernel[(t, q_blocks)](
            x, x, positions, cos, sin, out, out, h, 0, q_blocks, x.stride(0), x.stride(1),
            x.stride(0), x.stride(1), out.stride(0), out.stride(1), out.stride(0),
            out.stride(1), cos.stride(0), *_no_store(x, positions), HALF=hd // 2, BLOCK_H=block_h,
            STORE=False, num_warps=2)
    return out
