"""Small helpers every kernel wrapper uses."""

from __future__ import annotations

import torch


def dot_precision(dtype: torch.dtype) -> str:
    """float32 stays IEEE (no TF32 rounding), so fp32 kernels match their torch twins."""
    return "ieee" if dtype == torch.float32 else "tf32"
