"""Turns each row's logits into a token with that request's temperature, top-k, top-p and seed.

Every row is sampled in a few batched tensor ops on the logits' device; the step's only
device-to-host transfer is the copy of the sampled token ids. Random rows use the Gumbel-max
trick: token = argmax(logits / T + G) with G = -log(-log(U)), and U a counter-based hash of
(request seed, output index, token id). A request's tokens therefore depend only on its seed and
its own logits, not on the batch it shares or on the device's random state (the stream differs
from torch.multinomial's, which this sampler replaced).
"""

from __future__ import annotations

import random

import torch

from loraplane.engine.sequence import Sequence

_MASK32 = 0xFFFFFFFF
# Odd multipliers below 2**31, so a 32-bit value times one stays inside int64 on every device.
_M1, _M2 = 0x7FEB352D, 0x2C1B3C6D


def _mix32(x: int) -> int:
    """A 32-bit integer hash (xor-shift-multiply rounds) in plain Python, for per-row keys."""
    x &= _MASK32
    x ^= x >> 16
    x = (x * _M1) & _MASK32
    x ^= x >> 15
    x = (x * _M2) & _MASK32
    return x ^ (x >> 16)


def _mix32_t(x: torch.Tensor) -> torch.Tensor:
    """The same hash over an int64 tensor of 32-bit values (no overflow: both factors < 2**32)."""
    x = x ^ (x >> 16)
    x = (x * _M1) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _M2) & _MASK32
    return x ^ (x >> 16)


def row_key(seed: int, index: int) -> int:
    """32-bit key of one sample: the request's seed (any int) and the output token's index."""
    s = seed & ((1 << 64) - 1)
    return _mix32(_mix32(_mix32(s) ^ (s >> 32)) ^ _mix32(index + 0x9E3779B9))


def gumbel_noise(keys: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """keys [N] int64 (32-bit values), token_ids [..., V] int64 -> Gumbel noise [N, V] float32."""
    u = _mix32_t(keys[:, None] ^ token_ids)  # [N, V] in [0, 2**32)
    # 24 bits are exact in float32; +0.5 keeps U strictly inside (0, 1).
    uniform = ((u >> 8).float() + 0.5) * (1.0 / (1 << 24))
    return -torch.log(-torch.log(uniform))


def _ensure_seed(seq: Sequence) -> int:
    """The request's seed, or one drawn once for it when the request gave none."""
    if seq.sample_seed is None:
        seq.sample_seed = seq.params.seed if seq.params.seed is not None \
            else random.getrandbits(64)
    return seq.sample_seed


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """logits [N, vocab] float32, one row per sequence -> one token id per sequence."""
    greedy = logits.argmax(dim=-1)  # [N]
    params = [s.params for s in seqs]
    if all(p.greedy for p in params):
        return greedy.tolist()
    dev, (n, vocab) = logits.device, logits.shape

    def col(values: list[bool] | list[int] | list[float], dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype).to(dev, non_blocking=True)

    # Greedy rows get temperature 1 here; their sampled token is discarded below.
    temps = col([p.temperature or 1.0 for p in params], torch.float32)
    keys = col([row_key(_ensure_seed(s), len(s.output_ids)) for s in seqs], torch.int64)
    z = logits / temps[:, None]  # [N, V]
    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    top_p = [p.top_p for p in params]
    if min(top_k) < vocab or min(top_p) < 1.0:
        # Cut in sorted order; the noise stays keyed by the original token id.
        z, order = torch.sort(z, dim=-1, descending=True)  # [N, V] each
        ranks = torch.arange(vocab, device=dev)
        z = z.masked_fill(ranks[None, :] >= col(top_k, torch.int64)[:, None], float("-inf"))
        if min(top_p) < 1.0:
            probs = torch.softmax(z, dim=-1)
            # Keep the smallest prefix whose mass reaches top_p (always at least one token).
            drop = probs.cumsum(-1) - probs > col(top_p, torch.float32)[:, None]
            z = z.masked_fill(drop, float("-inf"))
        pick = (z + gumbel_noise(keys, order)).argmax(dim=-1, keepdim=True)  # [N, 1]
        sampled = order.gather(1, pick)[:, 0]
    else:
        tokens = torch.arange(vocab, device=dev)
        sampled = (z + gumbel_noise(keys, tokens[None, :])).argmax(dim=-1)
    is_greedy = col([p.greedy for p in params], torch.bool)
    out: list[int] = torch.where(is_greedy, greedy, sampled).tolist()
    assert len(out) == n
    return out
