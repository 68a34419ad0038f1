"""The Triton implementation of the batched multi-adapter LoRA op (GPU, or CPU interpreter)."""

from __future__ import annotations

import torch

from loraplane.engine.kernels.lora_expand import lora_expand
from loraplane.engine.kernels.lora_meta import StaticMeta, StaticShape, build_meta
from loraplane.engine.kernels.lora_shrink import lora_shrink
from loraplane.engine.lora.ops import LoraBatch, LoraOp, LoraSegment
from loraplane.engine.memory_pool import DevicePool


class TritonLoraOp(LoraOp):
    """Shrink then expand, one launch each per projection, over all segments and ranks at once."""

    block_m = 16
    graph_safe = True

    def __init__(self, pool: DevicePool, split_k: int = 4) -> None:
        super().__init__(pool)
        self.split_k = split_k

    def prepare(self, segments: list[LoraSegment]) -> LoraBatch:
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

    def apply(self, x: torch.Tensor, y: torch.Tensor, layer: int, module: str,
              batch: LoraBatch) -> None:
        lay = self.pool.layout
        pool_layer = self.pool.data[layer]  # [num_pages, page_elems]
        s = lora_shrink(x, pool_layer, batch.kernel_meta, module, lay.chunk, lay.chunks_per_page,
                        self.block_m, self.split_k)
        lora_expand(s, y, pool_layer, batch.kernel_meta, module, lay.chunk, lay.chunks_per_page,
                    self.block_m)
