"""Synthetic adapters: many distinct engine adapters built over a few shared random weight sets.

2,000 rank-64 adapters on q,k,v,o of llama-2-7b would take about 130 GB of host memory; the
accelerator machine has 128 GiB. Each registered name is still a distinct adapter to the engine
(its own pool pages and its own host-to-device copy when it becomes resident). Two sources:
- memory: the host tensors it is copied from are shared with the other adapters of the same rank
  and set (the engine still lays out its own host buffer when it first needs it);
- disk: each weight set is written once as a PEFT folder and every name of that set is
  registered from it (header only); the engine reads it into its own host buffer (bounded by
  --host-cache-memory) when prefetch or admission needs it, as with real adapters.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm import tqdm

from loraplane.engine.adapter_format import CONFIG_FILE, MODULE_PARENT, WEIGHTS_FILE
from loraplane.engine.adapter_source import MemorySource
from loraplane.engine.adapters import LoraWeights
from loraplane.engine.config import ModelConfig
from loraplane.engine.engine import LLMEngine

ADAPTER_STORAGE = {
    "memory": "shared host tensors, distinct pool pages",
    "disk": "PEFT folders on disk, one per weight set, shared by names; each name has its own "
            "host buffer (host tier) and its own pool pages",
}
STD = 0.05  # as write_random_adapter: large enough that a missing LoRA term shows


def adapter_name(index: int, rank: int) -> str:
    return f"a{index:04d}-r{rank}"


def random_weights(config: ModelConfig, rank: int, modules: tuple[str, ...], seed: int,
                   dtype: torch.dtype, device: torch.device) -> LoraWeights:
    """A random LoRA (alpha = 2·rank) held on the host in `dtype`; drawn on `device` for speed."""
    gen = torch.Generator(device=device).manual_seed(seed)
    alpha = 2.0 * rank
    w = LoraWeights(rank=rank, alpha=alpha, scale=alpha / rank, modules=modules)
    layers = config.num_layers
    for m in modules:
        fan_in, fan_out = config.module_shape(m)
        a = torch.randn(layers, rank, fan_in, generator=gen, device=device) * STD  # [L, r, in]
        b = torch.randn(layers, rank, fan_out, generator=gen, device=device) * STD  # [L, r, out]
        w.a[m] = a.to(dtype).cpu()
        w.bt[m] = (b * w.scale).to(dtype).cpu()  # B^T with the scale folded in, as read_adapter
    return w


class WeightSets:
    """`per_rank` random weight sets for each rank; adapter j uses set j mod per_rank."""

    def __init__(self, config: ModelConfig, ranks: list[int], modules: tuple[str, ...],
                 per_rank: int, seed: int, dtype: torch.dtype, device: torch.device) -> None:
        self.config = config
        self.per_rank = per_rank
        self.sets: dict[tuple[int, int], LoraWeights] = {}
        self.folders: dict[tuple[int, int], str] = {}  # set -> PEFT folder, once written
        wanted = sorted({(r, j % per_rank) for j, r in enumerate(ranks)})
        for rank, k in tqdm(wanted, desc="random weight sets", unit="set", leave=False):
            self.sets[(rank, k)] = random_weights(config, rank, modules, seed * 7919 + rank * 131
                                                  + k, dtype, device)

    def write_folders(self, root: Path) -> None:
        """Write every set as a PEFT folder under root; adapters then name it as their path
        (tensor-parallel workers read their shards from there)."""
        for (rank, k), weights in tqdm(sorted(self.sets.items(), key=lambda kv: kv[0]),
                                       desc="writing adapter folders", unit="folder",
                                       leave=False):
            self.folders[(rank, k)] = str(write_peft_folder(weights, self.config,
                                                            root / f"rank{rank}-set{k}"))

    def _label(self, rank: int, k: int) -> str:
        return self.folders.get((rank, k), f"synthetic:rank{rank}-set{k}")

    def of(self, index: int, rank: int) -> tuple[LoraWeights, str]:
        """The weights adapter `index` uses and its set's folder or a path-like label."""
        k = index % self.per_rank
        return self.sets[(rank, k)], self._label(rank, k)

    @property
    def ranks(self) -> list[int]:
        return sorted({rank for rank, _ in self.sets})

    def first(self, rank: int) -> tuple[LoraWeights, str]:
        """A weight set of this rank (for warm-up adapters outside the trace)."""
        k = min(k for r, k in self.sets if r == rank)
        return self.sets[(rank, k)], self._label(rank, k)

    @property
    def modules(self) -> frozenset[str]:
        """The projections every set (hence every trace adapter) targets."""
        return frozenset(next(iter(self.sets.values())).modules)

    @property
    def host_bytes(self) -> int:
        return sum(w.num_bytes for w in self.sets.values())


def register(engine: LLMEngine, sets: WeightSets, ranks: list[int]) -> list[str]:
    """Register one distinct engine adapter per rank entry; returns their names."""
    names = []
    for j, rank in enumerate(tqdm(ranks, desc="registering adapters", unit="adapter")):
        weights, label = sets.of(j, rank)
        name = adapter_name(j, rank)
        # Copied into the host tier on a loader thread, as a real source is read (on the engine
        # thread, 175 loads of 60 MB stalled S2 1,000-adapter runs for seconds between steps).
        engine.add_adapter(name, label, MemorySource(weights, threaded=True))
        names.append(name)
    return names


def register_folders(engine: LLMEngine, sets: WeightSets, ranks: list[int],
                     root: Path) -> list[str]:
    """Write each weight set once as a PEFT folder under root, then register one engine adapter
    per rank entry from its set's folder (header only, no tensors held); returns their names."""
    sets.write_folders(root)
    names = []
    for j, rank in enumerate(tqdm(ranks, desc="registering adapters", unit="adapter")):
        name = adapter_name(j, rank)
        engine.load_adapter(name, sets.folders[(rank, j % sets.per_rank)])
        names.append(name)
    return names


def write_peft_folder(weights: LoraWeights, config: ModelConfig, folder: Path) -> Path:
    """Write weights as a PEFT LoRA folder (what HF PEFT's load_adapter reads)."""
    from safetensors.torch import save_file

    tensors = {}
    for m in weights.modules:
        for layer in range(config.num_layers):
            key = f"base_model.model.model.layers.{layer}.{MODULE_PARENT[m]}.{m}"
            tensors[f"{key}.lora_A.weight"] = weights.a[m][layer].contiguous()
            b = weights.bt[m][layer].float() / weights.scale  # [r, out] -> B [out, r]
            tensors[f"{key}.lora_B.weight"] = b.t().to(weights.a[m].dtype).contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / WEIGHTS_FILE))
    (folder / CONFIG_FILE).write_text(json.dumps({
        "peft_type": "LORA", "r": weights.rank, "lora_alpha": weights.alpha,
        "target_modules": list(weights.modules), "bias": "none", "use_rslora": False,
        "base_model_name_or_path": config.name}, indent=2))
    return folder
