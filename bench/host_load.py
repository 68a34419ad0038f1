"""Source->host adapter load throughput on the CPU (not a test): PEFT folders on disk read into a
real HostTier by its loader threads, as `loraplane bench --adapter-source disk` does.

`--folders` adapters of llama-2-7b shapes (S2 ranks 8/16/32/64 round-robin, q,k,v,o, bf16
safetensors written as the bench writes them) go to a temporary folder; the tier (bf16, not
pinned) is filled once untimed, so its memory is touched as pinned memory is on CUDA; then
`--loads` loads of distinct keys over those folders run with `--workers` threads, at most
2 x workers in flight (the tier's own bound for prefetch), least recently used out. Reported:
loads/s and MB/s (adapter bytes in the pool's dtype) over the timed loads, per-load seconds
p50/p99 (inside the worker: read, check, lay out), and the phases of one r64 load timed alone.
Compare versions side by side in one session: absolute CPU times drift with load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from loraplane.engine.adapter_source import FolderSource
from loraplane.engine.adapters import LoraSpec, read_header
from loraplane.engine.bench.adapters import WeightSets
from loraplane.engine.bench.report import machine, versions
from loraplane.engine.bench.workload import SETTINGS
from loraplane.engine.config import NAMED_SHAPES, EngineConfig
from loraplane.engine.host_tier import HostTier
from loraplane.engine.memory_pool import PoolLayout

CONFIG = NAMED_SHAPES["llama-2-7b"]
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
DTYPE = torch.bfloat16
LIMITS = {"max_rank": EngineConfig.max_lora_rank, "max_bytes": EngineConfig.max_adapter_bytes}


def write_folders(root: Path, n: int, seed: int) -> list[FolderSource]:
    """n PEFT folders of S2's ranks (as many of each), as the bench writes them; their sources
    (loads take them round-robin by key, so ranks mix)."""
    s2 = SETTINGS["S2"].ranks
    per_rank = -(-n // len(s2))
    # Entry j uses weight set j mod per_rank of its rank: per_rank entries per rank in a row.
    ranks = [r for r in s2 for _ in range(per_rank)][:n]
    sets = WeightSets(CONFIG, ranks, MODULES, per_rank=per_rank, seed=seed, dtype=DTYPE,
                      device=torch.device("cpu"))
    sets.write_folders(root)
    sources = []
    for j, rank in enumerate(ranks):
        folder = sets.folders[(rank, j % sets.per_rank)]
        spec = read_header(folder, f"a{j}", CONFIG, **LIMITS)
        sources.append(FolderSource(folder, f"a{j}", CONFIG, spec, **LIMITS))
    return sources


def pages_of(spec: LoraSpec, layout: PoolLayout) -> int:
    return -(-spec.elems_per_layer(CONFIG) // layout.page_elems_per_layer)


def run_loads(tier: HostTier[int], sources: list[FolderSource], keys: range,
              layout: PoolLayout) -> tuple[float, list[float], int]:
    """Load one distinct key per entry of `keys` (source key mod n); (wall s, per-load s, bytes)."""
    pending = list(keys)
    seconds: list[float] = []
    nbytes = 0
    t = time.perf_counter()
    while pending or tier.num_loading:
        while pending and tier.num_loading < tier.max_loading:
            key = pending[0]
            src = sources[key % len(sources)]
            # Anything loaded may go: the benchmark keeps nothing.
            if not tier.start(key, src, pages_of(src.spec, layout), lambda k: True):
                break
            pending.pop(0)
            nbytes += src.spec.elems_per_layer(CONFIG) * CONFIG.num_layers * DTYPE.itemsize
        tier.wait(0.05)
        for key, error in tier.poll():
            if error is not None:
                raise error
            seconds.append(tier.read_seconds(key))
    return time.perf_counter() - t, seconds, nbytes


def phases(source: FolderSource, layout: PoolLayout, repeats: int) -> dict[str, float]:
    """Median seconds of each phase of one load, alone on this thread: config (the folder and
    its config checked again), header (opened, parsed, offsets checked, mapped), copy
    (read from the mapping, dtype converted, B^T scaled, laid out into the pages), check
    (finite values)."""
    pages = [torch.zeros(CONFIG.num_layers, layout.page_elems_per_layer, dtype=DTYPE)
             for _ in range(pages_of(source.spec, layout))]  # touched, as the tier's blocks
    runs: list[dict[str, float]] = []
    for _ in range(repeats):
        timings: dict[str, float] = {}
        t = time.perf_counter()
        source.write_pages(CONFIG, pages, phases=timings)
        timings["total"] = time.perf_counter() - t
        runs.append(timings)
    return {k: round(statistics.median(r[k] for r in runs), 4) for k in runs[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--folders", type=int, default=8, help="adapter folders written (default 8)")
    p.add_argument("--loads", type=int, default=32, help="timed loads (default 32)")
    p.add_argument("--workers", type=int, default=EngineConfig.adapter_load_workers,
                   help=f"loader threads (default {EngineConfig.adapter_load_workers})")
    p.add_argument("--host-gib", type=float, default=1.0, help="host tier GiB (default 1)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--phase-repeats", type=int, default=3, help="0: no phase breakdown")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default bench/results/host-load-DATE-CPU-wW.json)")
    args = p.parse_args()
    layout = PoolLayout.for_model(CONFIG, args.block_size)
    with tempfile.TemporaryDirectory(prefix="host-load-") as tmp:
        t = time.perf_counter()
        sources = write_folders(Path(tmp), args.folders, args.seed)
        print(f"wrote {args.folders} folders in {time.perf_counter() - t:.1f} s")
        tier: HostTier[int] = HostTier(int(args.host_gib * 2**30), CONFIG, layout, DTYPE,
                                       pin=False, workers=args.workers)
        # Untimed: loads until the tier is full and has evicted (its memory touched once, as
        # pinned memory is on CUDA; the files in the page cache, as the bench's just written).
        mean = statistics.mean(tier.nbytes(pages_of(s.spec, layout)) for s in sources)
        warm = int(tier.capacity / mean) + len(sources)
        run_loads(tier, sources, range(-warm, 0), layout)
        wall, seconds, nbytes = run_loads(tier, sources, range(args.loads), layout)
        r64 = next(s for s in sources if s.spec.rank == max(s.spec.rank for s in sources))
        phase_s = phases(r64, layout, args.phase_repeats) if args.phase_repeats else {}
    seconds.sort()
    results = {
        "loads": len(seconds), "wall_s": round(wall, 3),
        "loads_per_s": round(len(seconds) / wall, 2), "mb_per_s": round(nbytes / wall / 1e6, 1),
        "load_s_p50": round(statistics.median(seconds), 4),
        "load_s_p99": round(seconds[min(len(seconds) - 1, int(0.99 * len(seconds)))], 4),
        "mean_adapter_mb": round(nbytes / len(seconds) / 1e6, 1),
        "phases_r64_s": phase_s}
    print(", ".join(f"{k} {v}" for k, v in results.items()))
    date = datetime.now(timezone.utc)
    m = machine(torch.device("cpu"))
    record = {"benchmark": "bench/host_load.py", "date": date.isoformat(timespec="seconds"),
              "machine": m, "versions": versions(),
              "args": vars(args) | {"out": str(args.out)}, "results": results}
    out = args.out or Path(__file__).parent / "results" / (
        f"host-load-{date:%Y-%m-%d}-{m['cpu'].split()[0].lower()}-w{args.workers}.json")
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
