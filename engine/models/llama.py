"""The Llama-family decoder (Llama 2/3, Mistral, SmolLM2) over the paged KV cache.

Projections are plain nn.Linear modules that features (LoRA, tensor parallelism) replace on a
built model; attention derives its head counts from the projections' widths so a sharded model
needs no special case here.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import nn

from loraplane.engine.attention import AttentionMetadata, store_kv
from loraplane.engine.config import ModelConfig, RopeScaling


class KVCacheSource(Protocol):
    def kv_layer(self, layer: int) -> torch.Tensor: ...


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, H] normalized by its root mean square (in float32, as the reference), times weight."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rotate(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
           sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, hd] rotated by each row's position (rotate-half layout); cos/sin [P, hd]."""
    c = cos[positions].unsqueeze(1).to(x.dtype)  # [T, 1, hd]
    s = sin[positions].unsqueeze(1).to(x.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * c + rotated * s


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """[head_dim / 2] inverse frequencies, with Llama-3 scaling of the long wavelengths."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / scaling.factor, inv)
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_tables(head_dim: int, theta: float, scaling: RopeScaling | None,
                max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [max_positions, head_dim] float32 on the CPU (as the reference computes them),
    rotate-half layout."""
    with torch.device("cpu"):
        inv = rope_inv_freq(head_dim, theta, scaling)
        freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)  # [P, head_dim]
        return emb.cos(), emb.sin()


class Rotary(nn.Module):
    """cos/sin tables for every position up to max_positions, applied in rotate-half layout."""

    cos: torch.Tensor  # [max_positions, head_dim]
    sin: torch.Tensor

    def __init__(self, config: ModelConfig, max_positions: int, device: torch.device) -> None:
        super().__init__()
        positions = 1 if device.type == "meta" else max_positions
        cos, sin = rope_tables(config.head_dim, config.rope_theta, config.rope_scaling,
                               positions)
        self.register_buffer("cos", cos.to(device), persistent=False)
        self.register_buffer("sin", sin.to(device), persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [T, heads, hd] rotated by each row's position."""
        return rotate(x, positions, self.cos, self.sin)

    def rotate_qk(self, q: torch.Tensor, k: torch.Tensor,
                  positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A layer's queries [T, nh, hd] and keys [T, kvh, hd], each rotated."""
        return self(q, positions), self(k, positions)

    def rotate_store(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     positions: torch.Tensor, kv_cache: torch.Tensor,
                     slot_mapping: torch.Tensor) -> torch.Tensor:
        """Rotate q [T, nh, hd] and k [T, kvh, hd], write the rotated k and v [T, kvh, hd] into
        their slots of the layer's cache [slots, 2, kvh, hd]; returns the rotated q."""
        q, k = self.rotate_qk(q, k, positions)
        store_kv(k, v, kv_cache, slot_mapping)
        return q


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        h, hd = config.hidden_size, config.head_dim
        self.head_dim = hd
        self.scale = hd ** -0.5
        self.q_proj = nn.Linear(h, config.q_size, bias=False, dtype=dtype, device=device)
        self.k_proj = nn.Linear(h, config.kv_size, bias=False, dtype=dtype, device=device)
        self.v_proj = nn.Linear(h, config.kv_size, bias=False, dtype=dtype, device=device)
        self.o_proj = nn.Linear(config.q_size, h, bias=False, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rotary: Rotary,
                kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        q = self.q_proj(x).view(t, -1, self.head_dim)  # [T, nh, hd]
        k = self.k_proj(x).view(t, -1, self.head_dim)  # [T, kvh, hd]
        v = self.v_proj(x).view(t, -1, self.head_dim)
        q = rotary.rotate_store(q, k, v, positions, kv_cache, meta.slot_mapping)
        o = meta.attend(q, kv_cache, self.scale)
        return self.o_proj(o.reshape(t, -1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=False, dtype=dtype, device=device)
        self.up_proj = nn.Linear(h, i, bias=False, dtype=dtype, device=device)
        self.down_proj = nn.Linear(i, h, bias=False, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.self_attn = Attention(config, dtype, device)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype,
                                                device)
        self.mlp = MLP(config, dtype, device)

    def forward(self, h: torch.Tensor, positions: torch.Tensor, rotary: Rotary,
                kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Pre-norm attention and MLP blocks with residuals; h [T, H]."""
        h = h + self.self_attn(self.input_layernorm(h), positions, rotary, kv_cache, meta)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    """Embeddings, decoder layers, final norm and LM head; parameter names follow HF's."""

    def __init__(self, config: ModelConfig, max_positions: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         dtype=dtype, device=device)
        self.layers = nn.ModuleList(DecoderLayer(config, dtype, device)
                                    for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False,
                                 dtype=dtype, device=device)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = Rotary(config, max_positions, device)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv: KVCacheSource,
                meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions [T] -> final hidden states [T, H]."""
        h = self.embed_tokens(input_ids)
        for i, layer in enumerate(self.layers):
            h = layer(h, positions, self.rotary, kv.kv_layer(i), meta)
        return self.norm(h)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, H] -> [N, vocab] in float32."""
        return self.lm_head(hidden).float()


def hf_state_dict_names(model: LlamaModel) -> dict[str, str]:
    """Our parameter name -> the HF checkpoint name (HF prefixes everything but lm_head)."""
    out = {}
    for name, _ in model.named_parameters(remove_duplicate=False):
        out[name] = name if name.startswith("lm_head") else "model." + name
    return out


def build_model(config: ModelConfig, weights: dict[str, torch.Tensor] | None, max_positions: int,
                dtype: torch.dtype, device: torch.device, seed: int = 0) -> LlamaModel:
    """Create the model on `device` from HF-named weights, or with random weights when None."""
    model = LlamaModel(config, 1, dtype, torch.device("meta"))
    model.to_empty(device=device)
    model.rotary = Rotary(config, max_positions, device)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    names = hf_state_dict_names(model)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for ours, param in model.named_parameters():
            if weights is None:
                if ours.endswith("norm.weight"):
                    param.fill_(1.0)
                else:
                    # Random weights for benchmarks; scaled so activations stay finite.
                    param.normal_(0.0, 0.02, generator=gen)
                continue
            theirs = names[ours]
            if theirs not in weights and ours == "lm_head.weight":
                theirs = "model.embed_tokens.weight"
            t = weights.get(theirs)
            if t is None:
                raise ValueError(f"checkpoint has no tensor {theirs}")
            if tuple(t.shape) != tuple(param.shape):
                raise ValueError(f"tensor {theirs} has shape {tuple(t.shape)}, expected "
                                 f"{tuple(param.shape)}")
            param.copy_(t.to(dtype))
    model.eval()
    return model
