"""GPU benchmark of the LoRA shrink+expand kernels at decode shapes (not a test).

Llama-2-7B widths, bf16, `--batch` rows each with a different adapter (the worst case), adapters
on scattered pool pages. Checks the kernels against their torch twins in bf16, times
shrink+expand per projection as CUDA-graph replays, and reports the share of HBM bandwidth used
for the bytes they must move (A and B of every adapter, x, and y read and written). With
`--sweep` it also times shrink and expand alone over launch configurations (split-K, tile
widths, warps, pipeline stages) and reports the best of each; and it times the fused q,k,v
shrink against three separate ones.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import platform
from pathlib import Path

import torch

from loraplane.engine.adapter_cache import AdapterCache
from loraplane.engine.adapters import random_lora_weights
from loraplane.engine.config import NAMED_SHAPES
from loraplane.engine.kernels.lora_expand import lora_expand, lora_expand_ref
from loraplane.engine.kernels.lora_meta import LoraKernelMeta, build_meta
from loraplane.engine.kernels.lora_shrink import lora_shrink, lora_shrink_ref
from loraplane.engine.lora.ops import LoraSegment, TorchLoraOp
from loraplane.engine.memory_pool import DevicePool, PoolLayout

MODULES = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj")
HBM_TBS = 4.27  # measured device-to-device copy bandwidth of the H200 (PERFORMANCE.md)


SHRINK_SWEEP = [dict(split_k=sk, block_k=bk, num_warps=w, num_stages=st)
                for sk in (2, 4, 8, 16, 32) for bk in (64, 128) for w in (2, 4) for st in (2, 4)]
EXPAND_SWEEP = [dict(block_n=bn, num_warps=w, num_stages=st)
                for bn in (32, 64, 128) for w in (1, 2, 4, 8) for st in (1, 3)]


def shrink_expand(x: torch.Tensor, y: torch.Tensor, pool_layer: torch.Tensor,
                  meta: LoraKernelMeta, module: str, chunk: int, cpp: int,
                  split: int | None) -> None:
    """One projection's LoRA term with the kernels, as the engine runs it."""
    s = lora_shrink(x, pool_layer, meta, module, chunk, cpp, 16, split)
    lora_expand(s, y, pool_layer, meta, module, chunk, cpp, 16)


def separate_shrinks(x: torch.Tensor, pool_layer: torch.Tensor, meta: LoraKernelMeta,
                     modules: tuple[str, ...], chunk: int, cpp: int) -> None:
    """One shrink launch per module (default launch parameters), as before the fused shrink."""
    for m in modules:
        lora_shrink(x, pool_layer, meta, m, chunk, cpp, 16)


def best_config(fn, configs: list[dict]) -> tuple[dict, float]:  # type: ignore[no-untyped-def]
    """The fastest of fn(**config) (microseconds, graph replays) over configs."""
    timed = [(time_graph(functools.partial(fn, **c), 50), i) for i, c in enumerate(configs)]
    us, i = min(timed)
    return configs[i], us


def time_graph(fn, iters: int = 200) -> float:  # type: ignore[no-untyped-def]
    """Median-ish microseconds per call of fn, replayed from a CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            g.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000 / iters)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--split-k", type=int, nargs="+", default=[0],
                    help="split-K factors to time; 0: the kernel's own choice")
    ap.add_argument("--sweep", action="store_true", help="also sweep launch configurations")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args()
    dev = torch.device("cuda")
    cfg = NAMED_SHAPES["llama-2-7b"].with_updates(num_layers=1)
    rows = []
    for rank in args.ranks:
        n_adapters = max(args.batch)
        layout = PoolLayout.for_model(cfg, 16)
        per = layout.pages_for_chunks(rank * sum(sum(cfg.module_shape(m)) for m in MODULES)
                                      // layout.chunk)
        pool = DevicePool(layout, per * n_adapters * 2 + 8, torch.bfloat16, dev)
        cache = AdapterCache(pool, cfg)
        gen = torch.Generator().manual_seed(rank)
        spacer = []
        adapters = []
        for i in range(n_adapters):
            w = random_lora_weights(cfg, rank, MODULES, seed=gen, std=0.02, layers=1)
            a = cache.add(f"a{i}", "", w)
            while not cache.acquire(a):  # the host->GPU copy runs on a side stream
                cache.wait()
            spacer.append(pool.pages.allocate(1, "kv"))  # scatter the adapters' pages
            adapters.append(a)
        torch_op = TorchLoraOp(pool)
        for batch in args.batch:
            segs = [LoraSegment(i, i + 1, adapters[i]) for i in range(batch)]
            meta = build_meta(segs, 16, dev)
            for module in ("q_proj", "gate_proj", "down_proj"):
                fi, fo = cfg.module_shape(module)
                x = torch.randn(batch, fi, device=dev, dtype=torch.bfloat16)
                y0 = torch.randn(batch, fo, device=dev, dtype=torch.bfloat16)
                y = y0.clone()  # the timed runs accumulate into y; checks start from y0
                lay = pool.layout
                ref_s = lora_shrink_ref(x, pool.data[0], meta, module, lay.chunk,
                                        lay.chunks_per_page)
                ref_y = y0.clone()
                lora_expand_ref(ref_s, ref_y, pool.data[0], meta, module, lay.chunk,
                                lay.chunks_per_page)
                bytes_moved = batch * rank * (fi + fo) * 2 + batch * (fi + 2 * fo) * 2
                best = None
                for split in [sk or None for sk in args.split_k]:
                    got_s = lora_shrink(x, pool.data[0], meta, module, lay.chunk,
                                        lay.chunks_per_page, 16, split)
                    got_y = y0.clone()
                    lora_expand(got_s, got_y, pool.data[0], meta, module, lay.chunk,
                                lay.chunks_per_page, 16)
                    err = (got_y.float() - ref_y.float()).abs().max().item()
                    scale = ref_y.float().abs().max().item()
                    assert err <= 0.02 * scale + 0.05, f"mismatch {err} (scale {scale})"

                    us = time_graph(functools.partial(
                        shrink_expand, x, y, pool.data[0], meta, module, lay.chunk,
                        lay.chunks_per_page, split))
                    if best is None or us < best[1]:
                        best = (split, us)
                if args.sweep:
                    sk = dict(x=x, pool_layer=pool.data[0], meta=meta, module=module,
                              chunk=lay.chunk, chunks_per_page=lay.chunks_per_page, block_m=16)
                    shrink_cfg, shrink_us = best_config(functools.partial(lora_shrink, **sk),
                                                        SHRINK_SWEEP)
                    ek = dict(s=ref_s, y=y, pool_layer=pool.data[0], meta=meta, module=module,
                              chunk=lay.chunk, chunks_per_page=lay.chunks_per_page, block_m=16)
                    expand_cfg, expand_us = best_config(functools.partial(lora_expand, **ek),
                                                        EXPAND_SWEEP)
                    sweep = {"shrink": shrink_cfg, "shrink_us": round(shrink_us, 2),
                             "expand": expand_cfg, "expand_us": round(expand_us, 2),
                             "best_sum_hbm_share": round(
                                 bytes_moved / (shrink_us + expand_us) / 1e3 / (HBM_TBS * 1e3),
                                 3)}
                if module == "q_proj":
                    qkv = ("q_proj", "k_proj", "v_proj")
                    fused = {sk or "auto": round(time_graph(functools.partial(
                        lora_shrink, x, pool.data[0], meta, qkv, lay.chunk,
                        lay.chunks_per_page, 16, sk or None)), 2) for sk in (0, 2, 4, 8, 16)}
                    fused_us = fused["auto"]
                    apart_us = time_graph(functools.partial(
                        separate_shrinks, x, pool.data[0], meta, qkv, lay.chunk,
                        lay.chunks_per_page))
                batch_t = torch_op.prepare(segs)
                torch_us = time_graph(functools.partial(torch_op.apply, x, y, 0, module, batch_t),
                                      20)
                assert best is not None
                gbs = bytes_moved / best[1] / 1e3
                rows.append({"rank": rank, "batch": batch, "module": module, "in": fi, "out": fo,
                             "split_k": best[0], "us": round(best[1], 2),
                             "torch_us": round(torch_us, 1), "GB_s": round(gbs, 1),
                             "hbm_share": round(gbs / (HBM_TBS * 1e3), 3)})
                if args.sweep:
                    rows[-1]["sweep"] = sweep
                if module == "q_proj":
                    rows[-1]["qkv_shrink_fused_us"] = round(fused_us, 2)
                    rows[-1]["qkv_shrink_separate_us"] = round(apart_us, 2)
                    rows[-1]["qkv_shrink_fused_us_by_split"] = fused
                print(rows[-1], flush=True)
    name = torch.cuda.get_device_name()
    out = {"benchmark": "lora_kernels", "date": datetime.date.today().isoformat(),
           "machine": {"gpu": name, "host": platform.node(), "torch": torch.__version__},
           "note": "shrink+expand for one projection, every row a different adapter, CUDA-graph "
                   "replays; bytes = A+B of the batch's adapters + x + y read and written",
           "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"lora-kernels-h200-{out['date']}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\n{name}: LoRA shrink+expand, bf16, each row its own adapter")
    print(f"{'rank':>5}{'batch':>6}{'module':>11}{'split':>6}{'us':>9}{'torch us':>10}"
          f"{'GB/s':>8}{'HBM':>7}{'best s+e':>10}{'HBM':>6}")
    for r in rows:
        sw = r.get("sweep", {})
        best = f"{sw['shrink_us'] + sw['expand_us']:>10.2f}{sw['best_sum_hbm_share']:>6.0%}" \
            if sw else ""
        split = r["split_k"] or "auto"
        print(f"{r['rank']:>5}{r['batch']:>6}{r['module']:>11}{split:>6}{r['us']:>9}"
              f"{r['torch_us']:>10}{r['GB_s']:>8}{r['hbm_share']:>7.0%}{best}")
    for r in rows:
        if "sweep" in r:
            print(r["rank"], r["batch"], r["module"], "shrink", r["sweep"]["shrink"],
                  r["sweep"]["shrink_us"], "expand", r["sweep"]["expand"],
                  r["sweep"]["expand_us"])
        if "qkv_shrink_fused_us" in r:
            print(r["rank"], r["batch"], "qkv shrink fused", r["qkv_shrink_fused_us"],
                  "separate", r["qkv_shrink_separate_us"], "fused by split",
                  r["qkv_shrink_fused_us_by_split"])
    print(f"-> {path}")


if __name__ == "__main__":
    main()
