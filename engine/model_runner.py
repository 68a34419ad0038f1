"""Builds one step's tensors (tokens, positions, KV slots, LoRA segments), runs it, samples."""

from __future__ import annotations

from collections.abc import Callable

import torch

from loraplane.engine.attention import SeqSlice, TorchAttention, TritonAttention
from loraplane.engine.cuda_graphs import DecodeGraphs, GraphKey
from loraplane.engine.lora.layers import LoraState
from loraplane.engine.lora.ops import LoraSegment
from loraplane.engine.memory_pool import DevicePool
from loraplane.engine.models.llama import LlamaModel
from loraplane.engine.sampler import sample
from loraplane.engine.scheduler import ScheduledBatch
from loraplane.engine.sequence import Sequence

AttentionBackend = type[TorchAttention] | type[TritonAttention]
# Called with a step's token ids, sequence slices, LoRA segments and the key of the decode graph
# that runs it (None: eager) just before the forward (tensor parallelism sends them to the other
# ranks there).
StepHook = Callable[[list[int], list[SeqSlice], list[LoraSegment], GraphKey | None], None]


def default_attention(device: torch.device) -> AttentionBackend:
    """Triton kernels on CUDA, the plain-torch backend elsewhere."""
    return TritonAttention if device.type == "cuda" else TorchAttention


class ModelRunner:
    """Runs a ScheduledBatch through the model and returns the sampled tokens."""

    def __init__(self, model: LlamaModel, pool: DevicePool, lora: LoraState,
                 attention: AttentionBackend | None = None,
                 graphs: DecodeGraphs | None = None) -> None:
        self.model = model
        self.pool = pool
        self.lora = lora
        self.device = pool.data.device
        self.block_size = pool.layout.block_size
        self.attention = attention or default_attention(self.device)
        self.graphs = graphs  # decode steps replay captured CUDA graphs when set
        self.before_forward: StepHook | None = None

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> tuple[list[Sequence], list[int], torch.Tensor]:
        """Returns the sequences that sampled, their tokens, and their logits [N, vocab]."""
        # Decode rows first (the attention kernels want them so), and within each part the rows
        # of one adapter side by side, so each adapter is one contiguous LoRA segment.
        def key(j: int) -> tuple[bool, int]:
            adapter = batch.seqs[j].adapter
            return batch.num_new[j] > 1, adapter.id if adapter is not None else 0
        order = sorted(range(len(batch)), key=key)
        seqs = [batch.seqs[j] for j in order]
        nums = [batch.num_new[j] for j in order]
        segments = lora_segments(seqs, nums)
        if self.graphs is not None and all(n == 1 for n in nums):  # a pure decode step
            graph = self.graphs.plan(seqs, segments)
            if graph is not None:
                if self.before_forward is not None:
                    ids, slices, _, _ = step_rows(seqs, nums)
                    self.before_forward(ids, slices, segments, graph)
                logits = self.graphs.run(seqs, segments, graph)
                assert logits is not None
                return seqs, sample(logits, seqs), logits
        ids, slices, sample_rows, samplers = step_rows(seqs, nums)
        if self.before_forward is not None:
            self.before_forward(ids, slices, segments, None)
        hidden = self.forward_rows(ids, slices, segments)
        if not samplers:
            return [], [], torch.empty(0)
        logits = self.model.logits(hidden[torch.tensor(sample_rows, device=self.device)])
        return samplers, sample(logits, samplers), logits

    def forward_rows(self, ids: list[int], slices: list[SeqSlice],
                     segments: list[LoraSegment]) -> torch.Tensor:
        """Hidden states [T, hidden] of an eager step's rows (rank 0's and a tensor-parallel
        worker's). The inputs go to the device without blocking the host: a blocking copy
        waits for the GPU to drain the previous step, after which the GPU idles while the host
        launches this step's kernels (a worker doing so made rank 0 wait for it at every
        collective of the step)."""
        dev = self.device
        meta = self.attention.build(slices, self.block_size, dev)
        self.lora.batch = self.lora.op.prepare(segments)
        try:
            return self.model(torch.tensor(ids).to(dev, non_blocking=True),
                              positions_of(slices).to(dev, non_blocking=True), self.pool, meta)
        finally:
            self.lora.batch = self.lora.op.prepare([])


def step_rows(seqs: list[Sequence], nums: list[int]) -> tuple[
        list[int], list[SeqSlice], list[int], list[Sequence]]:
    """The step's token ids, slices, the rows whose logits are sampled, and their sequences
    (those whose step reaches their last token)."""
    ids: list[int] = []
    slices: list[SeqSlice] = []
    sample_rows: list[int] = []
    samplers: list[Sequence] = []
    for seq, n in zip(seqs, nums, strict=True):
        start, end, row = seq.num_computed, seq.num_computed + n, len(ids)
        ids.extend(seq.ids_between(start, end))
        slices.append(SeqSlice(row, n, end, seq.block_table))
        if end == seq.num_tokens:
            sample_rows.append(row + n - 1)
            samplers.append(seq)
    return ids, slices, sample_rows, samplers


def positions_of(slices: list[SeqSlice]) -> torch.Tensor:
    """[T] int64 position of every row of the step's slices (host tensor)."""
    return torch.cat([torch.arange(s.context_len - s.num_new, s.context_len) for s in slices])


def lora_segments(seqs: list[Sequence], nums: list[int]) -> list[LoraSegment]:
    """One segment per run of consecutive rows with the same adapter (rows in batch order)."""
    segments: list[LoraSegment] = []
    row = 0
    for seq, n in zip(seqs, nums, strict=True):
        if seq.adapter is not None:
            last = segments[-1] if segments else None
            if last is not None and last.adapter is seq.adapter and last.end == row:
                segments[-1] = LoraSegment(last.start, row + n, seq.adapter)
            else:
                segments.append(LoraSegment(row, row + n, seq.adapter))
        row += n
    return segments
