"""RMSNorm in one launch: out = w * (x / rms(x)), statistics in float32, as the model's module;
and the same launch adding a residual first (`add_rms_norm`), which returns both the sum and
its norm.

Their plain-torch twins are the model's own `models.llama.rms_norm` (after `h + delta` for the
residual form), compared in the tests.

The plain-torch RMSNorm is seven element-wise launches; at decode batch sizes each costs more
than its bytes, 64 times per forward of a 32-layer model. Folding the residual add into the norm
removes another launch per norm.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, d_ptr, w_ptr, out_ptr, sum_ptr, N, stride_x, stride_d, stride_o,
                     stride_s, eps, BLOCK: tl.constexpr, ADD: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    dt = out_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if ADD:
        # h + delta rounded to the working dtype (as torch's add), kept as the new residual.
        d = tl.load(d_ptr + row * stride_d + cols, mask=mask, other=0.0).to(tl.float32)
        x = (x + d).to(dt)
        tl.store(sum_ptr + row * stride_s + cols, x, mask=mask)
        x = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
    # Round the normalized row to the working dtype first, then multiply: the module's order.
    normed = (x * rstd).to(dt).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (w * normed).to(dt), mask=mask)


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.dim() != 2 or x.stride(1) != 1 or weight.shape != (x.shape[1],):
        raise ValueError(f"rms_norm wants x [T, N] contiguous rows and weight [N]; got "
                         f"{tuple(x.shape)} and {tuple(weight.shape)}")
    if weight.dtype != x.dtype:
        raise ValueError(f"weight dtype {weight.dtype} differs from x's {x.dtype}")


def _launch(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float,
            out: torch.Tensor, total: torch.Tensor | None) -> None:
    t, n = x.shape
    if not t:
        return
    block = triton.next_power_of_2(n)
    d = x if delta is None else delta  # unread when ADD is off
    s = out if total is None else total
    _rms_norm_kernel[(t,)](x, d, weight, out, s, n, x.stride(0), d.stride(0), out.stride(0),
                           s.stride(0), eps, BLOCK=block, ADD=delta is not None,
                           num_warps=min(16, max(1, block // 512)))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, N] -> [T, N] in x's dtype (weight [N] of the same dtype)."""
    _check(x, weight)
    out = torch.empty_like(x)
    _launch(x, None, weight, eps, out, None)
    return out


def add_rms_norm(h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(h + delta, rms_norm(h + delta)) for h, delta [T, N] of one dtype, in one launch."""
    _check(h, weight)
    if delta.shape != h.shape or delta.dtype != h.dtype or delta.stride(1) != 1:
        raise ValueError(f"delta {tuple(delta.shape)} {delta.dtype} does not match h "
                         f"{tuple(h.shape)} {h.dtype} (rows contiguous)")
    total = torch.empty(h.shape, dtype=h.dtype, device=h.device)
    out = torch.empty_like(total)
    _launch(h, delta, weight, eps, out, total)
    return total, out
