"""Wraps a built model's projections so each also adds its rows' adapters' LoRA terms."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from loraplane.engine.config import LORA_MODULES
from loraplane.engine.lora.ops import LoraBatch, LoraOp


@dataclass
class LoraState:
    """Shared by every wrapped projection: the op and the current step's batch metadata."""

    op: LoraOp
    batch: LoraBatch = field(default_factory=lambda: LoraBatch([]))


class LoraLinear(nn.Module):
    """base(x) plus the LoRA term of each segment's adapter; rows without adapter pay nothing."""

    def __init__(self, base: nn.Module, layer: int, module: str, state: LoraState) -> None:
        super().__init__()
        self.base = base
        self.layer = layer
        self.module = module
        self.state = state

    @property
    def weight(self) -> torch.Tensor:
        w = self.base.weight
        assert isinstance(w, torch.Tensor)
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = self.state.batch
        if not (batch.segments and self.module in batch.modules):
            return self.base(x)
        op = self.state.op
        op.before(x, self.layer, self.module, batch)  # what may overlap the base GEMM
        y = self.base(x)
        op.apply(x, y, self.layer, self.module, batch)
        return y


def apply_lora(model: nn.Module, op: LoraOp) -> LoraState:
    """Replace every q/k/v/o/gate/up/down projection of `model.layers` with a LoraLinear."""
    state = LoraState(op)
    layers = model.layers
    assert isinstance(layers, nn.ModuleList)
    for i, layer in enumerate(layers):
        for parent in (layer.self_attn, layer.mlp):
            for name in LORA_MODULES:
                base = getattr(parent, name, None)
                if base is not None:
                    setattr(parent, name, LoraLinear(base, i, name, state))
    return state
