"""Read a llama.cpp GGUF file: config, tokenizer, and dequantized weights under HF names."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf.quants import dequantize
from tqdm import tqdm

from ..config import ModelConfig, RopeScaling
from ..tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# GGUF tensor names -> Hugging Face Llama names ("blk.N.<key>" -> "model.layers.N.<value>").
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                 "output": "lm_head"}
# Llama 3.1 files carry their RoPE scaling as this tensor of per-frequency divisors.
_ROPE_FREQS = "rope_freqs.weight"
_MISSING = object()


def hf_name(gguf_name: str) -> str:
    """HF Llama name of a GGUF tensor, e.g. blk.3.attn_q.weight -> ...layers.3.self_attn.q_proj."""
    base, _, suffix = gguf_name.rpartition(".")
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{suffix}"
    if base in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[base]}.{suffix}"
    raise ValueError(f"unexpected GGUF tensor {gguf_name!r} for a Llama model")


def unpermute_rotary(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation, back to Hugging Face's rotate-half layout."""
    # weight: [num_heads * head_dim, in_features]. Within each head llama.cpp interleaves the
    # rotary pairs (row 2j + s holds HF row s * head_dim/2 + j), for its GPT-J style rope.
    rows, cols = weight.shape
    return (weight.reshape(num_heads, rows // num_heads // 2, 2, cols)
            .transpose(1, 2).reshape(rows, cols))


def llama3_rope_factors(scaling: RopeScaling, head_dim: int, theta: float) -> torch.Tensor:
    """Per-frequency divisors llama.cpp stores for Llama 3 RoPE scaling; [head_dim // 2]."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(scaling.factor)
        else:
            smooth = ((scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor)
                      / (scaling.high_freq_factor - scaling.low_freq_factor))
            factors.append(1 / ((1 - smooth) / scaling.factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def rope_scaling_from_factors(factors: torch.Tensor, head_dim: int, theta: float) -> RopeScaling:
    """Recover Llama 3's RoPE scaling from llama.cpp's rope_freqs tensor; [head_dim // 2]."""
    # The file keeps only the factors; Llama 3.1/3.2 all use these three parameters.
    scaling = RopeScaling(factor=float(factors.max()), low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=8192)
    expected = llama3_rope_factors(scaling, head_dim, theta)
    if factors.shape != expected.shape or not torch.allclose(factors, expected, rtol=1e-4):
        raise ValueError("GGUF rope_freqs tensor is not a standard Llama 3 RoPE scaling")
    return scaling


def read_gguf(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer]:
    """Config, float32 weights in Hugging Face layout, and tokenizer of a GGUF file."""
    start = time.perf_counter()
    logger.info("reading %s", path)
    reader = gguf.GGUFReader(path)
    raw: dict[str, torch.Tensor] = {}
    for tensor in tqdm(reader.tensors, desc=f"dequantizing {path.name}", unit="tensor",
                       disable=None):
        array = dequantize(tensor.data, tensor.tensor_type)
        if not array.flags.writeable:
            # F32 tensors come back as read-only views of the memory-mapped file.
            array = array.copy()
        raw[tensor.name] = torch.from_numpy(array.astype(np.float32, copy=False))
    config = gguf_config(reader, path.stem, raw)
    weights: dict[str, torch.Tensor] = {}
    for name, tensor in raw.items():
        if name == _ROPE_FREQS:
            continue
        key = hf_name(name)
        if key.endswith("q_proj.weight"):
            tensor = unpermute_rotary(tensor, config.num_heads)
        elif key.endswith("k_proj.weight"):
            tensor = unpermute_rotary(tensor, config.num_kv_heads)
        weights[key] = tensor
    tokenizer = Tokenizer.from_gguf(reader)
    logger.info("loaded %s: %d tensors in %.1fs", path, len(reader.tensors),
                time.perf_counter() - start)
    return config, weights, tokenizer


def gguf_config(reader: gguf.GGUFReader, name: str, tensors: dict[str, torch.Tensor]
                ) -> ModelConfig:
    """ModelConfig from GGUF metadata; `tensors` are the file's dequantized tensors."""

    def field(key: str, default: Any = _MISSING) -> Any:
        f = reader.get_field(key)
        if f is not None:
            return f.contents()
        if default is _MISSING:
            raise ValueError(f"GGUF file lacks metadata key {key!r}")
        return default

    arch = field("general.architecture")
    if arch != "llama":
        raise ValueError(f"unsupported GGUF architecture {arch!r}; only 'llama' is supported")
    if field("llama.expert_count", 0):
        raise ValueError("mixture-of-experts GGUF models are not supported")
    hidden = int(field("llama.embedding_length"))
    heads = int(field("llama.attention.head_count"))
    head_dim = int(field("llama.attention.key_length", hidden // heads))
    if int(field("llama.rope.dimension_count", head_dim)) != head_dim:
        raise ValueError("partial rotary embeddings (rope.dimension_count != head_dim) unsupported")
    theta = float(field("llama.rope.freq_base", 10000.0))
    scaling_type = field("llama.rope.scaling.type", "none")
    if scaling_type != "none":
        raise ValueError(f"unsupported GGUF RoPE scaling type {scaling_type!r}")
    rope_scaling = None
    if _ROPE_FREQS in tensors:
        rope_scaling = rope_scaling_from_factors(tensors[_ROPE_FREQS], head_dim, theta)
    eos = [field(k, None) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                    "tokenizer.ggml.eom_token_id")]
    bos = field("tokenizer.ggml.bos_token_id", None)
    return ModelConfig(
        name=name,
        # token_embd.weight: [vocab_size, hidden_size]; the metadata key is optional.
        vocab_size=int(tensors["token_embd.weight"].shape[0]),
        hidden_size=hidden,
        intermediate_size=int(field("llama.feed_forward_length")),
        num_layers=int(field("llama.block_count")),
        num_heads=heads,
        num_kv_heads=int(field("llama.attention.head_count_kv", heads)),
        head_dim=head_dim,
        rms_norm_eps=float(field("llama.attention.layer_norm_rms_epsilon")),
        rope_theta=theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=int(field("llama.context_length")),
        tie_word_embeddings="output.weight" not in tensors,
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=tuple(dict.fromkeys(int(e) for e in eos if e is not None)),
    )
