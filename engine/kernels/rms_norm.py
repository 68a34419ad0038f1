"""RMSNorm in one launch: out = w * (x / rms(x)), statistics in float32, as the model's module.

Its plain-torch twin is the model's own `models.llama.rms_norm` (compared in the tests).

The plain-torch RMSNorm is seven element-wise launches; at decode batch sizes each costs more
than its bytes, 64 times per forward of a 32-layer model.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, N, stride_x, stride_o, eps,
                     BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
    # Round the normalized row to the working dtype first, then multiply: the module's order.
    normed = (x * rstd).to(out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (w * normed).to(out_ptr.dtype.element_ty),
             mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, N] -> [T, N] in x's dtype (weight [N] of the same dtype)."""
    if x.dim() != 2 or x.stride(1) != 1 or weight.shape != (x.shape[1],):
        raise ValueError(f"rms_norm wants x [T, N] contiguous rows and weight [N]; got "
                         f"{tuple(x.shape)} and {tuple(weight.shape)}")
    if weight.dtype != x.dtype:
        raise ValueError(f"weight dtype {weight.dtype} differs from x's {x.dtype}")
    t, n = x.shape
    out = torch.empty_like(x)
    if t:
        block = triton.next_power_of_2(n)
        _rms_norm_kernel[(t,)](x, weight, out, n, x.stride(0), out.stride(0), eps,
                               BLOCK=block, num_warps=min(16, max(1, block // 512)))
    return out

