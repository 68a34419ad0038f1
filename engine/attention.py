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


def _expand_kv(t: torch.Tensor, groups: int) -> torch.Tensor:
    """[..., kv_heads, S, hd] -> [..., kv_heads * groups, S, hd] for grouped-query attention."""
    return t if groups == 1 else t.repeat_interleave(groups, dim=-3)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Store k/v [T, kvh, hd] in the cache [slots, 2, kvh, hd], attend q [T, nh, hd] -> [T, nh, hd]."""
    kv_cache[meta.slot_mapping, 0] = k
    kv_cache[meta.slot_mapping, 1] = v
    groups = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    if meta.decode_rows.numel():
        ctx = kv_cache[meta.decode_slots]  # [D, C, 2, kvh, hd]
        keys = _expand_kv(ctx[:, :, 0].transpose(1, 2), groups)  # [D, nh, C, hd]
        vals = _expand_kv(ctx[:, :, 1].transpose(1, 2), groups)
        qd = q[meta.decode_rows].unsqueeze(2)  # [D, nh, 1, hd]
        o = F.scaled_dot_product_attention(qd, keys, vals, attn_mask=meta.decode_mask,
                                           scale=scale)
        out[meta.decode_rows] = o.squeeze(2)
    for seg in meta.prefills:
        ctx = kv_cache[seg.slots]  # [C, 2, kvh, hd]
        keys = _expand_kv(ctx[:, 0].transpose(0, 1), groups)  # [nh, C, hd]
        vals = _expand_kv(ctx[:, 1].transpose(0, 1), groups)
        qs = q[seg.q_start:seg.q_start + seg.q_len].transpose(0, 1)  # [nh, q_len, hd]
        c = seg.slots.shape[0]
        if c == seg.q_len:
            o = F.scaled_dot_product_attention(qs, keys, vals, is_causal=True, scale=scale)
        else:
            # Query i sits at position c - q_len + i and sees keys 0..that position.
            qpos = torch.arange(c - seg.q_len, c, device=q.device)[:, None]
            mask = torch.arange(c, device=q.device)[None, :] <= qpos
            o = F.scaled_dot_product_attention(qs, keys, vals, attn_mask=mask, scale=scale)
        out[seg.q_start:seg.q_start + seg.q_len] = o.transpose(0, 1)
    return out
