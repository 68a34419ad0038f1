"""Host time of an engine step on the CPU (not a test): cProfile of `LLMEngine.step` on a tiny
random model, split into the model's own forward and everything else (scheduling, runner
bookkeeping, sampling, detokenization).

Decode steps of `--batch` requests; greedy or seeded sampling. Prints a short table and the
costliest host functions; writes JSON when --out is given. Compare versions side by side in one
session on a quiet machine: absolute CPU times drift with load.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import time
from pathlib import Path

import torch

from loraplane.engine.config import NAMED_SHAPES, EngineConfig
from loraplane.engine.engine import EngineParts, LLMEngine
from loraplane.engine.models.llama import LlamaModel, build_model
from loraplane.engine.sampling_params import SamplingParams
from loraplane.engine.tokenizer import Tokenizer


def profile_steps(batch: int, sampled: bool, steps: int) -> dict:
    cfg = NAMED_SHAPES["tiny"]
    model = build_model(cfg, None, 1024, torch.float32, torch.device("cpu"))
    eng = LLMEngine(EngineParts(model, cfg, Tokenizer.byte_level(cfg.vocab_size), cfg.name),
                    EngineConfig(pool_bytes=64 << 20, max_num_seqs=batch))
    params = SamplingParams(max_tokens=steps + 8, temperature=0.8 if sampled else 0.0,
                            top_p=0.9 if sampled else 1.0, seed=1 if sampled else None,
                            ignore_eos=True)
    gen = torch.Generator().manual_seed(0)
    for i in range(batch):
        eng.add_request(f"r{i}", torch.randint(3, 500, (100,), generator=gen).tolist(), params)
    for _ in range(3):  # prefill and warm-up
        eng.step()
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for _ in range(steps):
        eng.step()
    prof.disable()
    total = (time.perf_counter() - t0) / steps * 1e3
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    # Cumulative time of LlamaModel.forward and .logits: the whole model, inner modules included.
    model_keys = {(c.co_filename, c.co_firstlineno, c.co_name)
                  for c in (LlamaModel.forward.__code__, LlamaModel.logits.__code__)}
    model_s = sum(stats[k][3] for k in model_keys if k in stats)
    profiled = sum(v[2] for v in stats.values()) / steps * 1e3
    model_ms = model_s / steps * 1e3
    top = sorted(((v[2] / steps * 1e6, f"{Path(k[0]).name}:{k[1]}({k[2]})")
                  for k, v in stats.items() if _host_side(k)), reverse=True)[:8]
    return {"batch": batch, "sampled": sampled, "step_ms_profiled": round(profiled, 3),
            "step_ms_wall": round(total, 3), "model_ms": round(model_ms, 3),
            "host_ms": round(profiled - model_ms, 3),
            "top_host_us_tottime": [(round(t, 1), name) for t, name in top]}


def _host_side(key: tuple[str, int, str]) -> bool:
    """An engine function that runs outside the model's forward (kernels and layers excluded)."""
    path = Path(key[0]).as_posix()
    inside = ("/models/", "/kernels/", "/lora/")
    return "/engine/" in path and not any(p in path for p in inside) \
        and not (path.endswith("attention.py") and key[2] in ("attend", "store_kv"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = [profile_steps(b, s, args.steps) for b in args.batch for s in (False, True)]
    print(f"{'batch':>6}{'sampled':>8}{'step ms':>9}{'model ms':>9}{'host ms':>9}")
    for r in rows:
        print(f"{r['batch']:>6}{r['sampled']!s:>8}{r['step_ms_profiled']:>9}{r['model_ms']:>9}"
              f"{r['host_ms']:>9}")
        for t, name in r["top_host_us_tottime"][:5]:
            print(f"{'':>10}{t:>9} us  {name}")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
