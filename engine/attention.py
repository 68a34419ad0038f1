"""Paged attention over the pool's KV blocks: per-step metadata builders and their backends.

The runner describes each sequence's rows in the step (`SeqSlice`); a backend turns that into
metadata whose `attend` stores the new K/V and attends. Decode rows come first in the batch
(the runner orders them so), prefill chunks after.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SeqSlice:
    """One sequence's rows [row, row + num_new) in the step; keys 0..context_len-1 after it."""

    row: int
    num_new: int
    context_len: int
    block_table: list[int]


def slots_of(s: SeqSlice, block_size: int) -> torch.Tensor:
    """[context_len] flat KV slot (page * block_size + offset) of every position."""
    bt = torch.tensor(s.block_table, dtype=torch.int64)
    return (bt[:, None] * block_size + torch.arange(block_size)).view(-1)[:s.context_len]


@dataclass(frozen=True)
class PrefillSegment:
    """One sequence's prompt chunk: q rows [q_start, q_start+q_len), keys 0..ctx_len-1."""

    q_start: int
    q_len: int
    slots: torch.Tensor  # [ctx_len] flat KV slot of every key position


def _group_queries(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[n, nh, hd] -> [kvh, groups * n, hd]: the queries sharing a KV head become one sequence.

    Grouped-query attention then needs no copy of K and V per query head.
    """
    n, nh, hd = q.shape
    return q.view(n, kv_heads, nh // kv_heads, hd).permute(1, 2, 0, 3).reshape(kv_heads, -1, hd)


def _ungroup(o: torch.Tensor, n: int) -> torch.Tensor:
    """[kvh, groups * n, hd] -> [n, nh, hd]."""
    kvh, gn, hd = o.shape
    return o.view(kvh, gn // n, n, hd).permute(2, 0, 1, 3).reshape(n, -1, hd)


def store_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write the step's k, v [T, kvh, hd] into their slots of the cache [slots, 2, kvh, hd]."""
    kv_cache[slot_mapping, 0] = k
    kv_cache[slot_mapping, 1] = v


@dataclass(frozen=True)
class TorchAttention:
    """Plain-torch paged attention (CPU, and the reference): gathers each row's context."""

    slot_mapping: torch.Tensor  # [T]
    decode_rows: torch.Tensor  # [D] batch rows that decode one token
    decode_slots: torch.Tensor  # [D, C] KV slots of each decode row's context, padded with 0
    decode_mask: torch.Tensor  # [D, 1, 1, C] True where the key is real
    prefills: tuple[PrefillSegment, ...]

    @classmethod
    def build(cls, seqs: list[SeqSlice], block_size: int, device: torch.device) -> TorchAttention:
        slot_map, decode_rows, decode_ctx, prefills = [], [], [], []
        for s in seqs:
            slots = slots_of(s, block_size)
            slot_map.append(slots[s.context_len - s.num_new:])
            if s.num_new == 1:
                decode_rows.append(s.row)
                decode_ctx.append(slots)
            else:
                prefills.append(PrefillSegment(s.row, s.num_new, slots.to(device)))
        longest = max((c.shape[0] for c in decode_ctx), default=0)
        dslots = torch.zeros(len(decode_ctx), longest, dtype=torch.int64)
        mask = torch.zeros(len(decode_ctx), 1, 1, longest, dtype=torch.bool)
        for r, c in enumerate(decode_ctx):
            dslots[r, :c.shape[0]] = c
            mask[r, 0, 0, :c.shape[0]] = True
        return cls(torch.cat(slot_map).to(device),
                   torch.tensor(decode_rows, dtype=torch.int64, device=device),
                   dslots.to(device), mask.to(device), tuple(prefills))

    def attend(self, q: torch.Tensor, kv_cache: torch.Tensor, scale: float) -> torch.Tensor:
        """Attend q [T, nh, hd] to the cache [slots, 2, kvh, hd], which holds the step's own
        keys and values already (the model's Rotary.rotate_store wrote them)."""
        kvh = kv_cache.shape[2]
        groups = q.shape[1] // kvh
        out = torch.empty_like(q)
        if self.decode_rows.numel():
            ctx = kv_cache[self.decode_slots]  # [D, C, 2, kvh, hd]
            keys = ctx[:, :, 0].transpose(1, 2)  # [D, kvh, C, hd]
            vals = ctx[:, :, 1].transpose(1, 2)
            d = self.decode_rows.shape[0]
            qd = q[self.decode_rows].view(d, kvh, groups, -1)  # [D, kvh, groups, hd]
            o = F.scaled_dot_product_attention(qd, keys, vals, attn_mask=self.decode_mask,
                                               scale=scale)
            out[self.decode_rows] = o.reshape(d, kvh * groups, -1)
        for seg in self.prefills:
            ctx = kv_cache[seg.slots]  # [C, 2, kvh, hd]
            keys = ctx[:, 0].transpose(0, 1)  # [kvh, C, hd]
            vals = ctx[:, 1].transpose(0, 1)
            n = seg.q_len
            qs = _group_queries(q[seg.q_start:seg.q_start + n], kvh)  # [kvh, groups * n, hd]
            c = seg.slots.shape[0]
            # Query i sits at position c - n + i and sees keys 0..that position.
            qpos = torch.arange(c - n, c, device=q.device).repeat(groups)[:, None]
            mask = torch.arange(c, device=q.device)[None, :] <= qpos  # [groups * n, C]
            o = F.scaled_dot_product_attention(qs, keys, vals, attn_mask=mask, scale=scale)
            out[seg.q_start:seg.q_start + n] = _ungroup(o, n)
        return out


def _padded_tables(seqs: list[SeqSlice]) -> torch.Tensor:
    """[B, max_blocks] int32 block tables, padded with page 0 (never read past context_len)."""
    width = max((len(s.block_table) for s in seqs), default=0)
    return torch.tensor([s.block_table + [0] * (width - len(s.block_table)) for s in seqs],
                        dtype=torch.int32).view(len(seqs), width)


@dataclass(frozen=True)
class TritonAttention:
    """Triton paged attention straight from block tables (decode rows first, then prefills)."""

    slot_mapping: torch.Tensor  # [T] int64 (int32 in decode graphs)
    num_decode: int
    decode_tables: torch.Tensor  # [D, max_blocks] int32
    decode_lens: torch.Tensor  # [D] int32
    prefill_tables: torch.Tensor  # [P, max_blocks] int32
    cu_seqlens_q: torch.Tensor  # [P + 1] int32, offsets from row num_decode
    prefill_lens: torch.Tensor  # [P] int32
    max_query_len: int
    block_size: int

    @classmethod
    def build(cls, seqs: list[SeqSlice], block_size: int,
              device: torch.device) -> TritonAttention:
        decode = [s for s in seqs if s.num_new == 1]
        prefill = [s for s in seqs if s.num_new > 1]
        assert all(s.row < len(decode) for s in decode), "decode rows must come first"
        # A decode row's one slot in plain ints (a tensor per row costs more than the arithmetic).
        last = [s.context_len - 1 for s in decode]
        slots = torch.cat([torch.tensor([s.block_table[p // block_size] * block_size
                                         + p % block_size for s, p in zip(decode, last,
                                                                          strict=True)],
                                        dtype=torch.int64)]
                          + [slots_of(s, block_size)[s.context_len - s.num_new:] for s in prefill])
        cu = [0]
        for s in prefill:
            cu.append(cu[-1] + s.num_new)

        def dev(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=True)
        return cls(
            slot_mapping=dev(slots),
            num_decode=len(decode),
            decode_tables=dev(_padded_tables(decode)),
            decode_lens=dev(torch.tensor([s.context_len for s in decode], dtype=torch.int32)),
            prefill_tables=dev(_padded_tables(prefill)),
            cu_seqlens_q=dev(torch.tensor(cu, dtype=torch.int32)),
            prefill_lens=dev(torch.tensor([s.context_len for s in prefill], dtype=torch.int32)),
            max_query_len=max((s.num_new for s in prefill), default=0),
            block_size=block_size,
        )

    def attend(self, q: torch.Tensor, kv_cache: torch.Tensor, scale: float) -> torch.Tensor:
        """Attend q [T, nh, hd] with the decode and prefill kernels to the cache, which holds
        the step's own keys and values already (Rotary.rotate_store)."""
        from loraplane.engine.kernels.paged_attention import (
            paged_decode_attention,
            paged_prefill_attention,
        )

        pages = kv_cache.view(-1, self.block_size, *kv_cache.shape[1:])  # [P, bs, 2, kvh, hd]
        d = self.num_decode
        if d == q.shape[0]:
            return paged_decode_attention(q, pages, self.decode_tables, self.decode_lens, scale)
        out = torch.empty_like(q)
        if d:
            out[:d] = paged_decode_attention(q[:d], pages, self.decode_tables, self.decode_lens,
                                             scale)
        out[d:] = paged_prefill_attention(q[d:], pages, self.prefill_tables, self.cu_seqlens_q,
                                          self.prefill_lens, self.max_query_len, scale)
        return out


AttentionMetadata = TorchAttention | TritonAttention
