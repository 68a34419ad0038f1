"""Host cost per engine step of the adapter tiers' policy on the CPU (not a test): the real
Scheduler, AdapterCache and Prefetcher over a tiny pool, no model.

2,000 adapters (ranks 8/16/32/64 round-robin, tiny shapes) are registered from in-memory
sources read on the loader threads, as folders are; the host tier holds about 300 of them and
the pool about 100 besides the KV pages. The queue is kept at `--live` requests (arrivals
refill it each step, adapter by popularity `--alpha`), each running request finishes after a
random number of decode steps. Reported per step: microseconds in the cache's `prefetch`
(the scheduler's call, `Prefetcher.run` included), in `acquire` (all admission calls of the
step), in `note_request` (arrivals), in `start_copy` (part of the first three: on the CPU the
copy itself is synchronous, on CUDA it is queued on a side stream) and in the whole
`schedule()`. Compare versions side by
side in one session: absolute CPU times drift with load.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from loraplane.engine.adapter_cache import AdapterCache
from loraplane.engine.adapter_source import MemorySource
from loraplane.engine.adapters import LoraWeights, random_lora_weights
from loraplane.engine.config import NAMED_SHAPES, EngineConfig
from loraplane.engine.memory_pool import DevicePool, PoolLayout
from loraplane.engine.sampling_params import SamplingParams
from loraplane.engine.scheduler import Scheduler
from loraplane.engine.sequence import Sequence

CONFIG = NAMED_SHAPES["tiny"]
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
RANKS = (8, 16, 32, 64)
BLOCK_SIZE = 16


def weights(rank: int, seed: int) -> LoraWeights:
    return random_lora_weights(CONFIG, rank, MODULES, seed=seed)


class Timed:
    """Wraps a bound method and adds its wall time to a counter."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.total = 0.0

    def __call__(self, *args: Any) -> Any:
        t = time.perf_counter()
        try:
            return self.fn(*args)
        finally:
            self.total += time.perf_counter() - t


def run(num_adapters: int, alpha: float, live: int, steps: int, seed: int,
        step_s: float = 0.0) -> dict[str, float]:
    layout = PoolLayout.for_model(CONFIG, BLOCK_SIZE)
    sets = [weights(r, i) for i, r in enumerate(RANKS)]  # one weight set per rank, shared
    probe = AdapterCache(DevicePool(layout, 1, torch.float32, torch.device("cpu")), CONFIG)
    mean_pages = sum(probe.pages_needed(probe.add(f"p{r}", "", w)) for r, w in
                     zip(RANKS, sets, strict=True)) / len(RANKS)
    kv_pages = live * 6  # prompts of 16 tokens, up to 80 tokens each: 5-6 pages a request
    pool = DevicePool(layout, int(kv_pages + 100 * mean_pages), torch.float32,
                      torch.device("cpu"))
    host_bytes = int(300 * mean_pages * layout.page_bytes(torch.float32))
    cache = AdapterCache(pool, CONFIG, host_cache_bytes=host_bytes, prefetch=True)
    cfg = EngineConfig(block_size=BLOCK_SIZE, max_num_seqs=64, max_num_batched_tokens=2048,
                       scheduling_policy="fcfs")
    sched = Scheduler(cfg, pool, cache)
    ads = [cache.add(f"a{i}", "", MemorySource(sets[i % len(sets)], threaded=True))
           for i in range(num_adapters)]
    timers = {name: Timed(getattr(cache, name))
              for name in ("prefetch", "acquire", "note_request", "start_copy")}
    for name, timer in timers.items():
        setattr(cache, name, timer)
    rng = random.Random(seed)
    left: dict[int, int] = {}  # id(seq) -> decode steps left once running
    ids = 0
    warm = steps // 10
    t_sched = 0.0
    for step in range(warm + steps):
        if step == warm:
            for timer in timers.values():
                timer.total = 0.0
            t_sched = 0.0
        while len(sched.waiting) + len(sched.running) < live:
            adapter = ads[min(num_adapters - 1, int(num_adapters * rng.random() ** (1 / alpha)))]
            seq = Sequence(f"r{ids}", [3] * 16, SamplingParams(max_tokens=64), adapter)
            ids += 1
            left[id(seq)] = rng.randint(8, 64)
            sched.add(seq)
            cache.note_request(adapter)
        t = time.perf_counter()
        batch = sched.schedule()
        t_sched += time.perf_counter() - t
        # The model's forward on a GPU: the engine thread waits, loader threads run.
        time.sleep(max(0.0, step_s - (time.perf_counter() - t)))
        for seq, n in zip(batch.seqs, batch.num_new, strict=True):
            if seq.num_computed == 0 and seq.adapter is not None:
                cache.admitted(seq.adapter)
            seq.num_computed += n
            if seq.num_computed == seq.num_tokens:
                left[id(seq)] -= 1
                if left[id(seq)] <= 0:
                    seq.finish_reason = "length"
                    sched.finish(seq)
                else:
                    seq.output_ids.append(7)
        if not len(batch):
            cache.wait(0.001)
    out = {f"{name}_us_per_step": round(timer.total / steps * 1e6, 1)
           for name, timer in timers.items()}
    out["schedule_us_per_step"] = round(t_sched / steps * 1e6, 1)
    s = cache.stats
    out.update(prefetch_hits=s.prefetch_hits, prefetch_misses=s.prefetch_misses,
               host_loads=s.host_loads, adapters_host=cache.num_host(),
               load_hidden_share=round(s.load_hidden_s / max(s.load_hidden_s
                                                             + s.load_exposed_s, 1e-9), 3),
               adapters_resident=cache.num_resident())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-adapters", type=int, default=2000)
    p.add_argument("--alpha", type=float, nargs="+", default=[1.0, 0.3])
    p.add_argument("--live", type=int, default=120, help="requests queued or running")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step-ms", type=float, default=0.0,
                   help="pad each step to this long, as a GPU forward would (prefetch hits "
                        "depend on time: popularity decays and retries wait in seconds)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args()
    torch.set_num_threads(1)
    results = {}
    for alpha in args.alpha:
        results[f"alpha={alpha:g}"] = r = run(args.num_adapters, alpha, args.live, args.steps,
                                              args.seed, args.step_ms / 1e3)
        print(f"alpha {alpha:g}: " + ", ".join(f"{k} {v}" for k, v in r.items()))
    if args.out is not None:
        args.out.write_text(json.dumps({"benchmark": "bench/prefetch_step.py",
                                        "args": vars(args) | {"out": str(args.out)},
                                        "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
