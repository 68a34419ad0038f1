"""Hugging Face PEFT LoRA folders: parse, validate against the base model, lay out for the pool."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from loraplane.engine.config import LORA_MODULES, ModelConfig
from loraplane.engine.errors import InvalidAdapterError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
ALLOWED_DTYPES = {torch.float16, torch.bfloat16, torch.float32}
MAX_CONFIG_BYTES = 1 << 20

# base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight
_KEY = re.compile(r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(?:self_attn|mlp)\."
                  r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\."
                  r"lora_([AB])(?:\.[^.]+)?\.weight$")
_MODULE_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
                  "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


@dataclass
class LoraWeights:
    """One adapter's weights on the host: per module, A [L, r, in] and B^T [L, r, out] * scale."""

    rank: int
    alpha: float
    scale: float
    modules: tuple[str, ...]
    a: dict[str, torch.Tensor] = field(default_factory=dict)
    bt: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.a.values(), *self.bt.values()))

    def segments(self, config: ModelConfig) -> list[tuple[str, str, int]]:
        """(module, "a"|"bt", n_elems per layer) in pool order: A then B^T for each module."""
        out = []
        for m in self.modules:
            fan_in, fan_out = config.module_shape(m)
            out.append((m, "a", self.rank * fan_in))
            out.append((m, "bt", self.rank * fan_out))
        return out

    def flatten(self, config: ModelConfig) -> torch.Tensor:
        """[num_layers, elems] in pool order, the layout the LoRA ops read back from the pool."""
        parts = [(self.a if kind == "a" else self.bt)[m].reshape(config.num_layers, -1)
                 for m, kind, _ in self.segments(config)]
        return torch.cat(parts, dim=1)


def _fail(name: str, reason: str) -> InvalidAdapterError:
    return InvalidAdapterError(f"adapter {name!r}: {reason}")


def _read_config(folder: Path, name: str) -> dict:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise _fail(name, f"{CONFIG_FILE} not found in {folder}")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise _fail(name, f"{CONFIG_FILE} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _fail(name, f"{CONFIG_FILE} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise _fail(name, f"{CONFIG_FILE} must hold a JSON object")
    return cfg


def _check_config(cfg: dict, name: str, max_rank: int) -> tuple[int, float, bool]:
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise _fail(name, f"peft_type {peft_type} is not supported (only LORA)")
    r = cfg.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= max_rank:
        raise _fail(name, f"rank r={r!r} must be an integer in [1, {max_rank}]")
    alpha = cfg.get("lora_alpha", r)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise _fail(name, f"lora_alpha={alpha!r} must be a finite number")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise _fail(name, f"{key} (per-module ranks) is not supported")
    for key in ("use_dora", "fan_in_fan_out"):
        if cfg.get(key):
            raise _fail(name, f"{key}=true is not supported")
    if cfg.get("bias", "none") not in ("none", None):
        raise _fail(name, "LoRA bias terms are not supported (bias must be 'none')")
    if cfg.get("modules_to_save"):
        raise _fail(name, "modules_to_save (fully trained extra modules) is not supported")
    if cfg.get("layers_to_transform") is not None:
        raise _fail(name, "layers_to_transform is not supported; LoRA must cover every layer")
    return r, float(alpha), bool(cfg.get("use_rslora", False))


def read_adapter(folder: str | Path, name: str, config: ModelConfig, *, max_rank: int,
                 max_bytes: int) -> LoraWeights:
    """Read and validate a PEFT LoRA folder against the base model; raise InvalidAdapterError."""
    root = Path(folder)
    if not root.is_dir():
        raise _fail(name, f"{folder} is not a directory")
    pickles = sorted(p.name for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES)
    weights = root / WEIGHTS_FILE
    if not weights.is_file():
        if pickles:
            raise _fail(name, f"only pickled weights found ({', '.join(pickles)}); pickle files "
                              f"are refused because loading them can run code. Convert the "
                              f"adapter to {WEIGHTS_FILE}")
        raise _fail(name, f"{WEIGHTS_FILE} not found in {folder}")
    size = weights.stat().st_size
    if size > max_bytes:
        raise _fail(name, f"{WEIGHTS_FILE} is {size} bytes, over the limit of {max_bytes}")
    rank, alpha, rslora = _check_config(_read_config(root, name), name, max_rank)
    scale = alpha / math.sqrt(rank) if rslora else alpha / rank

    found: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    try:
        with safe_open(str(weights), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                m = _KEY.match(key)
                if m is None:
                    raise _fail(name, f"unexpected tensor {key!r}: only lora_A/lora_B of "
                                      f"{', '.join(LORA_MODULES)} are supported")
                layer, module, ab = int(m.group(1)), m.group(2), m.group(3)
                if layer >= config.num_layers:
                    raise _fail(name, f"tensor {key!r} names layer {layer}, the base model has "
                                      f"{config.num_layers}")
                found.setdefault((module, ab), {})[layer] = f.get_tensor(key)
    except InvalidAdapterError:
        raise
    except Exception as e:  # a corrupt header or truncated file
        raise _fail(name, f"cannot read {WEIGHTS_FILE}: {e}") from None

    modules = tuple(m for m in LORA_MODULES if (m, "A") in found or (m, "B") in found)
    if not modules:
        raise _fail(name, "no LoRA weights found")
    out = LoraWeights(rank=rank, alpha=alpha, scale=scale, modules=modules)
    for m in modules:
        fan_in, fan_out = config.module_shape(m)
        for ab, want in (("A", (rank, fan_in)), ("B", (fan_out, rank))):
            per_layer = found.get((m, ab), {})
            missing = sorted(set(range(config.num_layers)) - set(per_layer))
            if missing:
                raise _fail(name, f"{m}.lora_{ab} missing for layers {missing[:8]}")
            for layer, t in per_layer.items():
                where = f"layers.{layer}.{_MODULE_PARENT[m]}.{m}.lora_{ab}"
                if t.dtype not in ALLOWED_DTYPES:
                    raise _fail(name, f"{where} has dtype {t.dtype}; use float16, bfloat16 or "
                                      f"float32")
                if tuple(t.shape) != want:
                    raise _fail(name, f"{where} has shape {tuple(t.shape)}, expected {want} for "
                                      f"rank {rank} on this base model")
                if not torch.isfinite(t).all():
                    raise _fail(name, f"{where} holds NaN or infinite values")
        a = torch.stack([found[(m, "A")][i] for i in range(config.num_layers)]).float()
        b = torch.stack([found[(m, "B")][i] for i in range(config.num_layers)]).float()
        out.a[m] = a.contiguous()  # [L, r, in]
        out.bt[m] = (b.transpose(1, 2) * scale).contiguous()  # [L, r, out], scale folded in
    return out
