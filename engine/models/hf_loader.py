"""Read and write Hugging Face Llama checkpoint folders (config.json + safetensors, no pickle)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..config import ModelConfig, RopeScaling
from ..tokenizer import Tokenizer

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
# Pickle-based checkpoint files we refuse to open: loading them can run arbitrary code.
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _read_json(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _id_list(value: Any) -> list[int]:
    """An `eos_token_id` field: null, an int or a list of ints."""
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _rope(d: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """(rope_theta, rope_scaling) from the transformers 4 or transformers 5 config keys."""
    params = d.get("rope_parameters") or {}
    theta = float(d.get("rope_theta", params.get("rope_theta", 10000.0)))
    scaling = d.get("rope_scaling") or params
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise ValueError(f"unsupported rope_scaling type {kind!r}; only 'llama3' is supported")
    return theta, RopeScaling(
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
    )


def config_from_hf(d: dict[str, Any], name: str, extra_eos_ids: list[int] | None = None
                   ) -> ModelConfig:
    """ModelConfig from a transformers config.json dict; refuses what our model cannot run."""
    archs = d.get("architectures") or []
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise ValueError(f"unsupported architectures {archs}; supported: {SUPPORTED_ARCHITECTURES}")
    if d.get("sliding_window") is not None:
        raise ValueError("sliding-window attention (config sliding_window) is not supported")
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported hidden_act {d['hidden_act']!r}; only 'silu'")
    if d.get("attention_bias") or d.get("mlp_bias"):
        raise ValueError("projection biases (attention_bias / mlp_bias) are not supported")
    if d.get("quantization_config"):
        raise ValueError("quantized checkpoints (quantization_config) are not supported")
    theta, scaling = _rope(d)
    heads = int(d["num_attention_heads"])
    hidden = int(d["hidden_size"])
    bos = d.get("bos_token_id")
    eos = _id_list(d.get("eos_token_id")) + (extra_eos_ids or [])
    return ModelConfig(
        name=name,
        vocab_size=int(d["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(d["intermediate_size"]),
        num_layers=int(d["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(d.get("num_key_value_heads") or heads),
        head_dim=int(d.get("head_dim") or hidden // heads),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=tuple(dict.fromkeys(eos)),
    )


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """A transformers LlamaConfig dict equal to `config`."""
    rope_scaling = None
    if config.rope_scaling is not None:
        s = config.rope_scaling
        rope_scaling = {"rope_type": "llama3", "factor": s.factor,
                        "low_freq_factor": s.low_freq_factor,
                        "high_freq_factor": s.high_freq_factor,
                        "original_max_position_embeddings": s.original_max_position_embeddings}
    ids = list(config.eos_token_ids)
    eos: int | list[int] | None = ids[0] if len(ids) == 1 else ids or None
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": rope_scaling,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": eos,
        "torch_dtype": "float32",
    }


def _shard_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = _read_json(index)["weight_map"]
        return [folder / f for f in sorted(set(weight_map.values()))]
    shards = sorted(folder.glob("*.safetensors"))
    if shards:
        return shards
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(
            f"{folder}: only pickle weights ({', '.join(pickles)}); they are refused because "
            "unpickling can run code. Convert the checkpoint to safetensors."
        )
    raise ValueError(f"{folder}: no *.safetensors weights")


def read_hf_folder(folder: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer]:
    """Config, float32 weights and tokenizer of a local Hugging Face Llama checkpoint."""
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder}: no config.json; not a Hugging Face checkpoint folder")
    gen_path = folder / "generation_config.json"
    gen_eos = _id_list(_read_json(gen_path).get("eos_token_id")) if gen_path.is_file() else []
    config = config_from_hf(_read_json(folder / "config.json"), folder.name, gen_eos)
    weights: dict[str, torch.Tensor] = {}
    for shard in _shard_files(folder):
        if not shard.is_file():
            raise ValueError(f"{folder}: shard {shard.name} named by the index is missing")
        for name, tensor in load_file(shard).items():
            # Old checkpoints saved the rotary buffer; tied ones may also save lm_head.
            if name.endswith("rotary_emb.inv_freq"):
                continue
            if name == "lm_head.weight" and config.tie_word_embeddings:
                continue
            weights[name] = tensor.to(torch.float32)
    return config, weights, Tokenizer.from_hf_folder(folder)


def write_hf_folder(folder: Path, config: ModelConfig, weights: dict[str, torch.Tensor],
                    tokenizer: Tokenizer) -> None:
    """Write config.json, model.safetensors, generation_config.json and the tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config_to_hf(config), indent=2) + "\n")
    generation = {"bos_token_id": config.bos_token_id,
                  "eos_token_id": list(config.eos_token_ids) or None}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in weights.items()}
    # transformers requires the "format" metadata.
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_hf(folder)
