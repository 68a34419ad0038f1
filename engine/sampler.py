"""Turns each row's logits into a token with that request's temperature, top-k, top-p and seed."""

from __future__ import annotations

import torch

from loraplane.engine.sequence import Sequence


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """logits [N, vocab] float32, one row per sequence -> one token id per sequence."""
    greedy = logits.argmax(dim=-1)
    out = greedy.tolist()
    for i, seq in enumerate(seqs):
        p = seq.params
        if p.greedy:
            continue
        row = logits[i] / p.temperature
        if p.top_k > 0 and p.top_k < row.shape[0]:
            kth = torch.topk(row, p.top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        probs = torch.softmax(row, dim=-1)
        if p.top_p < 1.0:
            sorted_p, idx = torch.sort(probs, descending=True)
            # Keep the smallest prefix whose mass reaches top_p (always at least one token).
            drop = sorted_p.cumsum(0) - sorted_p > p.top_p
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(0, idx, sorted_p)
        if seq.generator is None:
            seq.generator = torch.Generator(device=logits.device)
            if p.seed is not None:
                seq.generator.manual_seed(p.seed)
            else:
                seq.generator.seed()
        out[i] = int(torch.multinomial(probs, 1, generator=seq.generator).item())
    return out
