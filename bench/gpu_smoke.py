"""GPU check of the engine (not a test): the Triton kernels (LoRA and paged attention) and the
plain-torch path give the same greedy tokens in float32; then decode-step times of the base
model and of batches where every row has its own adapter.

Prints a short table and writes JSON to --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch

from loraplane.engine.adapters import LoraWeights, random_lora_weights
from loraplane.engine.attention import TorchAttention, TritonAttention
from loraplane.engine.config import NAMED_SHAPES, EngineConfig, ModelConfig
from loraplane.engine.engine import EngineParts, LLMEngine
from loraplane.engine.lora.ops import TorchLoraOp
from loraplane.engine.lora.triton_op import TritonLoraOp
from loraplane.engine.models.llama import build_model
from loraplane.engine.sampling_params import SamplingParams
from loraplane.engine.tokenizer import Tokenizer

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")


def weights(cfg: ModelConfig, rank: int, seed: int, modules: tuple[str, ...] = MODULES,
            std: float = 0.02) -> LoraWeights:
    return random_lora_weights(cfg, rank, modules, seed=seed, std=std)


def engine_for(cfg: ModelConfig, model: torch.nn.Module, op: type, pool_gib: float,
               attention: type = TritonAttention, **kw: int | bool) -> LLMEngine:
    ec = EngineConfig(pool_bytes=int(pool_gib * 2**30), max_model_len=2048, **kw)  # type: ignore[arg-type]
    eng = LLMEngine(EngineParts(model, cfg, Tokenizer.byte_level(cfg.vocab_size), cfg.name),  # type: ignore[arg-type]
                    ec, lora_op=op)
    eng.runner.attention = attention
    return eng


def parity(dev: torch.device) -> dict:
    cfg = NAMED_SHAPES["smollm2-135m"]
    out = {}
    results = []
    variants = ((TorchLoraOp, TorchAttention, False), (TritonLoraOp, TritonAttention, False),
                (TritonLoraOp, TritonAttention, True))
    for op, attention, graphs in variants:
        model = build_model(cfg, None, 2048, torch.float32, dev, seed=3)
        eng = engine_for(cfg, model, op, 2.0, attention, cuda_graphs=graphs)
        names: list[str | None] = [None]
        for i, r in enumerate((4, 8, 16, 64)):
            mods = MODULES if i % 2 else ("q_proj", "v_proj", "gate_proj", "down_proj")
            eng.add_adapter(f"a{i}", "", weights(cfg, r, i, mods, std=0.2))
            names.append(f"a{i}")
        gen = torch.Generator().manual_seed(0)
        prompts = [torch.randint(3, 250, (n,), generator=gen).tolist()
                   for n in (5, 40, 17, 1, 90, 33, 8, 64)]
        seqs = eng.generate(prompts, SamplingParams(max_tokens=24, temperature=0.0,
                                                    ignore_eos=True),
                            [names[i % len(names)] for i in range(len(prompts))])
        results.append([s.output_ids for s in seqs])
        del eng, model
        torch.cuda.empty_cache()
    for name, i, j in (("torch_vs_triton_eager", 0, 1), ("triton_eager_vs_graphs", 1, 2)):
        out[name] = {"same_tokens": results[i] == results[j],
                     "rows_equal": sum(a == b for a, b in zip(results[i], results[j],
                                                              strict=True)),
                     "rows": len(results[i])}
    return out


def replay_ms(eng: LLMEngine) -> float | None:
    """Median GPU time of one replay of the engine's (single) captured decode graph."""
    graphs = eng.runner.graphs
    if graphs is None or len(graphs.graphs) != 1:
        return None
    g = next(iter(graphs.graphs.values())).graph
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return round(sorted(times)[len(times) // 2], 3)


def sampler_agreement(dev: torch.device) -> dict:
    """Seeded rows sampled from the same logits on the GPU and on the CPU."""
    from loraplane.engine.sampler import sample
    from loraplane.engine.sequence import Sequence

    logits = torch.randn(64, 32000, generator=torch.Generator().manual_seed(5)) * 3
    def seqs() -> list[Sequence]:
        return [Sequence(f"s{i}", [1], SamplingParams(temperature=0.9, top_p=0.95 if i % 2 else
                                                      1.0, top_k=50 if i % 3 == 0 else 0,
                                                      seed=i)) for i in range(64)]
    cpu = sample(logits, seqs())
    gpu = sample(logits.to(dev), seqs())
    return {"rows": 64, "same_token": sum(a == b for a, b in zip(cpu, gpu, strict=True))}


def decode_steps(dev: torch.device, batch: int, n_adapters: int, rank: int,
                 graphs: bool = True, sampled: bool = False, fused: bool = True) -> dict:
    cfg = NAMED_SHAPES["llama-2-7b"]
    model = build_model(cfg, None, 2048, torch.bfloat16, dev)
    eng = engine_for(cfg, model, TritonLoraOp, 20.0, max_num_seqs=max(batch, 1),
                     cuda_graphs=graphs, fused_layers=fused)
    for i in range(n_adapters):
        eng.add_adapter(f"a{i}", "", weights(cfg, rank, i))
    gen = torch.Generator().manual_seed(1)
    params = SamplingParams(max_tokens=64, temperature=0.8 if sampled else 0.0,
                            top_p=0.9 if sampled else 1.0, seed=3 if sampled else None,
                            ignore_eos=True)
    for i in range(batch):
        eng.add_request(f"r{i}", torch.randint(3, 30000, (128,), generator=gen).tolist(), params,
                        f"a{i % n_adapters}" if n_adapters else None)
    eng.step()  # prefill
    for _ in range(4):
        eng.step()
    torch.cuda.synchronize()
    times = []
    for _ in range(32):
        t = time.perf_counter()
        eng.step()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1000)
    times.sort()
    replay = replay_ms(eng) if graphs else None
    del eng, model
    torch.cuda.empty_cache()
    return {"batch": batch, "adapters": n_adapters, "rank": rank, "cuda_graphs": graphs,
            "sampled": sampled, "fused_layers": fused,
            "step_ms_median": round(times[len(times) // 2], 2),
            "graph_replay_ms": replay,
            "tokens_per_s": round(batch / times[len(times) // 2] * 1000, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--tag", default="", help="appended to the JSON file's name")
    ap.add_argument("--eager", action="store_true", help="also time batch 1 without graphs")
    ap.add_argument("--skip-parity", action="store_true")
    args = ap.parse_args()
    dev = torch.device("cuda")
    res: dict = {"date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name(),
                 "torch": torch.__version__}
    if not args.skip_parity:
        res["parity_fp32_triton_vs_torch"] = parity(dev)
        print("parity:", res["parity_fp32_triton_vs_torch"], flush=True)
    res["decode"] = []
    res["sampler_gpu_vs_cpu"] = sampler_agreement(dev)
    print("sampler:", res["sampler_gpu_vs_cpu"], flush=True)
    runs: tuple[tuple[int, int, int, bool, bool], ...] = (
            (1, 0, 0, True, False), (1, 1, 16, True, False), (1, 0, 0, True, True),
            (32, 0, 0, True, False), (32, 32, 16, True, False), (64, 0, 0, True, False),
            (64, 0, 0, True, True), (64, 64, 16, True, False), (64, 64, 64, True, False))
    if args.eager:
        runs = ((1, 0, 0, False, False),) + runs
    for batch, n, r, graphs, sampled in runs:
        try:
            res["decode"].append(decode_steps(dev, batch, n, r, graphs, sampled))
        except Exception as e:  # record and go on: one device call holds all the runs
            res.setdefault("errors", []).append(f"{batch}/{n}/{r}: {e!r}")
            print("FAILED", batch, n, r, repr(e), flush=True)
            torch.cuda.empty_cache()
            continue
        print(res["decode"][-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"gpu-smoke-h200-{res['date']}{args.tag}.json"
    path.write_text(json.dumps(res, indent=2) + "\n")
    print(f"{'batch':>6}{'adapters':>9}{'rank':>5}{'graphs':>7}{'sampled':>8}{'ms/step':>9}"
          f"{'replay':>8}{'tok/s':>9}")
    for d in res["decode"]:
        print(f"{d['batch']:>6}{d['adapters']:>9}{d['rank']:>5}{d['cuda_graphs']!s:>7}"
              f"{d['sampled']!s:>8}{d['step_ms_median']:>9}{d['graph_replay_ms']!s:>8}"
              f"{d['tokens_per_s']:>9}")
    print(f"-> {path}")


if __name__ == "__main__":
    main()
