"""Our ModelConfig as a Hugging Face LlamaConfig, and random-weight HF models of the same shape."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from loraplane.engine.config import ModelConfig

if TYPE_CHECKING:
    from transformers import LlamaConfig, LlamaForCausalLM


def hf_config(cfg: ModelConfig, attn_implementation: str = "eager") -> LlamaConfig:
    """The transformers LlamaConfig of one of our ModelConfigs."""
    from transformers import LlamaConfig

    kw: dict[str, Any] = {}
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        kw["rope_scaling"] = {"rope_type": "llama3", "factor": s.factor,
                              "low_freq_factor": s.low_freq_factor,
                              "high_freq_factor": s.high_freq_factor,
                              "original_max_position_embeddings":
                                  s.original_max_position_embeddings,
                              "rope_theta": cfg.rope_theta}
    kw.update(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings, attn_implementation=attn_implementation)
    return LlamaConfig(**kw)


def random_hf_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, seed: int,
                    attn_implementation: str = "sdpa") -> LlamaForCausalLM:
    """A LlamaForCausalLM with HF's random init, built directly on `device` in `dtype`."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # no float32 copy of a 7B model on the way
    try:
        with torch.device(device):
            model = LlamaForCausalLM(hf_config(cfg, attn_implementation))
    finally:
        torch.set_default_dtype(default)
    return model.eval()
