"""GPU search over the LoRA kernels' launch variants at decode batch 64 (not a test).

For llama-2-7b widths in bf16, `--batch` rows on `--adapters` adapters (default: one adapter
per row, the worst case), it times the q,k,v group as the engine runs it (one fused shrink, one
expand into the three column blocks of a fused output) and o_proj alone, each over a grid of
launch parameters: split-K, warps and stages for the shrink; rank tile, N tile (up to two
chunks) and warps for the expand. Every variant is
checked against the torch twins first. Prints the best configurations with the share of HBM
bandwidth they reach for the bytes the step must move (A and B of the batch's adapters, x, y
read and written) and writes JSON with every timing.

Run from the repository root: `python3 bench/kernels/lora_variants.py [--ranks 16 64]`
(`--ranks 0`: S2's rank mix; `--static`: metadata as a decode graph holds it). Check the
script itself on the CPU before spending device time on it: `TRITON_INTERPRET=1 python3
bench/kernels/lora_variants.py --shape tiny --device cpu --check-only --batch 8 --ranks 0`.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import itertools
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lora_bench import HBM_TBS, time_graph  # noqa: E402

from loraplane.engine.adapter_cache import AdapterCache  # noqa: E402
from loraplane.engine.adapters import random_lora_weights  # noqa: E402
from loraplane.engine.config import NAMED_SHAPES  # noqa: E402
from loraplane.engine.kernels.lora_expand import lora_expand, lora_expand_ref  # noqa: E402
from loraplane.engine.kernels.lora_meta import (  # noqa: E402
    StaticMeta,
    StaticShape,
    build_meta,
    rank_tile,
)
from loraplane.engine.kernels.lora_shrink import lora_shrink, lora_shrink_ref  # noqa: E402
from loraplane.engine.lora.ops import LoraSegment  # noqa: E402
from loraplane.engine.memory_pool import DevicePool, PoolLayout  # noqa: E402

QKV = ("q_proj", "k_proj", "v_proj")
MODULES = QKV + ("o_proj",)


def shrink_grid(rank: int) -> list[dict]:
    return [dict(block_r=rank_tile(rank), block_k=128, split_k=sk, num_warps=w, num_stages=st)
            for sk, w, st in itertools.product((1, 2, 4, 8, 16), (2, 4, 8), (2, 4))]


def expand_grid(rank: int) -> list[dict]:
    # Rank tiles of 16 too above rank 16 (a [BLOCK_R, BLOCK_N] tile of B^T held by one warp
    # limits how many programs an SM keeps resident).
    rs = [16] if rank <= 16 else [16, 32]
    return [dict(block_r=br, block_n=bn, num_warps=w, num_stages=1)
            for br, bn, w in itertools.product(rs, (128, 256, 512), (1, 2, 4))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--adapters", type=int, nargs="+", default=[0],
                    help="distinct adapters among the rows (0: one per row)")
    ap.add_argument("--ranks", type=int, nargs="+", default=[16, 64],
                    help="adapter rank; 0: S2's mix, adapter i of rank (8, 16, 32, 64)[i %% 4]")
    ap.add_argument("--static", action="store_true",
                    help="metadata as a decode graph holds it: one tile per row (padding tiles "
                         "on a rank-0 segment) and the rank cap as max rank")
    ap.add_argument("--shape", default="llama-2-7b", choices=sorted(NAMED_SHAPES))
    ap.add_argument("--device", default="cuda",
                    help="cuda; cpu with TRITON_INTERPRET=1 and --check-only checks this script "
                         "and the kernels (float32) before device time is spent on it")
    ap.add_argument("--check-only", action="store_true", help="check every variant, time none")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args()
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    cfg = NAMED_SHAPES[args.shape].with_updates(num_layers=1)
    lay = PoolLayout.for_model(cfg, 16)
    results = []
    for rank_arg, n_adapters in itertools.product(args.ranks, args.adapters):
        n = n_adapters or args.batch
        ranks = [rank_arg or (8, 16, 32, 64)[i % 4] for i in range(n)]
        per = lay.pages_for_chunks(max(ranks) * sum(sum(cfg.module_shape(m)) for m in MODULES)
                                   // lay.chunk)
        pool = DevicePool(lay, per * n * 2 + 8, dtype, dev)
        cache = AdapterCache(pool, cfg)
        gen = torch.Generator().manual_seed(rank_arg)
        adapters = []
        for i in range(n):
            a = cache.add(f"a{i}", "", random_lora_weights(cfg, ranks[i], MODULES, seed=gen,
                                                           std=0.02, layers=1))
            while not cache.acquire(a):
                cache.wait()
            pool.pages.allocate(1, "kv")  # scatter the adapters' pages
            adapters.append(a)
        # Rows of one adapter are consecutive (the engine sorts a batch by adapter).
        owner = sorted(i * n // args.batch for i in range(args.batch))
        segs: list[LoraSegment] = []
        for i, o in enumerate(owner):
            if segs and segs[-1].adapter is adapters[o]:
                segs[-1] = LoraSegment(segs[-1].start, i + 1, adapters[o])
            else:
                segs.append(LoraSegment(i, i + 1, adapters[o]))
        if args.static:
            shape = StaticShape(tiles=args.batch, segs=args.batch + 1,
                                pages=sum(len(a.pages or []) for a in adapters),
                                max_rank=max(ranks))
            meta = StaticMeta(shape, 16, dev).fill(segs)
        else:
            meta = build_meta(segs, 16, dev)
        pl = pool.data[0]
        h = cfg.hidden_size
        for group in (QKV, ("o_proj",)):
            widths = [cfg.module_shape(m)[1] for m in group]
            x = torch.randn(args.batch, h, device=dev, dtype=dtype)
            y0 = torch.randn(args.batch, sum(widths), device=dev, dtype=dtype)
            y = y0.clone()  # the timed runs accumulate into y; checks start from y0
            ys = list(torch.split(y, widths, dim=1))
            ref_s = lora_shrink_ref(x, pl, meta, group, lay.chunk, lay.chunks_per_page)
            ref_y = y0.clone()
            w = ref_s.shape[1] // len(group)
            for j, (m, yj) in enumerate(zip(group, torch.split(ref_y, widths, dim=1),
                                            strict=True)):
                lora_expand_ref(ref_s[:, j * w:(j + 1) * w], yj, pl, meta, m, lay.chunk,
                                lay.chunks_per_page)
            size = dtype.itemsize
            bytes_moved = (sum(r * (h + wd) * size for r in ranks for wd in widths)
                           + args.batch * (h + 2 * sum(widths)) * size)
            timed: dict[str, list[tuple[float, dict]]] = {"shrink": [], "expand": []}
            # Configurations whose results differ from the torch twins: recorded, never timed.
            wrong: list[dict] = []
            for c in shrink_grid(max(ranks)):
                fn = functools.partial(lora_shrink, x, pl, meta, group, lay.chunk,
                                       lay.chunks_per_page, 16, **c)
                if not torch.allclose(fn(), ref_s, atol=0.05, rtol=0.02):
                    wrong.append(dict(c, kernel="shrink"))
                    continue
                timed["shrink"].append((0.0 if args.check_only else time_graph(fn, 50), c))
            for c in expand_grid(max(ranks)):
                got_y = y0.clone()
                lora_expand(ref_s, list(torch.split(got_y, widths, dim=1)), pl, meta,
                            list(group), lay.chunk, lay.chunks_per_page, 16, **c)
                err = (got_y.float() - ref_y.float()).abs().max().item()
                if err > 0.02 * ref_y.float().abs().max().item() + 0.05:
                    wrong.append(dict(c, kernel="expand", max_error=err))
                    continue
                fn = functools.partial(lora_expand, ref_s, ys, pl, meta, list(group),
                                       lay.chunk, lay.chunks_per_page, 16, **c)
                timed["expand"].append((0.0 if args.check_only else time_graph(fn, 50), c))
            default = functools.partial(_engine_default, x, ys, pl, meta, group, lay.chunk,
                                        lay.chunks_per_page)
            if args.check_only:
                default()
                print(f"rank {rank_arg or 'mix'}, {n} adapters, {group}: "
                      f"{sum(map(len, timed.values()))} variants match, wrong: {wrong}")
                continue
            default_us = time_graph(default)
            best = {k: min(v, key=lambda t: t[0]) for k, v in timed.items()}
            best_sum = best["shrink"][0] + best["expand"][0]
            row = {"rank": rank_arg or "mix 8/16/32/64", "batch": args.batch, "adapters": n,
                   "static_meta": args.static, "group": list(group),
                   "bytes": bytes_moved, "default_us": round(default_us, 2),
                   "default_hbm_share": round(bytes_moved / default_us / 1e6 / HBM_TBS, 3),
                   "best_sum_us": round(best_sum, 2),
                   "best_sum_hbm_share": round(bytes_moved / best_sum / 1e6 / HBM_TBS, 3),
                   "best": {k: {"us": round(v[0], 2), "config": v[1]} for k, v in best.items()},
                   "all": {k: [dict(c, us=round(us, 2)) for us, c in v]
                           for k, v in timed.items()},
                   "wrong_results": wrong}
            results.append(row)
            print({k: v for k, v in row.items() if k != "all"}, flush=True)
    if args.check_only:
        return
    name = torch.cuda.get_device_name()
    stamp = datetime.datetime.now(datetime.UTC)
    out = {"benchmark": "lora_kernel_variants", "date": stamp.isoformat(timespec="seconds"),
           "machine": {"gpu": name, "host": platform.node(), "torch": torch.__version__},
           "note": "every launch configuration timed and the best per kernel; sums of the best "
                   "shrink and best expand (each its own CUDA-graph replays); bytes = A+B of the "
                   "batch's adapters + x + y read and written; default = the engine's launch "
                   "choice",
           "rows": results}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"lora-variants-{stamp:%Y-%m-%dT%H%M}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\n{name}: LoRA kernels at decode, bf16 (us; HBM share of {HBM_TBS} TB/s)")
    print(f"{'rank':>5}{'adapt':>6}{'group':>8}{'default':>9}{'HBM':>6}{'best':>8}{'HBM':>6}"
          f"{'shrink':>8}{'expand':>8}")
    for r in results:
        b = r["best"]
        print(f"{r['rank']:>5}{r['adapters']:>6}{len(r['group']):>8}{r['default_us']:>9}"
              f"{r['default_hbm_share']:>6.0%}{r['best_sum_us']:>8}{r['best_sum_hbm_share']:>6.0%}"
              f"{b['shrink']['us']:>8}{b['expand']['us']:>8}")
    for r in results:
        print(r["rank"], r["adapters"], r["group"][0], {k: v["config"] for k, v in
                                                         r["best"].items()})
        if r["wrong_results"]:
            print("   wrong results:", r["wrong_results"])
    print(f"-> {path}")


def _engine_default(x: torch.Tensor, ys: list[torch.Tensor], pl: torch.Tensor, meta,  # type: ignore[no-untyped-def]
                    group: tuple[str, ...], chunk: int, cpp: int) -> None:
    """The group's shrink and expand with the engine's own launch choices (16-row tiles)."""
    s = lora_shrink(x, pl, meta, group, chunk, cpp, 16)
    lora_expand(s, ys, pl, meta, list(group), chunk, cpp, 16)


if __name__ == "__main__":
    main()
