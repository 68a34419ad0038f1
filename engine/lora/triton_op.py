"""The Triton implementation of the batched multi-adapter LoRA op (GPU, or CPU interpreter)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraplane.engine.config import FUSED_GROUPS
from loraplane.engine.kernels.lora_expand import lora_expand
from loraplane.engine.kernels.lora_meta import StaticMeta, StaticShape, build_meta
from loraplane.engine.kernels.lora_shrink import lora_shrink
from loraplane.engine.lora.ops import LoraBatch, LoraOp, LoraSegment
from loraplane.engine.memory_pool import DevicePool

# One shrink launch serves each group of projections reading the same input.
GROUP_OF = {m: g for g in FUSED_GROUPS for m in g}


@dataclass
class _Shrunk:
    """A fused shrink's output [T, len(group) * max_rank], kept until the group's last module."""

    x: torch.Tensor
    layer: int
    group: tuple[str, ...]
    s: torch.Tensor
    pending: set[str]


class TritonLoraOp(LoraOp):
    """Shrink then expand over all segments and ranks at once; one shrink per fused group."""

    block_m = 16
    graph_safe = True

    def __init__(self, pool: DevicePool, split_k: int | None = None) -> None:
        super().__init__(pool)
        self.split_k = split_k
        self._shrunk: _Shrunk | None = None

    def prepare(self, segments: list[LoraSegment]) -> LoraBatch:
        self._shrunk = None
        if not segments:
            return LoraBatch([])
        return LoraBatch(segments, build_meta(segments, self.block_m, self.pool.data.device))

    def static_meta(self, rows: int, max_rank: int, chunks_per_rank: int) -> StaticMeta:
        """Fixed-size metadata buffers for a CUDA graph of `rows` decode rows.

        chunks_per_rank: pool chunks one rank row of an adapter on all seven modules takes.
        """
        per_adapter = self.pool.layout.pages_for_chunks(max_rank * chunks_per_rank)
        shape = StaticShape(tiles=rows, segs=rows + 1, pages=rows * per_adapter,
                            max_rank=max_rank)
        return StaticMeta(shape, self.block_m, self.pool.data.device)

    def _shrink(self, x: torch.Tensor, layer: int, module: str,
                batch: LoraBatch) -> torch.Tensor:
        """s [T, max_rank] of `module`: a column block of its group's shrink, run once per x."""
        lay = self.pool.layout
        group = GROUP_OF.get(module, (module,))
        cached = self._shrunk
        # The model passes one tensor object to every projection of a group; identity (the
        # cache holds a reference, so the object cannot be recycled) tells that x is the same.
        if cached is None or cached.x is not x or cached.layer != layer \
                or module not in cached.pending:
            s = lora_shrink(x, self.pool.data[layer], batch.kernel_meta, group, lay.chunk,
                            lay.chunks_per_page, self.block_m, self.split_k)
            cached = _Shrunk(x, layer, group, s, set(group))
        cached.pending.discard(module)
        self._shrunk = cached if cached.pending else None
        width = cached.s.shape[1] // len(cached.group)
        j = cached.group.index(module)
        return cached.s[:, j * width:(j + 1) * width]

    def apply(self, x: torch.Tensor, y: torch.Tensor, layer: int, module: str,
              batch: LoraBatch) -> None:
        lay = self.pool.layout
        s = self._shrink(x, layer, module, batch)
        lora_expand(s, y, self.pool.data[layer], batch.kernel_meta, module, lay.chunk,
                    lay.chunks_per_page, self.block_m)
