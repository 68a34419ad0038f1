"""Small helpers every kernel wrapper uses."""

from __future__ import annotations

import torch


def dot_precision(dtype: torch.dtype) -> str:
    """float32 stays IEEE (no TF32 rounding), so fp32 kernels match their torch twins."""
    return "ieee" if dtype == torch.float32 else "tf32"


def compiled_variants() -> dict[str, set[str]] | None:
    """The cache keys (specialization and options, as text) of the compiled variants of each of
    this package's Triton kernels in this process, by kernel name, or None where Triton's JIT
    keeps no per-device cache (the interpreter, other versions). A benchmark compares them
    before and after its timed part: a compile there (up to seconds each) is a start-up cost
    that was timed as serving, and its key says which argument's class was new."""
    import importlib
    import pkgutil

    import triton

    from loraplane.engine import kernels

    keys: dict[str, set[str]] = {}
    for info in pkgutil.iter_modules(kernels.__path__):
        module = importlib.import_module(f"{kernels.__name__}.{info.name}")
        for name, obj in vars(module).items():
            caches = getattr(obj, "device_caches", None)
            if not isinstance(obj, triton.runtime.JITFunction) or caches is None:
                continue
            for entry in caches.values():
                if not isinstance(entry, tuple) or not isinstance(entry[0], dict):
                    return None
                keys.setdefault(f"{info.name}.{name}", set()).update(map(str, entry[0]))
    return keys


def new_variants(before: dict[str, set[str]] | None,
                 after: dict[str, set[str]] | None) -> dict[str, list[str]] | None:
    """Keys of the variants compiled between two compiled_variants() readings, by kernel
    (kernels with none left out)."""
    if before is None or after is None:
        return None
    out = {k: sorted(v - before.get(k, set())) for k, v in sorted(after.items())}
    return {k: v for k, v in out.items() if v}
