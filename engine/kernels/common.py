"""Small helpers every kernel wrapper uses."""

from __future__ import annotations

import torch


def dot_precision(dtype: torch.dtype) -> str:
    """float32 stays IEEE (no TF32 rounding), so fp32 kernels match their torch twins."""
    return "ieee" if dtype == torch.float32 else "tf32"


def compiled_variants() -> int | None:
    """How many compiled variants (specializations) of this package's Triton kernels exist in
    this process, or None where Triton's JIT keeps no per-device cache (the interpreter, other
    versions). A benchmark compares it before and after its timed part: a compile there (seconds
    each) is a start-up cost that was timed as serving."""
    import importlib
    import pkgutil

    import triton

    from loraplane.engine import kernels

    total = 0
    for info in pkgutil.iter_modules(kernels.__path__):
        module = importlib.import_module(f"{kernels.__name__}.{info.name}")
        for obj in vars(module).values():
            caches = getattr(obj, "device_caches", None)
            if not isinstance(obj, triton.runtime.JITFunction) or caches is None:
                continue
            for entry in caches.values():
                if not isinstance(entry, tuple) or not isinstance(entry[0], dict):
                    return None
                total += len(entry[0])
    return total
