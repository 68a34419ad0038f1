"""CUDA graphs for decode steps: one captured forward per batch-size bucket, with and without LoRA.

A decode step of a 7B model is hundreds of small kernels; launched from Python they cost more
than the GPU work at small batch. A graph replays them in one launch. Every input the forward
reads lives in a static buffer refilled before replay: token ids, positions, KV slots, block
tables and context lengths in one int32 buffer (`DecodeInputs`; padding rows get length 0 and
write their K/V to a scratch page), and the LoRA kernels' metadata (padding tiles point at a
rank-0 segment). A LoRA graph launches the LoRA kernels only for the projections its key names
(the step's adapters' modules): S-LoRA's q,k,v,o adapters leave gate, up and down without the
five launches a layer that would find nothing to do.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from loraplane.engine.attention import TritonAttention
from loraplane.engine.config import LORA_MODULES, ModelConfig
from loraplane.engine.decode_inputs import DecodeInputs
from loraplane.engine.lora.layers import LoraState
from loraplane.engine.lora.ops import LoraBatch, LoraSegment, targeted_modules
from loraplane.engine.memory_pool import KV, DevicePool
from loraplane.engine.models.llama import LlamaModel
from loraplane.engine.sequence import Sequence

log = logging.getLogger(__name__)
BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128)
# (rows of the bucket, LoRA rank cap (0: no LoRA), bit i set: LORA_MODULES[i] gets LoRA)
GraphKey = tuple[int, int, int]


def module_mask(modules: frozenset[str]) -> int:
    return sum(1 << i for i, m in enumerate(LORA_MODULES) if m in modules)


def mask_modules(mask: int) -> frozenset[str]:
    return frozenset(m for i, m in enumerate(LORA_MODULES) if mask >> i & 1)


class GraphLoraMeta(Protocol):
    """Fixed-size LoRA metadata a graph reads (the LoRA op's `static_meta`): `meta` is what
    the op's `apply` gets in its batch, `fill` rewrites it in place for a step's segments."""

    meta: Any

    def fill(self, segments: list[LoraSegment]) -> Any: ...


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: DecodeInputs  # ids, positions, slots, lens, block tables
    lora: GraphLoraMeta | None
    logits: torch.Tensor  # [B, vocab] float32


class DecodeGraphs:
    """Captures and replays decode forwards; `run` returns logits [rows, vocab] or None."""

    def __init__(self, model: LlamaModel, config: ModelConfig, pool: DevicePool, lora: LoraState,
                 max_model_len: int, max_batch: int, max_rank: int) -> None:
        self.model = model
        self.config = config
        self.pool = pool
        self.lora = lora
        self.block_size = pool.layout.block_size
        self.max_blocks = -(-max_model_len // self.block_size)
        self.max_rank = max_rank
        self.buckets = [b for b in BUCKETS if b <= max_batch]
        chunk = pool.layout.chunk
        self.chunks_per_rank = sum(sum(config.module_shape(m)) for m in LORA_MODULES) // chunk
        # Padding rows write their K/V here; the page is owned for the engine's life.
        self.scratch_slot = pool.pages.allocate(1, KV)[0] * self.block_size
        self.mempool = torch.cuda.graph_pool_handle()
        self.graphs: dict[GraphKey, _Graph] = {}
        # Called with each key capture_all is about to capture (tensor parallelism: the workers
        # must capture the same graph at the same time, meeting in its collectives).
        self.announce: Callable[[GraphKey], None] | None = None

    def bucket(self, rows: int) -> int | None:
        return next((b for b in self.buckets if b >= rows), None)

    def rank_class(self, rank: int) -> int:
        """The rank cap (16, 32, ..., max) of the graph that serves a batch whose top rank is
        `rank`: the LoRA kernels' rank tiles and buffers fit it instead of the engine's maximum."""
        return min(max(16, 1 << (rank - 1).bit_length()), self.max_rank)

    def capture_all(self, max_rank: int = 0,
                    modules: frozenset[str] = frozenset(LORA_MODULES)) -> int:
        """Capture now, instead of on first use, every bucket's graph without LoRA and for each
        rank class up to `max_rank` with LoRA on `modules` (a warm-up, so no step pays for a
        capture); returns how many graphs exist."""
        keys = [(0, 0)]
        if max_rank:
            keys += [(cap, module_mask(modules)) for cap in sorted(
                {self.rank_class(r) for r in (16, 32, 64, 128, 256, max_rank)
                 if r <= self.rank_class(max_rank)})]
        for b in self.buckets:
            for cap, mask in keys:
                if (b, cap, mask) not in self.graphs:
                    if self.announce is not None:
                        self.announce((b, cap, mask))
                    self.graph((b, cap, mask))
        return len(self.graphs)

    def graph(self, key: GraphKey) -> _Graph:
        """The graph of `key`, captured now if it does not exist yet."""
        g = self.graphs.get(key)
        if g is None:
            g = self.graphs[key] = self._capture(*key)
        return g

    def _capture(self, rows: int, rank_cap: int, mask: int) -> _Graph:
        dev = self.pool.data.device
        inputs = DecodeInputs(rows, self.max_blocks, self.block_size, self.scratch_slot, dev)
        ids, positions = inputs.ids, inputs.positions
        attn = TritonAttention(
            slot_mapping=inputs.slots,
            num_decode=rows,
            decode_tables=inputs.tables,
            decode_lens=inputs.lens,
            prefill_tables=torch.zeros(0, 1, dtype=torch.int32, device=dev),
            cu_seqlens_q=torch.zeros(1, dtype=torch.int32, device=dev),
            prefill_lens=torch.zeros(0, dtype=torch.int32, device=dev),
            max_query_len=0, block_size=self.block_size)
        static = None
        op = self.lora.op
        if rank_cap:
            static = op.static_meta(rows, rank_cap,  # type: ignore[attr-defined]
                                    self.chunks_per_rank)
            # A placeholder segment keeps the LoRA branch in the captured graph.
            self.lora.batch = LoraBatch([LoraSegment(0, 0, None)],  # type: ignore[arg-type]
                                        static.meta, mask_modules(mask))
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), torch.inference_mode():
                for _ in range(2):  # compile kernels, warm allocators outside the capture
                    self.model.logits(self.model(ids, positions, self.pool, attn))
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: the host tier's loader threads may pin host memory meanwhile (they
            # never touch this stream); global mode would fail the capture for their CUDA calls.
            with torch.cuda.graph(graph, pool=self.mempool, capture_error_mode="thread_local"), \
                    torch.inference_mode():
                logits = self.model.logits(self.model(ids, positions, self.pool, attn))
        finally:
            self.lora.batch = LoraBatch([])
        log.info("captured a decode graph for %d rows (LoRA rank cap %d, modules %s)", rows,
                 rank_cap, ",".join(sorted(mask_modules(mask))) if rank_cap else "-")
        return _Graph(graph, inputs, static, logits)

    def plan(self, seqs: list[Sequence], segments: list[LoraSegment]) -> GraphKey | None:
        """The key of the graph that serves a decode step of `seqs` (the smallest bucket that
        fits, the rank class of its top rank, its adapters' modules), or None if no graph fits
        the step."""
        b = self.bucket(len(seqs))
        if b is None or any(len(s.block_table) > self.max_blocks for s in seqs):
            return None
        rank_cap = mask = 0
        if segments:
            top = max(s.adapter.rank for s in segments)
            if top > self.max_rank:
                return None
            rank_cap = self.rank_class(top)
            mask = module_mask(targeted_modules(segments))
        return b, rank_cap, mask

    def run(self, seqs: list[Sequence], segments: list[LoraSegment],
            key: GraphKey | None = None) -> torch.Tensor | None:
        """Replay the graph that fits `seqs` (each decoding one token; `key`: from `plan`).

        Returns logits [len(seqs), vocab], or None if no graph fits the step.
        """
        key = key or self.plan(seqs, segments)
        if key is None:
            return None
        g = self.graph(key)
        g.inputs.fill(seqs)
        return self._replay(g, segments)[:len(seqs)]

    def run_rows(self, key: GraphKey, tokens: list[int], positions: list[int],
                 tables: list[list[int]], segments: list[LoraSegment]) -> None:
        """Replay graph `key` over rows given as token, position and block table (a
        tensor-parallel worker's step: rank 0 planned it and samples from its own logits)."""
        g = self.graph(key)
        g.inputs.fill_rows(tokens, positions, tables)
        self._replay(g, segments)

    @staticmethod
    def _replay(g: _Graph, segments: list[LoraSegment]) -> torch.Tensor:
        if g.lora is not None:
            g.lora.fill(segments)
        g.graph.replay()
        return g.logits
