"""GPU benchmark of the paged decode attention kernel (not a test).

Llama-2-7B attention shapes by default (32 heads over 32 KV heads, head_dim 128, block 16, bf16),
one layer of the pool with each row's pages shuffled. For each batch and context it checks the
kernel against its torch twin, then times (medians): the kernel launched eagerly and replayed
from a CUDA graph, with the default split count and each `--splits` value; torch SDPA on the same
K/V already gathered contiguously (the dense baseline); and the current plain-torch engine path
(gather the slots, then masked SDPA). Bandwidth counts the K and V bytes a step must read.
Prints a table and writes JSON under bench/results/. `--device cpu --interpret` with tiny sizes
runs the whole script on a CPU under the Triton interpreter (its times mean nothing).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

HBM_TBS = 4.27  # measured device-to-device copy bandwidth of the H200 (PERFORMANCE.md)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def time_us(fn: Callable[[], object], device: torch.device, graph: bool) -> float:
    """Median microseconds per call: triton's do_bench (CUDA events) or a CPU wall clock."""
    import triton.testing

    if device.type != "cuda":
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e6
    if graph:
        return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median") * 1e3
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3


def build_case(batch: int, context: int, heads: int, kv_heads: int, head_dim: int,
               block_size: int, dtype: torch.dtype, device: torch.device,
               gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random q, a pool layer with each row's pages shuffled, and its paged metadata."""
    blocks = -(-context // block_size)
    num_pages = batch * blocks + 7
    # Like DevicePool.data[l]: [num_pages, page_elems], viewed as KV pages.
    data = torch.randn(num_pages, block_size * 2 * kv_heads * head_dim, generator=gen)
    kv = data.to(dtype).to(device).view(num_pages, block_size, 2, kv_heads, head_dim)
    perm = torch.randperm(num_pages, generator=gen)[:batch * blocks]
    tables = perm.view(batch, blocks).to(torch.int32).to(device)
    q = torch.randn(batch, heads, head_dim, generator=gen).to(dtype).to(device)
    lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    # Flat KV slots [B, context] of every key, as the current torch path gathers them.
    slots = (tables.long()[:, :, None] * block_size
             + torch.arange(block_size, device=device)).view(batch, -1)[:, :context]
    return {"q": q, "kv": kv, "tables": tables, "lens": lens, "slots": slots}


def bench_case(batch: int, context: int, args: argparse.Namespace, dev: torch.device,
               gen: torch.Generator) -> dict[str, object]:
    """Checks then times one (batch, context) point; returns its row of the results."""
    from loraplane.engine.kernels.paged_attention import (
        default_num_splits,
        paged_decode_attention,
        paged_decode_attention_ref,
    )

    dtype = DTYPES[args.dtype]
    graph = dev.type == "cuda"
    scale = 1 / math.sqrt(args.head_dim)
    group = args.heads // args.kv_heads
    tol = 2e-2 if dtype != torch.float32 else 1e-4
    c = build_case(batch, context, args.heads, args.kv_heads, args.head_dim, args.block_size,
                   dtype, dev, gen)
    q, kv, tables, lens = c["q"], c["kv"], c["tables"], c["lens"]
    ref = paged_decode_attention_ref(q, kv, tables, lens, scale)
    err = (paged_decode_attention(q, kv, tables, lens, scale).float()
           - ref.float()).abs().max().item()
    assert err <= tol, f"kernel mismatch {err}"
    auto = default_num_splits(batch, args.kv_heads, tables.shape[1], args.block_size, dev)
    per_split = {}
    for splits in sorted({auto, *args.splits}):
        def kernel(splits: int = splits) -> torch.Tensor:
            return paged_decode_attention(q, kv, tables, lens, scale, num_splits=splits)
        per_split[splits] = {"eager_us": time_us(kernel, dev, False),
                             "graph_us": time_us(kernel, dev, True) if graph else None}
    # Dense baseline: the same keys already contiguous, [B, kvh, context, hd].
    flat = kv.view(-1, 2, args.kv_heads, args.head_dim)
    gathered = flat[c["slots"]]  # [B, context, 2, kvh, hd]
    keys = gathered[:, :, 0].transpose(1, 2).contiguous()
    vals = gathered[:, :, 1].transpose(1, 2).contiguous()
    q4 = q.view(batch, args.kv_heads, group, args.head_dim)  # GQA as in attention.py
    mask = torch.ones(batch, 1, 1, context, dtype=torch.bool, device=dev)

    def sdpa() -> torch.Tensor:
        return F.scaled_dot_product_attention(q4, keys, vals, scale=scale)

    def torch_paged() -> torch.Tensor:
        ctx = flat[c["slots"]]  # the engine's current decode path
        return F.scaled_dot_product_attention(q4, ctx[:, :, 0].transpose(1, 2),
                                              ctx[:, :, 1].transpose(1, 2), attn_mask=mask,
                                              scale=scale)

    sdpa_err = (sdpa().float().reshape(ref.shape) - ref.float()).abs().max().item()
    assert sdpa_err <= tol, f"SDPA mismatch {sdpa_err}"
    sdpa_us = time_us(sdpa, dev, graph)
    paged_us = time_us(torch_paged, dev, graph)
    kv_bytes = 2 * batch * context * args.kv_heads * args.head_dim * dtype.itemsize
    key = "graph_us" if graph else "eager_us"
    best = min(per_split, key=lambda s: per_split[s][key])
    us = per_split[auto][key]
    return {
        "batch": batch, "context": context, "auto_splits": auto, "kernel_us": round(us, 2),
        "kernel_eager_us": round(per_split[auto]["eager_us"], 2),
        "best_splits": best, "best_us": round(per_split[best][key], 2),
        "sdpa_contiguous_us": round(sdpa_us, 2), "torch_paged_us": round(paged_us, 2),
        "kv_bytes": kv_bytes, "GB_s": round(kv_bytes / us / 1e3, 1),
        "sdpa_GB_s": round(kv_bytes / sdpa_us / 1e3, 1),
        "hbm_share": round(kv_bytes / us / 1e3 / (HBM_TBS * 1e3), 3), "max_abs_err": err,
        "splits": {str(s): {k: None if v is None else round(v, 2) for k, v in t.items()}
                   for s, t in per_split.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--interpret", action="store_true", help="run Triton's CPU interpreter")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--context", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--splits", type=int, nargs="*", default=[1, 2, 4, 8, 16],
                    help="split counts timed besides the default one")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args()
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are defined, below
    import triton

    dev = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    rows = [bench_case(batch, context, args, dev, gen)
            for context in args.context for batch in args.batch]
    machine = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor()
    out = {"benchmark": "paged_decode_attention", "date": datetime.date.today().isoformat(),
           "machine": {"device": machine or "cpu", "host": platform.node(),
                       "torch": torch.__version__, "triton": triton.__version__,
                       "interpret": bool(args.interpret)},
           "config": {"heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim,
                      "block_size": args.block_size, "dtype": args.dtype},
           "note": "medians; kernel_us is a CUDA-graph replay on the GPU (eager on CPU) with the "
                   "default split count; bytes = K and V of every row's context, read once",
           "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    tag = "h200" if "H200" in str(machine) else dev.type + ("-interpret" if args.interpret else "")
    path = args.out / f"paged-attention-{tag}-{out['date']}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\n{out['machine']['device']}: paged decode attention, {args.heads} heads / "
          f"{args.kv_heads} KV heads, head_dim {args.head_dim}, block {args.block_size}, "
          f"{args.dtype}; torch {torch.__version__}, triton {triton.__version__}")
    print(f"{'batch':>6}{'ctx':>6}{'splits':>7}{'us':>10}{'eager us':>11}{'best us@splits':>16}"
          f"{'sdpa us':>10}{'torch us':>11}{'GB/s':>8}{'HBM':>6}{'sdpa GB/s':>11}")
    for r in rows:
        best = f"{r['best_us']}@{r['best_splits']}"
        print(f"{r['batch']:>6}{r['context']:>6}{r['auto_splits']:>7}{r['kernel_us']:>10}"
              f"{r['kernel_eager_us']:>11}{best:>16}"
              f"{r['sdpa_contiguous_us']:>10}{r['torch_paged_us']:>11}{r['GB_s']:>8}"
              f"{r['hbm_share']:>6.0%}{r['sdpa_GB_s']:>11}")
    print(f"-> {path}")


if __name__ == "__main__":
    main()
