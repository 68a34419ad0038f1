"""Fewer launches per decoder layer, swapped into a built model: one GEMM for q,k,v and one for
gate,up, SiLU(gate)*up, each residual add folded into the RMSNorm after it, and the q,k rotary,
each in one launch.

At batch 1 a 7B decode step is one launch after another: about 19 per layer unfused, 10 here
(norm+add, qkv GEMM, rotary, attention, o GEMM, norm+add, gate,up GEMM, SiLU*up, down GEMM).
Applied after tensor-parallel sharding it fuses each rank's shards; applied before `apply_lora`
so LoRA wraps each member projection and adds its delta to the member's column block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import nn
from torch.nn import functional as F

from loraplane.engine.attention import AttentionMetadata
from loraplane.engine.config import FUSED_GROUPS
from loraplane.engine.kernels.rms_norm import add_rms_norm
from loraplane.engine.kernels.rotary import rotary_qk, rotary_qk_store, rotary_supported
from loraplane.engine.kernels.silu_mul import silu_mul
from loraplane.engine.models.llama import (
    MLP,
    DecoderLayer,
    KVCacheSource,
    LlamaModel,
    RMSNorm,
    Rotary,
)
from loraplane.engine.models.triton_layers import TritonRotary


@dataclass
class _Product:
    """x · W^T [T, sum of widths] until every member has taken its column block."""

    x: torch.Tensor
    y: torch.Tensor
    pending: set[int]


class FusedLinear(nn.Module):
    """Bias-free projections of one input as one GEMM; weight [sum of widths, in] stacks theirs.

    The weight is a non-persistent buffer: the members' `weight` parameters are views of its row
    blocks, so checkpoints and parameter counts see each projection once.
    """

    weight: torch.Tensor

    def __init__(self, weight: torch.Tensor, widths: list[int]) -> None:
        super().__init__()
        self.register_buffer("weight", weight, persistent=False)
        self.bounds = [sum(widths[:j]) for j in range(len(widths) + 1)]
        self._last: _Product | None = None

    def block(self, x: torch.Tensor, j: int) -> torch.Tensor:
        """Member j's output [T, width_j]: a column block (row stride = total width) of x · W^T,
        computed once for all members reading the same x."""
        last = self._last
        # The model passes one tensor object to every member (as TritonLoraOp's shrink relies
        # on); the product is kept only until each member has taken its block, so a member's
        # LoRA term (added in place to its block) is never handed out twice.
        if last is None or last.x is not x or j not in last.pending:
            last = _Product(x, F.linear(x, self.weight), set(range(len(self.bounds) - 1)))
        last.pending.discard(j)
        self._last = last if last.pending else None
        return last.y[:, self.bounds[j]:self.bounds[j + 1]]


class FusedMember(nn.Module):
    """One projection of a FusedLinear: weight a view of its rows, output its column block."""

    def __init__(self, fused: FusedLinear, index: int) -> None:
        super().__init__()
        self.fused = fused
        self.index = index
        lo, hi = fused.bounds[index], fused.bounds[index + 1]
        self.weight = nn.Parameter(fused.weight[lo:hi], requires_grad=False)  # [width, in]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused.block(x, self.index)


def fuse_linears(parent: nn.Module, names: tuple[str, ...]) -> None:
    """Replace parent's plain Linear projections `names` (same input) with FusedMembers."""
    mods = [getattr(parent, n) for n in names]
    for n, m in zip(names, mods, strict=True):
        if type(m) is not nn.Linear or m.bias is not None:
            raise ValueError(f"{n} is a {type(m).__name__}, not a bias-free Linear: fuse the "
                             "projections before LoRA or other wrappers are applied")
    if len({m.in_features for m in mods}) != 1:
        raise ValueError(f"{names} do not read inputs of one width")
    with torch.no_grad():
        weight = torch.cat([m.weight.detach() for m in mods])  # [sum of widths, in]
    fused = FusedLinear(weight, [m.out_features for m in mods])
    for j, n in enumerate(names):
        setattr(parent, n, FusedMember(fused, j))  # the old weights are freed here


class FusedMLP(MLP):
    """SwiGLU with SiLU(gate) * up in one launch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


class FusedRotary(TritonRotary):
    """Rotary embedding with a layer's queries and keys rotated in one launch, and with the
    keys and values stored into the KV cache by that same launch."""

    def rotate_qk(self, q: torch.Tensor, k: torch.Tensor,
                  positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return rotary_qk(q, k, positions, self.cos, self.sin)

    def rotate_store(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     positions: torch.Tensor, kv_cache: torch.Tensor,
                     slot_mapping: torch.Tensor) -> torch.Tensor:
        return rotary_qk_store(q, k, v, positions, self.cos, self.sin, kv_cache, slot_mapping)


def _add_norm(h: torch.Tensor, delta: torch.Tensor,
              norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(h + delta, norm(h + delta)) in one launch."""
    assert isinstance(norm, RMSNorm)
    return add_rms_norm(h, delta, norm.weight, norm.eps)


class FusedLlamaModel(LlamaModel):
    """The decoder with each residual add done by the RMSNorm launch that follows it (the next
    layer's input norm, or the final norm); the same sums and roundings as LlamaModel."""

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv: KVCacheSource,
                meta: AttentionMetadata) -> torch.Tensor:
        layers = [cast(DecoderLayer, layer) for layer in self.layers]
        h = self.embed_tokens(input_ids)  # [T, H], the residual stream
        x = layers[0].input_layernorm(h)  # [T, H], the normalized input of the next block
        for i, layer in enumerate(layers):
            attn = layer.self_attn(x, positions, self.rotary, kv.kv_layer(i), meta)
            h, x = _add_norm(h, attn, layer.post_attention_layernorm)
            after = layers[i + 1].input_layernorm if i + 1 < len(layers) else self.norm
            h, x = _add_norm(h, layer.mlp(x), after)
        return x


def use_fused_layers(model: LlamaModel) -> None:
    """Fuse a built (and possibly sharded) model's layers in place, before `apply_lora`."""
    for layer in model.layers:
        for parent in (layer.self_attn, layer.mlp):
            assert isinstance(parent, nn.Module)
            for group in FUSED_GROUPS:
                if all(hasattr(parent, n) for n in group):
                    fuse_linears(parent, group)
        if type(layer.mlp) is MLP:
            layer.mlp.__class__ = FusedMLP
    if type(model.rotary) in (Rotary, TritonRotary) and rotary_supported(model.config.head_dim):
        model.rotary.__class__ = FusedRotary
    if type(model) is LlamaModel and len(model.layers):
        model.__class__ = FusedLlamaModel
