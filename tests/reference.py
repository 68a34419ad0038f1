"""Hugging Face transformers + PEFT as the reference the engine is compared against (tests only)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaForCausalLM

from loraplane.engine.adapters import write_random_adapter
from loraplane.engine.bench.hf import hf_config
from loraplane.engine.config import ModelConfig, RopeScaling


def random_hf_model(cfg: ModelConfig, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(hf_config(cfg)).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.8, 1.2)  # non-trivial norms catch a missing weight
    return model


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    rank: int
    alpha: float
    modules: tuple[str, ...]
    rslora: bool = False


def make_peft_adapter(base: LlamaForCausalLM, spec: AdapterSpec, folder: Path,
                      seed: int) -> Path:
    """Save a PEFT LoRA adapter with random (non-zero) A and B to folder/spec.name."""
    torch.manual_seed(seed)
    peft_cfg = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=list(spec.modules),
                          use_rslora=spec.rslora, init_lora_weights=False, lora_dropout=0.0)
    model = get_peft_model(copy.deepcopy(base), peft_cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.05)
    out = folder / spec.name
    model.save_pretrained(str(out))
    return out


class Reference:
    """Greedy generation and logits of the base model or one adapter, HF + PEFT on CPU."""

    def __init__(self, base: LlamaForCausalLM, adapters: dict[str, Path]) -> None:
        self.base = base
        self.peft: PeftModel | None = None
        for name, path in adapters.items():
            if self.peft is None:
                self.peft = PeftModel.from_pretrained(copy.deepcopy(base), str(path),
                                                      adapter_name=name)
            else:
                self.peft.load_adapter(str(path), adapter_name=name)
        if self.peft is not None:
            self.peft.eval()

    @torch.no_grad()
    def generate(self, prompt: list[int], adapter: str | None, max_new: int) -> list[int]:
        ids = list(prompt)
        for _ in range(max_new):
            ids.append(int(self.logits(ids, adapter)[-1].argmax()))
        return ids[len(prompt):]

    @torch.no_grad()
    def logits(self, ids: list[int], adapter: str | None) -> torch.Tensor:
        """[len(ids), vocab] float32 logits of a full forward (no cache)."""
        x = torch.tensor([ids])
        if adapter is None:
            return self.base(x).logits[0].float()
        assert self.peft is not None
        self.peft.set_adapter(adapter)
        return self.peft(x).logits[0].float()


__all__ = ["AdapterSpec", "Reference", "RopeScaling", "hf_config", "make_peft_adapter",
           "random_hf_model", "write_lora_folder"]



# Tests write adapters without PEFT through the product's own writer.
write_lora_folder = write_random_adapter
