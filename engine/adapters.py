"""Hugging Face PEFT LoRA folders: parse, validate against the base model, lay out for the pool."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loraplane.engine.adapter_format import (
    CONFIG_FILE,
    MAX_CONFIG_BYTES,
    MODULE_PARENT,
    PICKLE_SUFFIXES,
    SAFETENSORS_DTYPES,
    WEIGHTS_FILE,
    check_config,
    check_layout,
    fail,
    header_length,
    parse_config,
    parse_header,
    scale_of,
)
from loraplane.engine.adapter_reader import check_pages, page_pieces, read_into_pages, zero_tail
from loraplane.engine.config import ModelConfig

__all__ = ["CONFIG_FILE", "PICKLE_SUFFIXES", "WEIGHTS_FILE", "LoraSpec", "LoraWeights",
           "read_adapter", "read_header", "read_weights", "write_random_adapter",
           "write_weights"]

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
    # Set by `packed`: [num_layers, elems] in pool order, which a and bt are views of.
    flat: torch.Tensor | None = field(default=None, repr=False, compare=False)

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
        """[num_layers, elems] in pool order, the layout the LoRA ops read back from the pool
        (the packed buffer itself, no copy, after `packed`)."""
        if self.flat is not None:
            return self.flat
        return torch.cat(self._parts(config), dim=1)

    def packed(self, config: ModelConfig, pin: bool) -> LoraWeights:
        """The same weights as views of one [num_layers, elems] buffer in pool order, pinned
        when asked: `flatten` then returns that buffer, and copying it to the GPU is one
        asynchronous transfer instead of a host concatenation and a blocking copy."""
        parts = self._parts(config)
        flat = torch.empty(config.num_layers, sum(p.shape[1] for p in parts),
                           dtype=parts[0].dtype, pin_memory=pin)
        a: dict[str, torch.Tensor] = {}
        bt: dict[str, torch.Tensor] = {}
        start = 0
        for (m, kind, n), part in zip(self.segments(config), parts, strict=True):
            view = flat[:, start:start + n]  # [L, n], rows `elems` apart
            view.copy_(part)
            own, out = (self.a, a) if kind == "a" else (self.bt, bt)
            out[m] = view.view(own[m].shape)
            start += n
        return dataclasses.replace(self, a=a, bt=bt, flat=flat)

    def write_pages(self, config: ModelConfig, pages: list[torch.Tensor]) -> None:
        """Lay `flatten`'s layout out over page buffers, each [num_layers, page_elems] (page k
        takes columns [k * page_elems, (k + 1) * page_elems)), converting the dtype, with one
        copy per piece of a segment on a page and the last page's tail zeroed: no
        intermediate tensor."""
        parts = self._parts(config)
        total = sum(p.shape[1] for p in parts)
        pe = check_pages(pages, total)
        start = 0
        for part in parts:
            for k, col, lo, hi in page_pieces(start, part.shape[1], pe):
                pages[k][:, col:col + hi - lo].copy_(part[:, lo:hi])
            start += part.shape[1]
        zero_tail(pages, total)


def _read_config(folder: Path, name: str) -> dict:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise fail(name, f"{CONFIG_FILE} not found in {folder}")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise fail(name, f"{CONFIG_FILE} is larger than {MAX_CONFIG_BYTES} bytes")
    return parse_config(path.read_bytes(), name)


def _check_folder(folder: str | Path, name: str, max_rank: int,
                  max_bytes: int) -> tuple[Path, int, int, float, bool]:
    """(weights file, its size, rank, alpha, use_rslora) of a folder with a safetensors file
    within the size limit and a supported config; raise InvalidAdapterError."""
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
    return weights, size, rank, alpha, rslora


def read_header(folder: str | Path, name: str, config: ModelConfig, *, max_rank: int,
                max_bytes: int) -> LoraSpec:
    """Validate a PEFT LoRA folder from its config and safetensors header alone (no tensor
    data is read: registering adapters costs metadata only); raise InvalidAdapterError."""
    weights, size, rank, alpha, rslora = _check_folder(folder, name, max_rank, max_bytes)
    try:
        with weights.open("rb") as f:
            n = header_length(f.read(8), size, name)
            header = f.read(n)
    except OSError as e:
        raise fail(name, f"cannot read {WEIGHTS_FILE}: {e}") from None
    index = parse_header(header, name, config)
    modules = check_layout(index, rank, config, name, SAFETENSORS_DTYPES)
    return LoraSpec(rank=rank, alpha=alpha, scale=scale_of(rank, alpha, rslora), modules=modules)


def write_weights(folder: str | Path, name: str, config: ModelConfig, spec: LoraSpec,
                  pages: list[torch.Tensor], *, max_rank: int, max_bytes: int,
                  phases: dict[str, float] | None = None) -> None:
    """Read the tensors of a folder registered with `spec` (checked again: the folder may have
    changed since) straight into page buffers as `LoraWeights.write_pages` lays them out, in
    the pages' dtype, checking their values are finite; raise InvalidAdapterError. `phases`:
    seconds per phase, for benchmarks."""
    t = time.perf_counter()
    weights, _, rank, alpha, rslora = _check_folder(folder, name, max_rank, max_bytes)
    if (rank, alpha, scale_of(rank, alpha, rslora)) != (spec.rank, spec.alpha, spec.scale):
        raise fail(name, f"{folder} changed since it was registered (rank or alpha)")
    if phases is not None:
        phases["config"] = phases.get("config", 0.0) + time.perf_counter() - t
    # The header is read once, there, from the file the tensors are then mapped from.
    read_into_pages(weights, name, config, spec.rank, spec.segments(config), spec.scale, pages,
                    phases)


def read_weights(folder: str | Path, name: str, config: ModelConfig, spec: LoraSpec, *,
                 max_rank: int, max_bytes: int,
                 dtype: torch.dtype = torch.float32) -> LoraWeights:
    """`write_weights` into one page as wide as a layer's weights, held as LoraWeights (its A
    and B^T are views of that page); raise InvalidAdapterError."""
    flat = torch.empty(config.num_layers, spec.elems_per_layer(config), dtype=dtype)
    write_weights(folder, name, config, spec, [flat], max_rank=max_rank, max_bytes=max_bytes)
    out = LoraWeights(rank=spec.rank, alpha=spec.alpha, scale=spec.scale, modules=spec.modules)
    start = 0
    for m, kind, n in spec.segments(config):
        view = flat[:, start:start + n].unflatten(1, (spec.rank, -1))
        (out.a if kind == "a" else out.bt)[m] = view  # [L, r, in] or [L, r, out]
        start += n
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
