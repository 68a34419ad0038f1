"""The batched multi-adapter LoRA op of one tensor-parallel rank (S-LoRA's partition).

It reads the rank's adapter shards (sharding.shard_lora_weights) from the rank's pool with the
same shrink/expand kernels as one GPU (their torch twins on CPU); only the ranks in the kernel
metadata and two small collectives on [tokens, rank] tensors differ.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from loraplane.engine.config import ModelConfig
from loraplane.engine.distributed.sharding import ROW_PARALLEL, padded_rank
from loraplane.engine.kernels.lora_expand import lora_expand, lora_expand_ref
from loraplane.engine.kernels.lora_meta import (
    LoraKernelMeta,
    StaticMeta,
    StaticShape,
    build_meta,
    kernels_fit,
)
from loraplane.engine.kernels.lora_shrink import lora_shrink, lora_shrink_ref
from loraplane.engine.lora.ops import LoraBatch, LoraOp, LoraSegment, targeted_modules
from loraplane.engine.lora.triton_op import (
    check_none_held,
    compile_lora_kernels,
    expand_group,
    held_back,
    member_block,
    targeted_group,
)
from loraplane.engine.memory_pool import DevicePool

log = logging.getLogger(__name__)
# Benchmarks only: skip the LoRA op's own collectives (the outputs are then WRONG) to measure what
# they cost, as S-LoRA's evaluation did; never set when serving.
SKIP_COLLECTIVES_ENV = "LORAPLANE_TP_SKIP_LORA_COLLECTIVES"
# Each LoRA collective starts before the base GEMM, asynchronously, so the GEMM overlaps it (on
# two H200s it took S4's LoRA collectives from 11 % of TP 2's throughput to 1.5 %); "0" waits
# for it where it starts (comparisons).
OVERLAP_ENV = "LORAPLANE_TP_LORA_OVERLAP"


# torch 2.13 renamed all_gather_into_tensor (older versions have only that name).
_all_gather = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)


def overlap_collectives() -> bool:
    """Whether the TP LoRA op overlaps its collectives with the base GEMMs (OVERLAP_ENV)."""
    return os.environ.get(OVERLAP_ENV, "1") != "0"


def shard_ranks(segments: list[LoraSegment], world: int) -> tuple[list[int], list[int]]:
    """Each segment's padded rank r_pad (the full view) and r_pad / N (the strided view)."""
    full = [padded_rank(s.adapter.rank, world) for s in segments]
    return full, [r // world for r in full]


@dataclass(frozen=True)
class ShardedMeta:
    """Two views of the step's segments: padded ranks r_pad, and r_pad / N for the strided
    shrink of column-parallel modules."""

    full: LoraKernelMeta
    strided: LoraKernelMeta


class ShardedStaticMeta:
    """A decode graph's fixed-size ShardedMeta (both rank views), refilled before each replay.
    The graph's key names the modules it applies LoRA to, the same on every rank, so every rank
    holds the same collectives."""

    def __init__(self, full: StaticMeta, strided: StaticMeta, world: int) -> None:
        self.full = full
        self.strided = strided
        self.world = world
        self.meta = ShardedMeta(full.meta, strided.meta)

    def fill(self, segments: list[LoraSegment]) -> ShardedMeta:
        full, strided = shard_ranks(segments, self.world)
        self.full.fill(segments, full)
        self.strided.fill(segments, strided)
        return self.meta


class TensorParallelLoraOp(LoraOp):
    """Column-parallel: shrink [T, r_pad/N], all-gather to [T, r_pad], expand into the local
    output shard. Row-parallel: shrink a partial [T, r_pad], all-reduce, expand into this rank's
    columns of the partial output (which the base model's all-reduce then sums). The shrink and
    collective run before the base GEMM (`before`), which overlaps the collective."""

    block_m = 16

    def __init__(self, pool: DevicePool, rank: int, world: int, group: dist.ProcessGroup | None,
                 kernels: bool | None = None) -> None:
        super().__init__(pool)
        self.rank = rank
        self.world = world
        self.group = group
        # Triton kernels on CUDA (where this rank's chunks are wide enough for them); their
        # torch twins elsewhere unless asked for.
        if kernels is None:
            kernels = pool.data.device.type == "cuda" and kernels_fit(pool.layout.chunk)
        self.kernels = kernels
        # (layer, module) -> its shrink and collective, started by `before`.
        self._pending: dict[tuple[int, str], _Started] = {}
        # The kernels read fixed-size metadata, so steps can be captured in CUDA graphs.
        self.graph_safe = self.kernels
        self.skip_collectives = os.environ.get(SKIP_COLLECTIVES_ENV) == "1"
        self.overlap = overlap_collectives()
        if self.skip_collectives:
            log.warning("%s=1: the LoRA op skips its collectives; outputs are wrong (a "
                        "benchmark of their cost only)", SKIP_COLLECTIVES_ENV)

    def static_meta(self, rows: int, max_rank: int, chunks_per_rank: int) -> ShardedStaticMeta:
        """Fixed-size metadata for a decode graph of `rows` rows and adapters of rank up to
        `max_rank`. chunks_per_rank: pool chunks one rank row of a whole adapter takes on all
        seven modules (a shard's padded rank rows take no more)."""
        cap = padded_rank(max_rank, self.world)
        pages = rows * self.pool.layout.pages_for_chunks(cap * chunks_per_rank)
        dev = self.pool.data.device

        def static(rank: int) -> StaticMeta:
            return StaticMeta(StaticShape(tiles=rows, segs=rows + 1, pages=pages, max_rank=rank),
                              self.block_m, dev)
        return ShardedStaticMeta(static(cap), static(cap // self.world), self.world)

    def compile_kernels(self, config: ModelConfig) -> int:
        return compile_lora_kernels(self.pool, config, self.block_m) if self.kernels else 0

    def prepare(self, segments: list[LoraSegment]) -> LoraBatch:
        started = {id(st): st for st in self._pending.values() if st.held}.values()
        check_none_held(sorted(m for st in started for m in st.held),
                        sorted(m for st in started for m in st.group if m not in st.held),
                        segments)
        self._pending.clear()
        if not segments:
            return LoraBatch([])
        dev = self.pool.data.device
        full, strided = shard_ranks(segments, self.world)
        meta = ShardedMeta(build_meta(segments, self.block_m, dev, full),
                           build_meta(segments, self.block_m, dev, strided))
        return LoraBatch(segments, meta, targeted_modules(segments))

    def _shrink(self, x: torch.Tensor, pool_layer: torch.Tensor, meta: LoraKernelMeta,
                module: str | tuple[str, ...]) -> torch.Tensor:
        """[T, M·R] for the M modules reading x, one launch (module j's block at j·R)."""
        lay = self.pool.layout
        if self.kernels:  # launch parameters as the one-GPU op: the H200 sweep's
            return lora_shrink(x, pool_layer, meta, module, lay.chunk, lay.chunks_per_page,
                               self.block_m)
        return lora_shrink_ref(x, pool_layer, meta, module, lay.chunk, lay.chunks_per_page)

    def _expand(self, s: torch.Tensor, y: torch.Tensor, pool_layer: torch.Tensor,
                meta: LoraKernelMeta, module: str) -> None:
        lay = self.pool.layout
        if self.kernels:
            lora_expand(s, y, pool_layer, meta, module, lay.chunk, lay.chunks_per_page,
                        self.block_m)
        else:
            lora_expand_ref(s, y, pool_layer, meta, module, lay.chunk, lay.chunks_per_page)

    def before(self, x: torch.Tensor, layer: int, module: str, batch: LoraBatch) -> None:
        """Shrink and start the module's collective before its base GEMM, which then overlaps
        the collective (async_op: NCCL runs it on its own stream; `apply` makes the compute
        stream wait for it, the host never waits). Column-parallel siblings on the same input
        (q, k, v or gate, up) are shrunk together and share one all-gather."""
        meta = batch.kernel_meta
        assert isinstance(meta, ShardedMeta)
        started = self._pending.get((layer, module))
        if started is not None and started.x is x:
            return  # a sibling on this input started it
        pool_layer = self.pool.data[layer]  # [num_pages, page_elems]
        if module in ROW_PARALLEL:
            s = self._shrink(x, pool_layer, meta.full, module)  # [T, R] partial sums
            work = None if self.skip_collectives else dist.all_reduce(
                s, group=self.group, async_op=self.overlap)
            self._pending[(layer, module)] = _Started(x, s, work, (module,))
            return
        group = targeted_group(module, batch.modules)
        # [T, k·R'], rank p's rows p, p+N, ... of each A: one fused shrink for the group.
        local = self._shrink(x, pool_layer, meta.strided, group)
        if self.skip_collectives:  # the same shape, one copy instead of a gather
            out, work = local.repeat(self.world, 1), None
        else:
            out = local.new_empty(self.world * x.shape[0], local.shape[1])  # [N·T, k·R']
            work = _all_gather(out, local, group=self.group, async_op=self.overlap)
        started = _Started(x, out, work, group)
        for m in group:
            self._pending[(layer, m)] = started

    def apply(self, x: torch.Tensor, y: torch.Tensor, layer: int, module: str,
              batch: LoraBatch) -> None:
        meta = batch.kernel_meta
        assert isinstance(meta, ShardedMeta)
        if module not in batch.modules:
            return  # the same on every rank: no collective is skipped by one rank only
        started = self._pending.pop((layer, module), None)
        if started is None or started.x is not x:  # a caller that did not call before()
            self.before(x, layer, module, batch)
            started = self._pending.pop((layer, module))
        pool_layer = self.pool.data[layer]
        if module in ROW_PARALLEL:
            width = y.shape[1] // self.world
            cols = y[:, self.rank * width:(self.rank + 1) * width]  # [T, out/N] view
            self._expand(started.result(), cols, pool_layer, meta.full, module)
            return
        full = started.gathered(self.world)  # [T, k·R'·N], member j at columns j·R'·N
        group = started.group
        # Fused layers: the group's outputs are column blocks of one product; the last member
        # to arrive expands them all in one launch, as the one-GPU op does (the model computes
        # q, k, v before any use).
        if self.kernels and held_back(y, group):
            started.held[module] = y
            if len(started.held) == len(group):
                expand_group(full, group, started.held, self.pool, layer, meta.full,
                             self.block_m)
            return
        self._expand(member_block(full, group, module), y, pool_layer, meta.full, module)


@dataclass
class _Started:
    """A module's shrink and its collective, started by `before`; one object serves all the
    column-parallel siblings that share the all-gather."""

    x: torch.Tensor  # the input it was computed from
    buf: torch.Tensor  # row-parallel: [T, R] being all-reduced; column: [N·T, k·R'] gathered
    work: dist.Work | None  # the collective still to wait for (None: done, or skipped)
    group: tuple[str, ...]
    # Fused layers: the outputs of the members applied so far, expanded with the last one.
    held: dict[str, torch.Tensor] = field(default_factory=dict)
    _full: torch.Tensor | None = None

    def result(self) -> torch.Tensor:
        """buf, once the collective has finished (the compute stream waits, not the host)."""
        if self.work is not None:
            self.work.wait()
            self.work = None
        return self.buf

    def gathered(self, world: int) -> torch.Tensor:
        """The column-parallel group's full shrink [T, k·R'·N] (computed once), member j's
        block at columns j·R'·N.., as a fused shrink lays out a group's (group expand)."""
        if self._full is None:
            out, k = self.result(), len(self.group)
            t, r = self.x.shape[0], out.shape[1] // k
            # [N, T, k, R'] -> [T, k, R', N] -> [T, k·R'·N]: member j's column i·N + p is
            # x · A_pad[i·N + p] for every row whatever its adapter's rank (a shard's columns
            # past it are zero).
            self._full = out.view(world, t, k, r).permute(1, 2, 3, 0).reshape(t, k * r * world)
        return self._full
