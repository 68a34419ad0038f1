"""CPU benchmark: a batch of 8 requests with 8 different adapters, loraplane vs HF PEFT.

Both run SmolLM2-135M-Instruct in float32 on this machine's CPU, greedy, forced output length,
side by side in one run; PEFT gets the whole batch at once with `adapter_names=` (its mixed-batch
LoRA). Prints a table and writes JSON under bench/results/.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from loraplane.engine.config import EngineConfig
from loraplane.engine.engine import EngineParts, LLMEngine
from loraplane.engine.models.llama import build_model
from loraplane.engine.models.loader import export_hf_checkpoint, load_model
from loraplane.engine.sampling_params import SamplingParams

PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a refrigerator keeps food cold, step by step, for a curious child.",
    "List five tips for learning a new programming language quickly and well.",
    "Describe the water cycle and why it matters for farming in dry regions.",
    "What are the main differences between a violin and a viola? Be specific.",
    "Summarize the plot of a heist movie you invent, with three main characters.",
    "Give a recipe for a simple vegetable soup and explain each of the steps.",
    "Why do cats purr? Give the leading scientific explanations in plain words.",
]
RANKS = (8, 16, 32, 64)
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]


def make_adapters(hf_model: torch.nn.Module, folder: Path, n: int) -> dict[str, Path]:
    from peft import LoraConfig, get_peft_model

    out = {}
    for i in range(n):
        torch.manual_seed(i)
        rank = RANKS[i % len(RANKS)]
        cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=MODULES,
                         init_lora_weights=False)
        peft_model = get_peft_model(copy.deepcopy(hf_model), cfg)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_" in name:
                    p.normal_(0.0, 0.02)
        path = folder / f"adapter-{i}-r{rank}"
        peft_model.save_pretrained(str(path))
        out[path.name] = path
    return out


def time_engine(engine: LLMEngine, prompts: list[list[int]], names: list[str],
                new_tokens: int) -> float:
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    t = time.perf_counter()
    seqs = engine.generate(list(prompts), params, list(names))
    elapsed = time.perf_counter() - t
    assert all(len(s.output_ids) == new_tokens for s in seqs)
    return elapsed


def time_peft(model: torch.nn.Module, prompts: list[list[int]], names: list[str],
              new_tokens: int) -> float:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])  # left padding
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    t = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, adapter_names=names,  # type: ignore[operator]
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=0)
    elapsed = time.perf_counter() - t
    assert out.shape[1] == width + new_tokens
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    loaded = load_model("smollm2")
    tok = loaded.tokenizer
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}]))
               for p in PROMPTS]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "base"
        export_hf_checkpoint(loaded, ckpt)
        hf = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
        adapters = make_adapters(hf, Path(tmp), len(prompts))
        names = list(adapters)
        peft = PeftModel.from_pretrained(hf, str(adapters[names[0]]), adapter_name=names[0])
        for n in names[1:]:
            peft.load_adapter(str(adapters[n]), adapter_name=n)
        peft.eval()

        cfg = loaded.config
        model = build_model(cfg, loaded.weights, 2048, torch.float32, torch.device("cpu"))
        engine = LLMEngine(EngineParts(model, cfg, tok, "smollm2"),
                           EngineConfig(pool_bytes=512 << 20, max_model_len=2048))
        for n, p in adapters.items():
            engine.load_adapter(n, str(p))

        # Warm up both (allocator, lazy inits), then alternate the timed runs.
        time_engine(engine, prompts, names, 4)
        time_peft(peft, prompts, names, 4)
        eng_t, peft_t = [], []
        for _ in range(args.repeats):
            eng_t.append(time_engine(engine, prompts, names, args.new_tokens))
            peft_t.append(time_peft(peft, prompts, names, args.new_tokens))

    tokens = len(prompts) * args.new_tokens
    eng_tps = tokens / statistics.median(eng_t)
    peft_tps = tokens / statistics.median(peft_t)
    result = {
        "benchmark": "cpu_multi_adapter",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__},
        "config": {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)", "dtype": "float32",
                   "requests": len(prompts), "adapters": len(prompts), "ranks": RANKS,
                   "modules": MODULES, "prompt_tokens": [len(p) for p in prompts],
                   "new_tokens": args.new_tokens, "repeats": args.repeats},
        "seconds": {"loraplane": eng_t, "peft": peft_t},
        "tokens_per_s": {"loraplane": round(eng_tps, 1), "peft": round(peft_tps, 1)},
        "speedup": round(eng_tps / peft_tps, 2),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"cpu-multi-adapter-{datetime.date.today().isoformat()}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{len(prompts)} requests x {args.new_tokens} tokens, 8 adapters ranks {RANKS}")
    print(f"{'engine':<12}{'median s':>10}{'tokens/s':>10}")
    print(f"{'loraplane':<12}{statistics.median(eng_t):>10.2f}{eng_tps:>10.1f}")
    print(f"{'HF PEFT':<12}{statistics.median(peft_t):>10.2f}{peft_tps:>10.1f}")
    print(f"speedup: {eng_tps / peft_tps:.2f}x  -> {path}")


if __name__ == "__main__":
    main()
