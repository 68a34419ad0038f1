"""The batched multi-adapter LoRA operation: its interface and the plain-torch implementation."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

from loraplane.engine.adapter_cache import Adapter
from loraplane.engine.config import LORA_MODULES, ModelConfig
from loraplane.engine.memory_pool import DevicePool


@dataclass(frozen=True)
class LoraSegment:
    """Rows [start, end) of the batch use `adapter` (rows in no segment use no adapter)."""

    start: int
    end: int
    adapter: Adapter


@dataclass
class LoraBatch:
    """Per-step LoRA metadata, built once and read by every projection of every layer.

    modules: the projections any segment's adapter targets; the others launch nothing (a
    decode graph holds LoRA launches only for the modules of its key)."""

    segments: list[LoraSegment]
    kernel_meta: Any = None  # what a kernel implementation packs for the device
    modules: frozenset[str] = frozenset(LORA_MODULES)


def targeted_modules(segments: list[LoraSegment]) -> frozenset[str]:
    """The projections any segment's adapter has weights for."""
    return frozenset(m for s in segments for (m, kind) in s.adapter.offsets if kind == "a")


class LoraOp(ABC):
    """y[rows] += (x[rows] · A_a^T) · B_a^T for each segment's adapter a, A/B read from the pool."""

    # True when `apply` can be captured in a CUDA graph from fixed-size metadata (static_meta).
    graph_safe = False

    def __init__(self, pool: DevicePool) -> None:
        self.pool = pool

    def prepare(self, segments: list[LoraSegment]) -> LoraBatch:
        """Turn the step's segments into whatever the implementation reads in `apply`."""
        return LoraBatch(segments, modules=targeted_modules(segments))

    def compile_kernels(self, config: ModelConfig) -> int:
        """Compile, before serving, whatever kernels `apply` would otherwise compile on first
        use; returns how many launches that took (none here)."""
        return 0

    def before(self, x: torch.Tensor, layer: int, module: str, batch: LoraBatch) -> None:
        """Called with the projection's input before its base GEMM runs (then `apply` after
        it): an op may start work that the GEMM can overlap (the tensor-parallel op's
        collectives). Nothing by default."""
        return None

    @abstractmethod
    def apply(self, x: torch.Tensor, y: torch.Tensor, layer: int, module: str,
              batch: LoraBatch) -> None:
        """Add the LoRA term of `module` in `layer` to y [T, out] in place, x [T, in]."""


class TorchLoraOp(LoraOp):
    """Reference implementation: a gather and two small matmuls per segment."""

    def weights(self, adapter: Adapter, layer: int, module: str, kind: str,
                width: int) -> torch.Tensor:
        """A [r, in] (kind "a") or B^T [r, out] (kind "bt") of one adapter, read from the pool."""
        first, count = adapter.offsets[(module, kind)]
        chunks = self.pool.chunks_layer(layer)  # [num_chunks_total, chunk]
        if adapter.contiguous_start is not None:
            start = adapter.contiguous_start + first
            flat = chunks[start:start + count]
        else:
            assert adapter.chunk_table is not None
            flat = chunks[adapter.chunk_table[first:first + count]]
        return flat.reshape(adapter.rank, width)

    def apply(self, x: torch.Tensor, y: torch.Tensor, layer: int, module: str,
              batch: LoraBatch) -> None:
        for seg in batch.segments:
            if (module, "a") not in seg.adapter.offsets:
                continue  # this adapter leaves the module alone
            a = self.weights(seg.adapter, layer, module, "a", x.shape[1])  # [r, in]
            bt = self.weights(seg.adapter, layer, module, "bt", y.shape[1])  # [r, out]
            y[seg.start:seg.end] += (x[seg.start:seg.end] @ a.t()) @ bt
