"""GPU check of tensor-parallel CUDA graphs: TP=N with graphs gives TP=1's greedy tokens.

Runs the same greedy requests (mixed adapter ranks, rows without adapter, several batch sizes so
several graph buckets and rank classes replay) through three engines in turn: one GPU with
graphs, N GPUs with graphs, N GPUs eager; prints how many output tokens agree with the one-GPU
run and exits 1 if the TP runs differ from it by more than `--tolerance` of the tokens (float32
by default, so differences come from summation order only).

    python bench/tp_graph_check.py --tp 2 --out bench/results

`--tp 1` (one GPU) runs the tensor-parallel engine itself at world size 1 instead: a process
group of one rank with the real NCCL collectives of the TP LoRA op (all-gather, all-reduce),
captured in its decode graphs: the TP code path on a machine with one GPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from loraplane.engine.adapters import write_random_adapter
from loraplane.engine.bench import report
from loraplane.engine.config import LORA_MODULES, NAMED_SHAPES, EngineConfig
from loraplane.engine.distributed.engine import (
    TensorParallelEngine,
    TPOptions,
    build_engine,
    build_rank,
    close_engine,
)
from loraplane.engine.distributed.group import free_port
from loraplane.engine.engine import LLMEngine
from loraplane.engine.sampling_params import SamplingParams

RANKS = (4, 8, 16, 32)


def run(tp: int, graphs: bool, model: str, dtype: str, folders: list[Path],
        prompts: list[list[int]], names: list[str | None], max_tokens: int,
        tp_engine: bool = False) -> list[list[int]]:
    cfg = replace(EngineConfig(pool_bytes=2 << 30, max_num_seqs=64, max_lora_rank=max(RANKS)),
                  cuda_graphs=graphs)
    if tp_engine:  # the TP engine at world size 1 (--tp 1)
        opts = TPOptions(model, 1, "cuda", dtype, None, cfg, logging.INFO)
        engine: LLMEngine = build_rank(opts, 0, free_port())
    else:
        engine = build_engine(model, tensor_parallel_size=tp, device="cuda", dtype=dtype,
                              engine_config=cfg, exit_on_failure=True)
    try:
        for folder in folders:
            engine.load_adapter(folder.name, str(folder))
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        out: list[list[int]] = []
        # Batches of 1, 3, 9 and 40 requests: buckets 1, 4, 16, 48 (the last ones mix prefill
        # and decode steps as requests finish at different lengths).
        start = 0
        for size in (1, 3, 9, 40):
            part = slice(start, start + size)
            out += [s.output_ids for s in engine.generate(prompts[part], params, names[part])]
            start += size
        graphs_used = len(engine.runner.graphs.graphs) if engine.runner.graphs else 0
        print(f"tp={tp} graphs={graphs}: {graphs_used} graphs captured", flush=True)
        return out
    finally:
        if isinstance(engine, TensorParallelEngine):
            engine.close()  # also a world-1 engine: leaves its process group
        else:
            close_engine(engine)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--model", default="random:tiny",
                   help="model spec (random:<shape> for random weights)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-tokens", type=int, default=12)
    p.add_argument("--tolerance", type=float, default=0.02,
                   help="share of output tokens allowed to differ from the one-GPU run")
    p.add_argument("--out", type=Path, help="folder for a JSON record")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if torch.cuda.device_count() < args.tp:
        print(f"needs {args.tp} GPUs, found {torch.cuda.device_count()}", file=sys.stderr)
        return 2
    shape = NAMED_SHAPES[args.model.removeprefix("random:")]
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, shape.vocab_size, (int(n),), generator=gen).tolist()
               for n in torch.randint(4, 60, (53,), generator=gen)]
    with tempfile.TemporaryDirectory() as tmp:
        folders = []
        for i, rank in enumerate(RANKS):
            modules = LORA_MODULES if i % 2 == 0 else ("q_proj", "v_proj", "down_proj")
            folder = Path(tmp) / f"r{rank}"
            write_random_adapter(folder, shape, rank, modules, seed=i + 1)
            folders.append(folder)
        names: list[str | None] = [None if i % 5 == 4 else folders[i % len(folders)].name
                                   for i in range(len(prompts))]
        runs = {(tp, g, tp_run): run(tp, g, args.model, args.dtype, folders, prompts, names,
                                     args.max_tokens, tp_engine=args.tp == 1 and tp_run)
                for tp, g, tp_run in ((1, True, False), (args.tp, False, True),
                                      (args.tp, True, True))}
    base = [t for row in runs[(1, True, False)] for t in row]
    rows, failed = [], False
    for (tp, g, tp_run), out in runs.items():
        flat = [t for row in out for t in row]
        same = sum(a == b for a, b in zip(base, flat, strict=True)) / len(base)
        rows.append({"tp": tp, "cuda_graphs": g, "tp_engine": tp_run,
                     "tokens_equal_to_tp1": round(same, 4)})
        failed |= same < 1 - args.tolerance
    print(f"{'tp':>3} {'graphs':>6} {'tokens = TP1':>13}")
    for r in rows:
        print(f"{r['tp']:>3} {r['cuda_graphs']!s:>6} {r['tokens_equal_to_tp1']:>13.2%}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        now = datetime.datetime.now(datetime.timezone.utc)
        record = {"benchmark": "tp_graph_check", "date": now.isoformat(timespec="seconds"),
                  "machine": report.machine(torch.device("cuda")), "versions": report.versions(),
                  "config": vars(args) | {"out": str(args.out)}, "results": rows}
        path = args.out / f"tp-graph-check-{now:%Y-%m-%d}-tp{args.tp}.json"
        path.write_text(json.dumps(record, indent=2))
        print(f"wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
