"""Paged attention over the pool's KV blocks: per-step metadata and the plain-torch backend."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PrefillSegment:
    """One sequence's prompt chunk: q rows [q_start, q_start+q_len), keys 0..ctx_len-1."""

    q_start: int
    q_len: int
    slots: torch.Tensor  # [ctx_len] flat KV slot of every key position


@dataclass(frozen=True)
class AttentionMetadata:
    """Built once per step, shared by every layer."""

    slot_mapping: torch.Tensor  # [T] flat KV slot (page * block_size + offset) of each new token
    decode_rows: torch.Tensor  # [D] batch rows that decode one token
    decode_slots: torch.Tensor  # [D, C] KV slots of each decode row's context, padded with 0
    decode_mask: torch.Tensor  # [D, 1, 1, C] True where the key is real
    prefills: tuple[PrefillSegment, ...]


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


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Store k/v [T, kvh, hd] in the cache [slots, 2, kvh, hd]; attend q [T, nh, hd] to it."""
    kv_cache[meta.slot_mapping, 0] = k
    kv_cache[meta.slot_mapping, 1] = v
    kvh = k.shape[1]
    groups = q.shape[1] // kvh
    out = torch.empty_like(q)
    if meta.decode_rows.numel():
        ctx = kv_cache[meta.decode_slots]  # [D, C, 2, kvh, hd]
        keys = ctx[:, :, 0].transpose(1, 2)  # [D, kvh, C, hd]
        vals = ctx[:, :, 1].transpose(1, 2)
        d = meta.decode_rows.shape[0]
        qd = q[meta.decode_rows].view(d, kvh, groups, -1)  # [D, kvh, groups, hd]
        o = F.scaled_dot_product_attention(qd, keys, vals, attn_mask=meta.decode_mask,
                                           scale=scale)
        out[meta.decode_rows] = o.reshape(d, kvh * groups, -1)
    for seg in meta.prefills:
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
