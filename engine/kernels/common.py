"""Small helpers every kernel wrapper uses."""

from __future__ import annotations

import torch


def dot_precision(dtype: torch.dtype) -> str:
    """float32 stays IEEE (no TF32 rounding), so fp32 kernels match their torch twins."""
    return "ieee" if dtype == torch.float32 else "tf32"


def compiled_variants() -> dict[str, int] | None:
    """Compiled variants (specializations) of each of this package's Triton kernels in this
    process, by kernel name, or None where Triton's JIT keeps no per-device cache (the
    interpreter, other versions). A benchmark compares them before and after its timed part:
    a compile there (up to seconds each) is a start-up cost that was timed as serving."""
    import importlib
    import pkgutil

    import triton

    from loraplane.engine import kernels

    counts: dict[str, int] = {}
    for info in pkgutil.iter_modules(kernels.__path__):
        module = importlib.import_module(f"{kernels.__name__}.{info.name}")
        for name, obj in vars(module).items():
            caches = getattr(obj, "device_caches", None)
            if not isinstance(obj, triton.runtime.JITFunction) or caches is None:
                continue
            for entry in caches.values():
                if not isinstance(entry, tuple) or not isinstance(entry[0], dict):
                    return None
                key = f"{info.name}.{name}"
                counts[key] = counts.get(key, 0) + len(entry[0])
    return counts


def new_variants(before: dict[str, int] | None,
                 after: dict[str, int] | None) -> dict[str, int] | None:
    """Variants compiled between two compiled_variants() readings, by kernel (nonzero only)."""
    if before is None or after is None:
        return None
    return {k: n - before.get(k, 0) for k, n in sorted(after.items()) if n > before.get(k, 0)}
