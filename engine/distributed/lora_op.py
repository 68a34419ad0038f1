"""The batched multi-adapter LoRA op of one tensor-parallel rank (S-LoRA's partition).

It reads the rank's adapter shards (sharding.shard_lora_weights) from the rank's pool with the
same shrink/expand kernels as one GPU (their torch twins on CPU); only the ranks in the kernel
metadata and two small collectives on [tokens, rank] tensors differ.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from loraplane.engine.distributed.sharding import ROW_PARALLEL, padded_rank
from loraplane.engine.kernels.lora_expand import lora_expand, lora_expand_ref
from loraplane.engine.kernels.lora_meta import LoraKernelMeta, build_meta
from loraplane.engine.kernels.lora_shrink import lora_shrink, lora_shrink_ref
from loraplane.engine.lora.ops import LoraBatch, LoraOp, LoraSegment
from loraplane.engine.memory_pool import DevicePool


@dataclass(frozen=True)
class ShardedMeta:
    """Two views of the step's segments: padded ranks r_pad, and r_pad / N for the strided
    shrink of column-parallel modules; plus the modules any segment's adapter targets."""

    full: LoraKernelMeta
    strided: LoraKernelMeta
    modules: frozenset[str]


class TensorParallelLoraOp(LoraOp):
    """Column-parallel: shrink [T, r_pad/N], all-gather to [T, r_pad], expand into the local
    output shard. Row-parallel: shrink a partial [T, r_pad], all-reduce, expand into this rank's
    columns of the partial output (which the base model's all-reduce then sums)."""

    block_m = 16
    split_k = 4

    def __init__(self, pool: DevicePool, rank: int, world: int,
                 group: dist.ProcessGroup | None) -> None:
        super().__init__(pool)
        self.rank = rank
        self.world = world
        self.group = group
        self.kernels = pool.data.device.type == "cuda"

    def prepare(self, segments: list[LoraSegment]) -> LoraBatch:
        if not segments:
            return LoraBatch([])
        dev = self.pool.data.device
        full = [padded_rank(s.adapter.rank, self.world) for s in segments]
        modules = frozenset(m for s in segments for (m, kind) in s.adapter.offsets if kind == "a")
        meta = ShardedMeta(build_meta(segments, self.block_m, dev, full),
                           build_meta(segments, self.block_m, dev,
                                      [r // self.world for r in full]), modules)
        return LoraBatch(segments, meta)

    def _shrink(self, x: torch.Tensor, pool_layer: torch.Tensor, meta: LoraKernelMeta,
                module: str) -> torch.Tensor:
        lay = self.pool.layout
        if self.kernels:
            return lora_shrink(x, pool_layer, meta, module, lay.chunk, lay.chunks_per_page,
                               self.block_m, self.split_k)
        return lora_shrink_ref(x, pool_layer, meta, module, lay.chunk, lay.chunks_per_page)

    def _expand(self, s: torch.Tensor, y: torch.Tensor, pool_layer: torch.Tensor,
                meta: LoraKernelMeta, module: str) -> None:
        lay = self.pool.layout
        if self.kernels:
            lora_expand(s, y, pool_layer, meta, module, lay.chunk, lay.chunks_per_page,
                        self.block_m)
        else:
            lora_expand_ref(s, y, pool_layer, meta, module, lay.chunk, lay.chunks_per_page)

    def apply(self, x: torch.Tensor, y: torch.Tensor, layer: int, module: str,
              batch: LoraBatch) -> None:
        meta = batch.kernel_meta
        assert isinstance(meta, ShardedMeta)
        if module not in meta.modules:
            return  # the same on every rank: no collective is skipped by one rank only
        pool_layer = self.pool.data[layer]  # [num_pages, page_elems]
        if module in ROW_PARALLEL:
            s = self._shrink(x, pool_layer, meta.full, module)  # [T, R] partial sums
            dist.all_reduce(s, group=self.group)
            width = y.shape[1] // self.world
            cols = y[:, self.rank * width:(self.rank + 1) * width]  # [T, out/N] view
            self._expand(s, cols, pool_layer, meta.full, module)
            return
        s = self._shrink(x, pool_layer, meta.strided, module)  # [T, R'] rows p, p+N, ...
        parts = [torch.empty_like(s) for _ in range(self.world)]
        dist.all_gather(parts, s, group=self.group)
        # [T, R', N] -> [T, R'·N]: column j·N + p is x · A_pad[j·N + p] for every row, whatever
        # its adapter's rank (a shard's columns past its own rank are zero).
        s_full = torch.stack(parts, dim=-1).reshape(s.shape[0], -1)
        self._expand(s_full, y, pool_layer, meta.full, module)
