"""Megatron-style sharding of a built model and S-LoRA's partition of LoRA weights.

Column-parallel projections (q, k, v, gate, up) keep a slice of their output features, so
attention heads and MLP channels split across ranks with no communication; row-parallel ones
(o, down) keep a slice of their input features and all-reduce their partial outputs.

LoRA follows the same cut. For a column-parallel module, A is split on the rank dimension
*strided* (rank p holds rows j*N + p of A zero-padded to r_pad, a multiple of N) and B^T by output
columns; for a row-parallel module A is split by input columns and B^T by output columns, the
term being added to the rank's column slice of the partial output before the base all-reduce.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from loraplane.engine.adapters import LoraWeights
from loraplane.engine.config import ModelConfig
from loraplane.engine.lora.layers import LoraLinear
from loraplane.engine.memory_pool import PoolLayout

COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW_PARALLEL = ("o_proj", "down_proj")


def check_shardable(config: ModelConfig, world: int) -> None:
    """Raise ValueError unless every split the model needs divides by `world`."""
    if world < 1:
        raise ValueError(f"the tensor parallel size must be positive, not {world}")
    parts = {"attention heads": config.num_heads, "KV heads": config.num_kv_heads,
             "intermediate size": config.intermediate_size, "hidden size": config.hidden_size}
    for what, n in parts.items():
        if n % world:
            raise ValueError(f"tensor parallel size {world} does not divide the model's {what} "
                             f"({n}); choose a size that divides {config.num_kv_heads} KV heads")


def padded_rank(rank: int, world: int) -> int:
    """The LoRA rank rounded up to a multiple of the tensor parallel size."""
    return -(-rank // world) * world


def local_layout(config: ModelConfig, block_size: int, world: int) -> PoolLayout:
    """One rank's pool layout: a page holds the rank's KV heads; chunks divide every shard."""
    h, q, kv, i = (config.hidden_size, config.q_size, config.kv_size, config.intermediate_size)
    chunk = math.gcd(config.chunk_size, h // world, q // world, kv // world, i // world)
    return PoolLayout(config.num_layers, block_size, config.num_kv_heads // world,
                      config.head_dim, chunk)


def local_config(config: ModelConfig, world: int) -> ModelConfig:
    """The shape of one rank's shard: heads and MLP channels divided (embeddings kept whole)."""
    return config.with_updates(num_heads=config.num_heads // world,
                               num_kv_heads=config.num_kv_heads // world,
                               intermediate_size=config.intermediate_size // world)


def slice_linear(linear: nn.Module, dim: int, rank: int, world: int) -> nn.Linear:
    """A new bias-free Linear holding rank's slice of `linear.weight` [out, in] along dim."""
    w = linear.weight
    assert isinstance(w, torch.Tensor)
    n = w.shape[dim] // world
    piece = w.detach().narrow(dim, rank * n, n).clone()
    out = nn.Linear(piece.shape[1], piece.shape[0], bias=False, device="meta")
    out.weight = nn.Parameter(piece, requires_grad=False)
    return out


class RowParallelLinear(nn.Module):
    """A row-parallel projection: the local partial product, summed over ranks."""

    def __init__(self, local: nn.Module, group: dist.ProcessGroup | None) -> None:
        super().__init__()
        self.local = local  # [in / N] -> [out] partial; LoRA wraps this, inside the reduce
        self.group = group

    @property
    def weight(self) -> torch.Tensor:
        w = self.local.weight
        assert isinstance(w, torch.Tensor)
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.local(x)  # [T, out], this rank's share of the sum
        dist.all_reduce(y, group=self.group)
        return y


def _projections(model: nn.Module) -> list[tuple[nn.Module, str]]:
    layers = model.layers
    assert isinstance(layers, nn.ModuleList)
    out: list[tuple[nn.Module, str]] = []
    for layer in layers:
        for parent in (layer.self_attn, layer.mlp):
            assert isinstance(parent, nn.Module)
            out += [(parent, n) for n in (*COLUMN_PARALLEL, *ROW_PARALLEL) if hasattr(parent, n)]
    return out


def shard_model(model: nn.Module, rank: int, world: int,
                group: dist.ProcessGroup | None) -> None:
    """Replace a built model's projections with this rank's column/row-parallel shards.

    Embeddings, norms and the LM head stay replicated (only rank 0 computes logits).
    """
    for parent, name in _projections(model):
        if name in COLUMN_PARALLEL:
            setattr(parent, name, slice_linear(getattr(parent, name), 0, rank, world))
        else:
            local = slice_linear(getattr(parent, name), 1, rank, world)
            setattr(parent, name, RowParallelLinear(local, group))


def reduce_rows(model: nn.Module, group: dist.ProcessGroup | None) -> None:
    """Wrap the row-parallel projections of a model built at shard shapes in all-reduces."""
    for parent, name in _projections(model):
        if name in ROW_PARALLEL:
            setattr(parent, name, RowParallelLinear(getattr(parent, name), group))


def lora_inside_reduce(model: nn.Module) -> None:
    """After apply_lora: move each row-parallel LoRA wrapper inside its all-reduce, so the
    adapter's term joins the base model's reduction instead of being added after it."""
    for parent, name in _projections(model):
        outer = getattr(parent, name)
        if isinstance(outer, LoraLinear) and isinstance(outer.base, RowParallelLinear):
            row = outer.base
            outer.base = row.local
            row.local = outer
            setattr(parent, name, row)


def shard_lora_weights(weights: LoraWeights, rank: int, world: int) -> LoraWeights:
    """This rank's share of an adapter, laid out so the unchanged kernels apply it.

    Column-parallel module: A [L, r_pad/N, in] (rows p, p+N, ...), B^T [L, r_pad, out/N].
    Row-parallel module: A [L, r_pad, in/N], B^T [L, r_pad, out/N] (the rank's output columns).
    The rank stays the adapter's own; kernels read r_pad and r_pad/N from the metadata.
    """
    r = weights.rank
    rp = padded_rank(r, world)
    out = LoraWeights(rank=r, alpha=weights.alpha, scale=weights.scale, modules=weights.modules)
    for m in weights.modules:
        a, bt = weights.a[m], weights.bt[m]  # [L, r, in], [L, r, out]
        a_pad = a.new_zeros(a.shape[0], rp, a.shape[2])
        a_pad[:, :r] = a
        bt_pad = bt.new_zeros(bt.shape[0], rp, bt.shape[2])
        bt_pad[:, :r] = bt
        n_out = bt.shape[2] // world
        out.bt[m] = bt_pad[:, :, rank * n_out:(rank + 1) * n_out].contiguous()
        if m in ROW_PARALLEL:
            n_in = a.shape[2] // world
            out.a[m] = a_pad[:, :, rank * n_in:(rank + 1) * n_in].contiguous()
        else:
            out.a[m] = a_pad[:, rank::world].contiguous()
    return out
