"""Builds one step's tensors (tokens, positions, KV slots, LoRA segments), runs it, samples."""

from __future__ import annotations

import torch

from loraplane.engine.attention import AttentionMetadata, PrefillSegment
from loraplane.engine.lora.layers import LoraState
from loraplane.engine.lora.ops import LoraSegment
from loraplane.engine.memory_pool import DevicePool
from loraplane.engine.models.llama import LlamaModel
from loraplane.engine.sampler import sample
from loraplane.engine.scheduler import ScheduledBatch
from loraplane.engine.sequence import Sequence


class ModelRunner:
    """Runs a ScheduledBatch through the model and returns the sampled tokens."""

    def __init__(self, model: LlamaModel, pool: DevicePool, lora: LoraState) -> None:
        self.model = model
        self.pool = pool
        self.lora = lora
        self.device = pool.data.device
        self.block_size = pool.layout.block_size

    def _slots(self, seq: Sequence, end: int) -> torch.Tensor:
        """[end] flat KV slots of positions 0..end-1 of a sequence."""
        bt = torch.tensor(seq.block_table, dtype=torch.int64)
        slots = (bt[:, None] * self.block_size + torch.arange(self.block_size)).view(-1)
        return slots[:end]

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> tuple[list[Sequence], list[int], torch.Tensor]:
        """Returns the sequences that sampled, their tokens, and their logits [N, vocab]."""
        # Rows of one adapter side by side: each adapter is one contiguous LoRA segment.
        order = sorted(range(len(batch)), key=lambda j: batch.seqs[j].adapter.id
                       if batch.seqs[j].adapter is not None else 0)
        ids: list[int] = []
        positions: list[torch.Tensor] = []
        slot_map: list[torch.Tensor] = []
        decode_rows: list[int] = []
        decode_ctx: list[torch.Tensor] = []
        prefills: list[PrefillSegment] = []
        segments: list[LoraSegment] = []
        sample_rows: list[int] = []
        samplers: list[Sequence] = []
        for j in order:
            seq, n = batch.seqs[j], batch.num_new[j]
            start, end, row = seq.num_computed, seq.num_computed + n, len(ids)
            ids.extend(seq.all_ids[start:end])
            positions.append(torch.arange(start, end))
            slots = self._slots(seq, end)
            slot_map.append(slots[start:end])
            if n == 1:
                decode_rows.append(row)
                decode_ctx.append(slots)
            else:
                prefills.append(PrefillSegment(row, n, slots.to(self.device)))
            if seq.adapter is not None:
                last = segments[-1] if segments else None
                if last is not None and last.adapter is seq.adapter and last.end == row:
                    segments[-1] = LoraSegment(last.start, row + n, seq.adapter)
                else:
                    segments.append(LoraSegment(row, row + n, seq.adapter))
            if end == seq.num_tokens:
                sample_rows.append(row + n - 1)
                samplers.append(seq)
        meta = self._attention_metadata(slot_map, decode_rows, decode_ctx, prefills)
        dev = self.device
        self.lora.batch = self.lora.op.prepare(segments)
        try:
            hidden = self.model(torch.tensor(ids, device=dev), torch.cat(positions).to(dev),
                                self.pool, meta)
        finally:
            self.lora.batch = self.lora.op.prepare([])
        if not samplers:
            return [], [], torch.empty(0)
        logits = self.model.logits(hidden[torch.tensor(sample_rows, device=dev)])
        return samplers, sample(logits, samplers), logits

    def _attention_metadata(self, slot_map: list[torch.Tensor], decode_rows: list[int],
                            decode_ctx: list[torch.Tensor],
                            prefills: list[PrefillSegment]) -> AttentionMetadata:
        dev = self.device
        longest = max((c.shape[0] for c in decode_ctx), default=0)
        slots = torch.zeros(len(decode_ctx), longest, dtype=torch.int64)
        mask = torch.zeros(len(decode_ctx), 1, 1, longest, dtype=torch.bool)
        for r, c in enumerate(decode_ctx):
            slots[r, :c.shape[0]] = c
            mask[r, 0, 0, :c.shape[0]] = True
        return AttentionMetadata(
            slot_mapping=torch.cat(slot_map).to(dev),
            decode_rows=torch.tensor(decode_rows, dtype=torch.int64, device=dev),
            decode_slots=slots.to(dev),
            decode_mask=mask.to(dev),
            prefills=tuple(prefills),
        )
