"""The PEFT LoRA folder format without torch: config checks and the tensor layout a model needs.

Shared by the engine (`adapters.read_adapter`) and the operator, which checks an adapter from its
config file and safetensors header alone, before any node downloads the weights.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Collection

from loraplane.engine.config import LORA_MODULES, ModelConfig
from loraplane.engine.errors import InvalidAdapterError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
MAX_CONFIG_BYTES = 1 << 20
MAX_HEADER_BYTES = 16 << 20
# safetensors header dtype names the engine accepts, and how a person knows them.
SAFETENSORS_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}

# base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight
_KEY = re.compile(r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(?:self_attn|mlp)\."
                  r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\."
                  r"lora_([AB])(?:\.[^.]+)?\.weight$")
MODULE_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
                 "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}

# (module, "A"|"B") -> layer -> (dtype name, shape)
TensorIndex = dict[tuple[str, str], dict[int, tuple[str, tuple[int, ...]]]]


def fail(name: str, reason: str) -> InvalidAdapterError:
    """The error every refusal raises: `adapter 'name': reason`."""
    return InvalidAdapterError(f"adapter {name!r}: {reason}")


def parse_config(data: bytes, name: str) -> dict:
    """adapter_config.json's bytes -> its JSON object; refuses oversized or malformed files."""
    if len(data) > MAX_CONFIG_BYTES:
        raise fail(name, f"{CONFIG_FILE} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        cfg = json.loads(data.decode())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise fail(name, f"{CONFIG_FILE} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise fail(name, f"{CONFIG_FILE} must hold a JSON object")
    return cfg


def check_config(cfg: dict, name: str, max_rank: int) -> tuple[int, float, bool]:
    """(rank, alpha, use_rslora) of a PEFT config the engine supports; raise otherwise."""
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise fail(name, f"peft_type {peft_type} is not supported (only LORA)")
    r = cfg.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= max_rank:
        raise fail(name, f"rank r={r!r} must be an integer in [1, {max_rank}]")
    alpha = cfg.get("lora_alpha", r)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise fail(name, f"lora_alpha={alpha!r} must be a finite number")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise fail(name, f"{key} (per-module ranks) is not supported")
    for key in ("use_dora", "fan_in_fan_out"):
        if cfg.get(key):
            raise fail(name, f"{key}=true is not supported")
    if cfg.get("bias", "none") not in ("none", None):
        raise fail(name, "LoRA bias terms are not supported (bias must be 'none')")
    if cfg.get("modules_to_save"):
        raise fail(name, "modules_to_save (fully trained extra modules) is not supported")
    if cfg.get("layers_to_transform") is not None:
        raise fail(name, "layers_to_transform is not supported; LoRA must cover every layer")
    rslora = cfg.get("use_rslora", False)
    if not isinstance(rslora, bool):
        raise fail(name, f"use_rslora={rslora!r} must be true or false")
    return r, float(alpha), rslora


def parse_key(key: str, name: str, config: ModelConfig) -> tuple[int, str, str]:
    """A tensor name -> (layer, module, "A"|"B"); refuses other tensors and layers out of range."""
    m = _KEY.match(key)
    if m is None:
        raise fail(name, f"unexpected tensor {key!r}: only lora_A/lora_B of "
                         f"{', '.join(LORA_MODULES)} are supported")
    layer, module, ab = int(m.group(1)), m.group(2), m.group(3)
    if layer >= config.num_layers:
        raise fail(name, f"tensor {key!r} names layer {layer}, the base model has "
                         f"{config.num_layers}")
    return layer, module, ab


def check_layout(found: TensorIndex, rank: int, config: ModelConfig, name: str,
                 allowed_dtypes: Collection[str]) -> tuple[str, ...]:
    """The adapter's modules, once every layer has A [r, in] and B [out, r] of an allowed dtype."""
    modules = tuple(m for m in LORA_MODULES if (m, "A") in found or (m, "B") in found)
    if not modules:
        raise fail(name, "no LoRA weights found")
    for m in modules:
        fan_in, fan_out = config.module_shape(m)
        for ab, want in (("A", (rank, fan_in)), ("B", (fan_out, rank))):
            per_layer = found.get((m, ab), {})
            missing = sorted(set(range(config.num_layers)) - set(per_layer))
            if missing:
                raise fail(name, f"{m}.lora_{ab} missing for layers {missing[:8]}")
            for layer, (dtype, shape) in sorted(per_layer.items()):
                where = f"layers.{layer}.{MODULE_PARENT[m]}.{m}.lora_{ab}"
                if dtype not in allowed_dtypes:
                    raise fail(name, f"{where} has dtype {dtype}; use float16, bfloat16 or "
                                     f"float32")
                if tuple(shape) != want:
                    raise fail(name, f"{where} has shape {tuple(shape)}, expected {want} for "
                                     f"rank {rank} on this base model")
    return modules


def index_safetensors_header(header: dict, name: str, config: ModelConfig) -> TensorIndex:
    """A parsed safetensors header ({key: {dtype, shape, data_offsets}}) -> TensorIndex."""
    found: TensorIndex = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(meta, dict) or not isinstance(meta.get("shape"), list):
            raise fail(name, f"cannot read {WEIGHTS_FILE}: bad header entry for {key!r}")
        layer, module, ab = parse_key(key, name, config)
        found.setdefault((module, ab), {})[layer] = (str(meta.get("dtype")),
                                                     tuple(int(d) for d in meta["shape"]))
    return found


def header_length(prefix: bytes, file_size: int, name: str) -> int:
    """The safetensors header length from the file's first 8 bytes, bounded and sane."""
    if len(prefix) < 8:
        raise fail(name, f"cannot read {WEIGHTS_FILE}: file shorter than 8 bytes")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n < 2 or n > MAX_HEADER_BYTES or 8 + n > file_size:
        raise fail(name, f"cannot read {WEIGHTS_FILE}: header length {n} is invalid")
    return n


def load_header_json(header_bytes: bytes, name: str) -> dict:
    """The safetensors header JSON's bytes -> its object (entries not yet checked)."""
    try:
        header = json.loads(header_bytes.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise fail(name, f"cannot read {WEIGHTS_FILE}: header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise fail(name, f"cannot read {WEIGHTS_FILE}: header is not a JSON object")
    return header


def parse_header(header_bytes: bytes, name: str, config: ModelConfig) -> TensorIndex:
    """The safetensors header JSON's bytes -> TensorIndex; refuses malformed headers."""
    return index_safetensors_header(load_header_json(header_bytes, name), name, config)


def scale_of(rank: int, alpha: float, rslora: bool) -> float:
    """The factor PEFT multiplies B A by: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank
