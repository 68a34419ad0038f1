"""Hugging Face PEFT LoRA folders: parse, validate against the base model, lay out for the pool."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from loraplane.engine.adapter_format import (
    CONFIG_FILE,
    MAX_CONFIG_BYTES,
    MODULE_PARENT,
    PICKLE_SUFFIXES,
    SAFETENSORS_DTYPES,
    WEIGHTS_FILE,
    TensorIndex,
    check_config,
    check_layout,
    fail,
    header_length,
    parse_config,
    parse_header,
    parse_key,
    scale_of,
)
from loraplane.engine.config import ModelConfig
from loraplane.engine.errors import InvalidAdapterError

__all__ = ["CONFIG_FILE", "PICKLE_SUFFIXES", "WEIGHTS_FILE", "LoraSpec", "LoraWeights",
           "read_adapter", "read_header", "read_weights", "write_random_adapter"]

# torch dtypes as safetensors names them, to check read tensors like header entries.
TORCH_TO_SAFETENSORS = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}

@dataclass
class LoraSpec:
    """What an adapter's config and safetensors header say: no tensors (metadata only)."""

    rank: int
    alpha: float
    scale: float
    modules: tuple[str, ...]

    def segments(self, config: ModelConfig) -> list[tuple[str, str, int]]:
        """(module, "a"|"bt", n_elems per layer) in pool order: A then B^T for each module."""
        out = []
        for m in self.modules:
            fan_in, fan_out = config.module_shape(m)
            out.append((m, "a", self.rank * fan_in))
            out.append((m, "bt", self.rank * fan_out))
        return out

    def elems_per_layer(self, config: ModelConfig) -> int:
        """Elements of one layer's weights in pool order (the width of `flatten`)."""
        return sum(n for _, _, n in self.segments(config))


@dataclass
class LoraWeights(LoraSpec):
    """One adapter's weights on the host: per module, A [L, r, in] and B^T [L, r, out] * scale."""

    a: dict[str, torch.Tensor] = field(default_factory=dict)
    bt: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.a.values(), *self.bt.values()))

    def segments(self, config: ModelConfig) -> list[tuple[str, str, int]]:
        """As LoraSpec's, but sized from the tensors: a tensor-parallel shard's widths and padded
        rank differ from the model's shapes (see distributed/sharding.py)."""
        out = []
        for m in self.modules:
            out.append((m, "a", self.a[m][0].numel()))
            out.append((m, "bt", self.bt[m][0].numel()))
        return out

    def _parts(self, config: ModelConfig) -> list[torch.Tensor]:
        """The segments in pool order, each [num_layers, elems of the segment] (views)."""
        return [(self.a if kind == "a" else self.bt)[m].reshape(config.num_layers, -1)
                for m, kind, _ in self.segments(config)]

    def flatten(self, config: ModelConfig) -> torch.Tensor:
        """[num_layers, elems] in pool order, the layout the LoRA ops read back from the pool."""
        return torch.cat(self._parts(config), dim=1)

    def write_pages(self, config: ModelConfig, pages: list[torch.Tensor]) -> None:
        """Lay `flatten`'s layout out over page buffers, each [num_layers, page_elems] (page k
        takes columns [k * page_elems, (k + 1) * page_elems)), converting the dtype, with one
        copy per piece of a segment on a page and the last page's tail zeroed: no
        intermediate tensor."""
        parts = self._parts(config)
        pe = pages[0].shape[1]
        total = sum(p.shape[1] for p in parts)
        if len(pages) != -(-total // pe):
            raise ValueError(f"{total} elements per layer need {-(-total // pe)} pages, "
                             f"not {len(pages)}")
        k = col = 0  # the page being filled and its first free column
        for part in parts:
            src = 0
            while src < part.shape[1]:
                n = min(part.shape[1] - src, pe - col)
                pages[k][:, col:col + n].copy_(part[:, src:src + n])
                src += n
                col += n
                if col == pe:
                    k, col = k + 1, 0
        if col:
            pages[k][:, col:].zero_()


def _read_config(folder: Path, name: str) -> dict:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise fail(name, f"{CONFIG_FILE} not found in {folder}")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise fail(name, f"{CONFIG_FILE} is larger than {MAX_CONFIG_BYTES} bytes")
    return parse_config(path.read_bytes(), name)


def read_header(folder: str | Path, name: str, config: ModelConfig, *, max_rank: int,
                max_bytes: int) -> LoraSpec:
    """Validate a PEFT LoRA folder from its config and safetensors header alone (no tensor
    data is read: registering adapters costs metadata only); raise InvalidAdapterError."""
    root = Path(folder)
    if not root.is_dir():
        raise fail(name, f"{folder} is not a directory")
    pickles = sorted(p.name for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES)
    weights = root / WEIGHTS_FILE
    if not weights.is_file():
        if pickles:
            raise fail(name, f"only pickled weights found ({', '.join(pickles)}); pickle files "
                              f"are refused because loading them can run code. Convert the "
                              f"adapter to {WEIGHTS_FILE}")
        raise fail(name, f"{WEIGHTS_FILE} not found in {folder}")
    size = weights.stat().st_size
    if size > max_bytes:
        raise fail(name, f"{WEIGHTS_FILE} is {size} bytes, over the limit of {max_bytes}")
    rank, alpha, rslora = check_config(_read_config(root, name), name, max_rank)
    try:
        with weights.open("rb") as f:
            n = header_length(f.read(8), size, name)
            header = f.read(n)
    except OSError as e:
        raise fail(name, f"cannot read {WEIGHTS_FILE}: {e}") from None
    index = parse_header(header, name, config)
    modules = check_layout(index, rank, config, name, SAFETENSORS_DTYPES)
    return LoraSpec(rank=rank, alpha=alpha, scale=scale_of(rank, alpha, rslora), modules=modules)


def read_weights(folder: str | Path, name: str, config: ModelConfig, spec: LoraSpec, *,
                 max_rank: int, max_bytes: int,
                 dtype: torch.dtype = torch.float32) -> LoraWeights:
    """Read the tensors of a folder registered with `spec` (checked again: the folder may have
    changed since), check their values are finite, and hold them in `dtype`; raise
    InvalidAdapterError."""
    if read_header(folder, name, config, max_rank=max_rank, max_bytes=max_bytes) != spec:
        raise fail(name, f"{folder} changed since it was registered (rank, alpha or modules)")
    tensors: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    try:
        with safe_open(str(Path(folder) / WEIGHTS_FILE), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                layer, module, ab = parse_key(key, name, config)
                tensors.setdefault((module, ab), {})[layer] = f.get_tensor(key)
    except InvalidAdapterError:
        raise
    except Exception as e:  # a truncated file or a header that changed under us
        raise fail(name, f"cannot read {WEIGHTS_FILE}: {e}") from None
    index: TensorIndex = {k: {layer: (TORCH_TO_SAFETENSORS.get(t.dtype, str(t.dtype)),
                                      tuple(t.shape)) for layer, t in v.items()}
                          for k, v in tensors.items()}
    check_layout(index, spec.rank, config, name, SAFETENSORS_DTYPES)
    out = LoraWeights(rank=spec.rank, alpha=spec.alpha, scale=spec.scale, modules=spec.modules)
    for m in spec.modules:
        # One check per stacked module (few torch calls: this runs on a loader thread that
        # shares the GIL with the engine), the culprit looked for only on failure.
        a = torch.stack([tensors[(m, "A")][i] for i in range(config.num_layers)]).to(dtype)
        b = torch.stack([tensors[(m, "B")][i] for i in range(config.num_layers)]).to(dtype)
        for ab, stacked in (("A", a), ("B", b)):
            if not torch.isfinite(stacked).all():
                layer = next(i for i, t in enumerate(stacked) if not torch.isfinite(t).all())
                where = f"layers.{layer}.{MODULE_PARENT[m]}.{m}.lora_{ab}"
                raise fail(name, f"{where} holds NaN or infinite values")
        out.a[m] = a.contiguous()  # [L, r, in]
        # [L, r, out], scale folded in (computed in float32 for half dtypes, then rounded once)
        out.bt[m] = (b.transpose(1, 2) * spec.scale).contiguous()
    return out


def read_adapter(folder: str | Path, name: str, config: ModelConfig, *, max_rank: int,
                 max_bytes: int) -> LoraWeights:
    """Read and validate a PEFT LoRA folder against the base model; raise InvalidAdapterError."""
    spec = read_header(folder, name, config, max_rank=max_rank, max_bytes=max_bytes)
    return read_weights(folder, name, config, spec, max_rank=max_rank, max_bytes=max_bytes)


def random_lora_weights(config: ModelConfig, rank: int, modules: tuple[str, ...], *,
                        seed: int | torch.Generator = 0, std: float = 1.0,
                        alpha: float | None = None, scale: float = 1.0,
                        layers: int | None = None) -> LoraWeights:
    """LoRA weights of random values (tests and benchmarks): A [L, r, in] and B^T [L, r, out]
    per module, drawn module by module from `seed` (or a generator shared across calls)."""
    gen = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
    n = config.num_layers if layers is None else layers
    w = LoraWeights(rank=rank, alpha=float(rank) if alpha is None else alpha, scale=scale,
                    modules=modules)
    for m in modules:
        fan_in, fan_out = config.module_shape(m)
        w.a[m] = torch.randn(n, rank, fan_in, generator=gen) * std
        w.bt[m] = torch.randn(n, rank, fan_out, generator=gen) * std
    return w


def write_random_adapter(folder: str | Path, config: ModelConfig, rank: int,
                         modules: tuple[str, ...], seed: int, alpha: float | None = None,
                         std: float = 0.05) -> Path:
    """Write a PEFT-format LoRA folder with random weights (benchmarks, demos and tests)."""
    import json

    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config.num_layers):
        for m in modules:
            fan_in, fan_out = config.module_shape(m)
            key = f"base_model.model.model.layers.{layer}.{MODULE_PARENT[m]}.{m}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, fan_in, generator=gen) * std
            tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, rank, generator=gen) * std
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS_FILE))
    (out / CONFIG_FILE).write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": alpha or 2 * rank,
        "target_modules": list(modules), "bias": "none", "use_rslora": False,
        "base_model_name_or_path": config.name}, indent=2))
    return out
