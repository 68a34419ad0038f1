"""SwiGLU's activation in one launch: out = silu(gate) * up, rounding as the torch expression.

Plain torch is two launches (silu, then the product) and a [T, I] intermediate; `silu_mul_ref`
is the twin the tests compare with. gate and up may be column blocks of one fused gate,up
product (row stride larger than their width).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.nn import functional as F


@triton.jit
def _silu_mul_kernel(g_ptr, u_ptr, out_ptr, N, stride_g, stride_u, stride_o,
                     BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    dt = out_ptr.dtype.element_ty
    g = tl.load(g_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    # silu in float32 rounded to the working dtype, then the rounded product: torch's order.
    s = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (s * u).to(dt), mask=mask)


def silu_mul(gate: torch.Tensor, up: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """gate, up [T, I] (rows contiguous, any row stride) -> silu(gate) * up [T, I] contiguous."""
    if gate.dim() != 2 or gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"silu_mul wants gate and up [T, I] of one dtype; got "
                         f"{tuple(gate.shape)} {gate.dtype} and {tuple(up.shape)} {up.dtype}")
    if gate.stride(1) != 1 or up.stride(1) != 1:
        raise ValueError("gate and up must be contiguous in their last dimension")
    t, n = gate.shape
    out = torch.empty(t, n, dtype=gate.dtype, device=gate.device)
    if t and n:
        block = min(block, triton.next_power_of_2(n))
        _silu_mul_kernel[(t, triton.cdiv(n, block))](
            gate, up, out, n, gate.stride(0), up.stride(0), out.stride(0), BLOCK=block,
            num_warps=4)
    return out


def silu_mul_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Plain-torch twin of silu_mul: the model's own expression."""
    return F.silu(gate) * up
