"""The Triton implementation of the batched multi-adapter LoRA op (GPU, or CPU interpreter)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from loraplane.engine.config import FUSED_GROUPS, LORA_MODULES, ModelConfig
from loraplane.engine.kernels.lora_expand import (
    EXPAND_WARPS,
    EXPAND_WARPS_FEW_WIDE,
    column_offsets,
    lora_expand,
)
from loraplane.engine.kernels.lora_meta import (
    RANK_TILES,
    LoraKernelMeta,
    StaticMeta,
    StaticShape,
    build_meta,
)
from loraplane.engine.kernels.lora_shrink import (
    SHRINK_WARPS_FEW,
    SHRINK_WARPS_MANY,
    lora_shrink,
    shrink_width,
)
from loraplane.engine.lora.ops import LoraBatch, LoraOp, LoraSegment, targeted_modules
from loraplane.engine.memory_pool import DevicePool

log = logging.getLogger(__name__)
# One shrink launch serves each group of projections reading the same input.
GROUP_OF = {m: g for g in FUSED_GROUPS for m in g}


def targeted_group(module: str, modules: frozenset[str]) -> tuple[str, ...]:
    """The members of `module`'s group (itself alone if it has none) among `modules`, in the
    group's order: what one shrink launch covers."""
    return tuple(m for m in GROUP_OF.get(module, (module,)) if m in modules)


def compile_lora_kernels(pool: DevicePool, config: ModelConfig, block_m: int) -> int:
    """Launch the shrink and expand once in every variant serving can hit, on metadata whose
    tiles all point at a rank-0 segment (every program returns at once), so Triton compiles
    them now and not while a request waits (up to a second each on the H200; its disk cache
    makes later starts quick). Variants: each rank tile, split-K or not, and the shrink's two
    warp/stage settings; each rank tile with the expand's two warp settings; the projections'
    widths (Triton specializes on their divisibility). Returns the launches."""
    dev, dtype = pool.data.device, pool.data.dtype
    lay = pool.layout
    launches = 0
    shapes = {m: config.module_shape(m) for m in LORA_MODULES}
    for block_r in RANK_TILES:
        meta = StaticMeta(StaticShape(tiles=1, segs=1, pages=1, max_rank=block_r), block_m,
                          dev).meta
        for k in sorted({i for i, _ in shapes.values()}):
            x = torch.zeros(1, k, dtype=dtype, device=dev)
            for split in (1, 2):
                for warps_stages in (SHRINK_WARPS_MANY, SHRINK_WARPS_FEW):
                    lora_shrink(x, pool.data[0], meta, "q_proj", lay.chunk, lay.chunks_per_page,
                                block_m, split_k=split, num_warps=warps_stages,
                                num_stages=warps_stages, block_r=block_r)
                    launches += 1
        s = torch.zeros(1, shrink_width(block_r), dtype=torch.float32, device=dev)
        for n in sorted({o for _, o in shapes.values()}):
            y = torch.zeros(1, n, dtype=dtype, device=dev)
            for warps in (EXPAND_WARPS, EXPAND_WARPS_FEW_WIDE):
                # (the expand's rank tile is EXPAND_RANK_TILE whatever the ranks)
                lora_expand(s, y, pool.data[0], meta, "q_proj", lay.chunk, lay.chunks_per_page,
                            block_m, num_warps=warps)
                launches += 1
    return launches


def member_block(s: torch.Tensor, group: tuple[str, ...], module: str) -> torch.Tensor:
    """Module's columns [T, width] of a group's shrink laid out member after member."""
    width = s.shape[1] // len(group)
    j = group.index(module)
    return s[:, j * width:(j + 1) * width]


def held_back(y: torch.Tensor, group: tuple[str, ...]) -> bool:
    """Whether a member's output waits for its siblings' to be expanded with them in one launch:
    a column block of a wider row (fused layers) in a group of several."""
    return y.stride(0) > y.shape[1] and len(group) > 1


def expand_group(s: torch.Tensor, group: tuple[str, ...], held: dict[str, torch.Tensor],
                 pool: DevicePool, layer: int, meta: LoraKernelMeta, block_m: int) -> None:
    """Expand, and empty, `held` (module -> output) of a group whose shrink s holds member j at
    columns j * width: one launch when they are the whole group's column blocks of one tensor,
    else one per member."""
    members = [m for m in group if m in held]
    ys = [held.pop(m) for m in members]
    lay, pool_layer = pool.layout, pool.data[layer]
    offsets = column_offsets(ys) if members == list(group) else None
    if offsets is not None:
        lora_expand(s, ys, pool_layer, meta, members, lay.chunk, lay.chunks_per_page, block_m,
                    offsets=offsets)
        return
    for m, y in zip(members, ys, strict=True):
        lora_expand(member_block(s, group, m), y, pool_layer, meta, m, lay.chunk,
                    lay.chunks_per_page, block_m)


def check_none_held(held: list[str], waiting_for: list[str], segments: list[LoraSegment]) -> None:
    """At a step's start: a forward that stopped before a fused group's last member left its
    siblings' LoRA terms unadded. Raises if a step is about to run; the runner's reset after a
    failed forward (no segments) only logs, so the forward's own error is what the caller sees."""
    if not held:
        return
    msg = f"LoRA terms of {held} were held for {waiting_for}, which never ran"
    if segments:
        raise RuntimeError(msg)
    log.error("%s (the forward that held them did not finish)", msg)


@dataclass
class _Shrunk:
    """A fused shrink's output [T, len(group) * shrink_width(max_rank)], kept until the group's
    last module; `held`: members' outputs whose expand waits to run with the others' in one
    launch."""

    x: torch.Tensor
    layer: int
    group: tuple[str, ...]
    s: torch.Tensor
    pending: set[str]
    held: dict[str, torch.Tensor] = field(default_factory=dict)


class TritonLoraOp(LoraOp):
    """Shrink then expand over all segments and ranks at once; one shrink per fused group, and
    one expand per group when its members' outputs are column blocks of one tensor (fused
    layers): those wait for the group's last member. The model reads none of a group's outputs
    before it has run every member (q, k, v; gate, up), as LlamaAttention and MLP do."""

    block_m = 16
    graph_safe = True

    def __init__(self, pool: DevicePool, split_k: int | None = None) -> None:
        super().__init__(pool)
        self.split_k = split_k
        self._shrunk: _Shrunk | None = None

    def prepare(self, segments: list[LoraSegment]) -> LoraBatch:
        g, self._shrunk = self._shrunk, None
        if g is not None:
            check_none_held(sorted(g.held), sorted(g.pending), segments)
        if not segments:
            return LoraBatch([])
        return LoraBatch(segments, build_meta(segments, self.block_m, self.pool.data.device),
                         targeted_modules(segments))

    def static_meta(self, rows: int, max_rank: int, chunks_per_rank: int) -> StaticMeta:
        """Fixed-size metadata buffers for a CUDA graph of `rows` decode rows.

        chunks_per_rank: pool chunks one rank row of an adapter on all seven modules takes.
        """
        per_adapter = self.pool.layout.pages_for_chunks(max_rank * chunks_per_rank)
        shape = StaticShape(tiles=rows, segs=rows + 1, pages=rows * per_adapter,
                            max_rank=max_rank)
        return StaticMeta(shape, self.block_m, self.pool.data.device)

    def compile_kernels(self, config: ModelConfig) -> int:
        return compile_lora_kernels(self.pool, config, self.block_m)

    def _group_shrink(self, x: torch.Tensor, layer: int, module: str,
                      batch: LoraBatch) -> _Shrunk:
        """The shrink of `module`'s group (its members this step's adapters target), run once
        per x."""
        lay = self.pool.layout
        cached = self._shrunk
        # The model passes one tensor object to every projection of a group; identity (the
        # cache holds a reference, so the object cannot be recycled) tells that x is the same.
        if cached is None or cached.x is not x or cached.layer != layer \
                or module not in cached.pending:
            if cached is not None:
                self._expand_held(cached, batch)
            group = targeted_group(module, batch.modules)
            s = lora_shrink(x, self.pool.data[layer], batch.kernel_meta, group, lay.chunk,
                            lay.chunks_per_page, self.block_m, self.split_k)
            cached = self._shrunk = _Shrunk(x, layer, group, s, set(group))
        return cached

    def _expand_held(self, g: _Shrunk, batch: LoraBatch) -> None:
        """Expand the outputs g holds (expand_group)."""
        if g.held:
            expand_group(g.s, g.group, g.held, self.pool, g.layer, batch.kernel_meta,
                         self.block_m)

    def apply(self, x: torch.Tensor, y: torch.Tensor, layer: int, module: str,
              batch: LoraBatch) -> None:
        if module not in batch.modules:
            return  # no adapter of the step targets it
        g = self._group_shrink(x, layer, module, batch)
        g.pending.discard(module)
        if held_back(y, g.group):
            g.held[module] = y
        else:
            expand_group(g.s, g.group, {module: y}, self.pool, layer, batch.kernel_meta,
                         self.block_m)
        if not g.pending:
            self._expand_held(g, batch)
            self._shrunk = None
