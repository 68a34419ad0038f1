"""Rotary position embedding (rotate-half layout) in one launch, rounding as the torch module.

Its plain-torch twin is the model's own `models.llama.rotate` (compared in the tests).

The torch version gathers cos/sin rows, casts them, builds the rotated copy with a cat and does
three element-wise ops: eight launches per call, two calls per layer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotary_kernel(x_ptr, pos_ptr, cos_ptr, sin_ptr, out_ptr, H, stride_xt, stride_xh,
                   stride_ot, stride_oh, stride_c,
                   HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = heads[:, None] < H
    d = tl.arange(0, HALF)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    dt = out_ptr.dtype.element_ty
    # cos/sin rows [hd] in float32, rounded to the working dtype as the module does.
    c1 = tl.load(cos_ptr + pos * stride_c + d).to(dt).to(tl.float32)[None, :]
    c2 = tl.load(cos_ptr + pos * stride_c + HALF + d).to(dt).to(tl.float32)[None, :]
    s1 = tl.load(sin_ptr + pos * stride_c + d).to(dt).to(tl.float32)[None, :]
    s2 = tl.load(sin_ptr + pos * stride_c + HALF + d).to(dt).to(tl.float32)[None, :]
    src = x_ptr + t * stride_xt + heads[:, None] * stride_xh + d[None, :]
    x1 = tl.load(src, mask=hmask, other=0.0).to(tl.float32)  # [BLOCK_H, HALF]
    x2 = tl.load(src + HALF, mask=hmask, other=0.0).to(tl.float32)
    # out = x * cos + cat(-x2, x1) * sin, each product rounded before the sum.
    o1 = ((x1 * c1).to(dt).to(tl.float32) + (-x2 * s1).to(dt).to(tl.float32)).to(dt)
    o2 = ((x2 * c2).to(dt).to(tl.float32) + (x1 * s2).to(dt).to(tl.float32)).to(dt)
    dst = out_ptr + t * stride_ot + heads[:, None] * stride_oh + d[None, :]
    tl.store(dst, o1, mask=hmask)
    tl.store(dst + HALF, o2, mask=hmask)


def rotary_supported(head_dim: int) -> bool:
    """The kernel needs a power-of-two half head."""
    return head_dim % 2 == 0 and triton.next_power_of_2(head_dim // 2) == head_dim // 2


def rotary(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
           sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, hd] rotated by each row's position; cos/sin [max_positions, hd] float32."""
    t, h, hd = x.shape
    if x.stride(2) != 1 or cos.stride(1) != 1 or sin.stride() != cos.stride():
        raise ValueError("x, cos and sin must be contiguous in their last dimension")
    if not rotary_supported(hd) or cos.shape[1] != hd or positions.shape != (t,) \
            or positions.stride(0) != 1:
        raise ValueError(f"rotary: head_dim {hd}, cos {tuple(cos.shape)}, positions "
                         f"{tuple(positions.shape)} do not fit")
    out = torch.empty_like(x)
    if t:
        block_h = min(triton.next_power_of_2(h), 16)
        _rotary_kernel[(t, triton.cdiv(h, block_h))](
            x, positions, cos, sin, out, h, x.stride(0), x.stride(1), out.stride(0),
            out.stride(1), cos.stride(0), HALF=hd // 2, BLOCK_H=block_h, num_warps=2)
    return out

