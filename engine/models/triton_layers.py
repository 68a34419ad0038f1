"""RMSNorm and rotary embedding on single-launch Triton kernels, swapped into a built model.

A decode step of a 7B model at small batch is bound by launches, not bytes: the torch RMSNorm
and rotary modules are 7 and 8 element-wise launches each, about 900 of a step's launches.
"""

from __future__ import annotations

import torch

from loraplane.engine.kernels.rms_norm import rms_norm
from loraplane.engine.kernels.rotary import rotary, rotary_supported
from loraplane.engine.models.llama import LlamaModel, RMSNorm, Rotary


class TritonRMSNorm(RMSNorm):
    """RMSNorm through one kernel launch (same parameters and rounding)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class TritonRotary(Rotary):
    """Rotary embedding through one kernel launch (same tables and rounding)."""

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return rotary(x, positions, self.cos, self.sin)


def use_triton_layers(model: LlamaModel) -> None:
    """Swap the model's RMSNorm and Rotary modules for their Triton versions, in place.

    The subclasses add no state, so changing each module's class keeps its parameters and
    buffers where they are (and any reference to the module valid).
    """
    for module in model.modules():
        if type(module) is RMSNorm:
            module.__class__ = TritonRMSNorm
    if type(model.rotary) is Rotary and rotary_supported(model.config.head_dim):
        model.rotary.__class__ = TritonRotary
