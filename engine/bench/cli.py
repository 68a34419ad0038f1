"""Arguments and runner of `loraplane bench`: build the trace, run the engine (and PEFT), report."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraplane.cli import (
    add_gpu_path_args,
    add_policy_args,
    add_tier_args,
    gpu_path_config,
    policy_config,
    tier_config,
)
from loraplane.engine.bench.workload import SETTINGS, WorkloadSpec, adapter_ranks, make_trace
from loraplane.engine.config import LORA_MODULES, EngineConfig
from loraplane.engine.distributed.lora_op import SKIP_COLLECTIVES_ENV, overlap_collectives
from loraplane.engine.kernels.common import compiled_variants, new_variants

if TYPE_CHECKING:
    from loraplane.engine.outputs import EngineStats

log = logging.getLogger(__name__)

HELP = """Replay the S-LoRA synthetic workload (Gamma arrivals, power-law adapter popularity,
uniform lengths, forced output length, ranks round-robin) against the engine in this process;
print throughput, first-token latency and SLO attainment, and write JSON. --baseline peft runs
the same requests through HF transformers + PEFT afterwards, in the same process. Several
--scheduling-policy values and --cv-sweep replay one trace per (policy, cv) on the same engine
and print one table (e.g. S-LoRA's early abort vs FCFS under overload:
--scheduling-policy fcfs abort --cv-sweep 1 2 4 8)."""


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--setting", default="S2", choices=sorted(SETTINGS),
                   help="S1: llama-2-7b ranks {8}; S2: llama-2-7b ranks {8,16,32,64}; "
                        "S4: llama-2-13b ranks {16,32,64}; S6: llama-2-70b ranks {64} (default S2)")
    p.add_argument("--model", default=None,
                   help="model spec (default random:<the setting's shape>), e.g. random:tiny")
    p.add_argument("--ranks", type=int, nargs="+", default=None,
                   help="override the setting's ranks (assigned round-robin to adapters)")
    p.add_argument("--modules", nargs="+", default=["q_proj", "k_proj", "v_proj", "o_proj"],
                   choices=LORA_MODULES, help="projections the adapters target (default q,k,v,o)")
    p.add_argument("--num-adapters", type=int, default=100, help="0 means no LoRA (base model)")
    p.add_argument("--num-requests", type=int, default=200)
    p.add_argument("--rate", type=float, default=10.0, help="arrival rate, requests/s")
    p.add_argument("--cv", type=float, default=1.0,
                   help="coefficient of variation of inter-arrival times (1: Poisson)")
    p.add_argument("--cv-sweep", type=float, nargs="+", default=None, metavar="CV",
                   help="replay one trace per cv (instead of --cv), one table")
    p.add_argument("--alpha", type=float, default=1.0,
                   help="adapter popularity numpy.random.power(alpha): 1 uniform, < 1 skewed")
    p.add_argument("--round-robin-adapters", action="store_true",
                   help="request i uses adapter i mod n (e.g. every row a different adapter)")
    p.add_argument("--saturate", action="store_true",
                   help="queue every request at t=0 (throughput at saturation)")
    p.add_argument("--input-range", type=int, nargs=2, default=[8, 512], metavar=("LO", "HI"))
    p.add_argument("--output-range", type=int, nargs=2, default=[8, 512], metavar=("LO", "HI"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sets-per-rank", type=int, default=8,
                   help="distinct random weight sets per rank that adapters share on the host")
    p.add_argument("--adapter-source", default="memory", choices=["memory", "disk"],
                   help="memory: adapters registered from shared host tensors (default); disk: "
                        "each weight set written once as a PEFT folder and every adapter "
                        "registered from a folder (header only), read into the host tier "
                        "(--host-cache-memory) when prefetch or admission needs it")
    p.add_argument("--adapter-dir", type=Path, default=None, metavar="DIR",
                   help="where --adapter-source disk writes its folders (default: a temporary "
                        "folder, removed afterwards)")
    add_tier_args(p)
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--pool-memory", type=float, default=None, metavar="GIB",
                   help="GiB of the unified pool (default: the engine's)")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--max-lora-rank", type=int, default=256)
    # The engine's own policy flags; --slo-first-token (alias --slo) is also the SLO that
    # attainment is counted against.
    add_policy_args(p, several=True, slo_aliases=("--slo",))
    p.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                   help="shard the model and adapters over N GPUs (gloo ranks on CPU)")
    add_gpu_path_args(p)
    p.add_argument("--baseline", default="none", choices=["none", "peft"],
                   help="peft: also run the same requests through HF transformers + PEFT")
    p.add_argument("--peft-batch-size", type=int, default=32,
                   help="requests per generate() call of the PEFT baseline")
    p.add_argument("--profile-steps", type=int, nargs=2, default=None, metavar=("FIRST", "N"),
                   help="run torch.profiler over steps FIRST..FIRST+N-1 of the first replay and "
                        "write kernel and host-time tables next to the JSON (those steps' "
                        "timings then include the profiler's overhead); with tensor "
                        "parallelism each worker writes its own, named -rankN")
    p.add_argument("--profile-python", action="store_true",
                   help="with --profile-steps: profile those steps' Python functions on the "
                        "engine's host thread (cProfile) instead of torch ops and kernels: where "
                        "a host-bound step's time goes")
    p.add_argument("--out", type=Path, default=Path("bench/results"), help="JSON folder")
    p.add_argument("--log-level", default="warning",
                   choices=["debug", "info", "warning", "error"])


def _check(args: argparse.Namespace, ranks: tuple[int, ...]) -> None:
    if args.baseline == "peft" and (args.cv_sweep or len(args.scheduling_policy) > 1):
        raise SystemExit("--baseline peft runs with one policy and one cv")
    for name in ("num_requests", "max_num_seqs", "max_num_batched_tokens", "sets_per_rank",
                 "peft_batch_size", "tensor_parallel_size"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be positive")
    if args.tensor_parallel_size > 1 and args.baseline != "none":
        raise SystemExit("--baseline runs on one device; leave it out with "
                         "--tensor-parallel-size")
    if any(not 1 <= r <= args.max_lora_rank for r in ranks):
        raise SystemExit(f"ranks {list(ranks)} must be in [1, --max-lora-rank "
                         f"{args.max_lora_rank}]")


def tier_results(s: EngineStats) -> dict[str, float]:
    """The engine's adapter-tier counters (prefetch hits and misses, hidden and exposed load
    seconds as engine/prefetch.py defines them)."""
    t = s.tiers
    return {"prefetch_hits": t.prefetch_hits, "prefetch_misses": t.prefetch_misses,
            "prefetch_unused": t.prefetch_unused,
            "adapter_load_hidden_s": t.load_hidden_s, "adapter_load_exposed_s": t.load_exposed_s,
            "adapter_copy_hidden_s": t.copy_hidden_s, "adapter_copy_exposed_s": t.copy_exposed_s,
            "queued_copy_hidden_s": t.queued_copy_hidden_s,
            "queued_copy_exposed_s": t.queued_copy_exposed_s, "queued_loads": t.queued_loads,
            "adapter_load_failures": t.load_failures, "adapter_host_loads": t.host_loads,
            "host_cache_gib": round(s.host_cache_bytes_total / 2**30, 6)}


def tier_deltas(before: dict[str, float], after: dict[str, float]) -> dict[str, float | None]:
    """The tier counters of one replay (after - before) and the hidden share of load time."""
    out: dict[str, float | None] = {
        k: round(v - before[k], 4) if k != "host_cache_gib" else v for k, v in after.items()}
    for share, hidden_key, exposed_key in (
            ("adapter_load_hidden_share", "adapter_load_hidden_s", "adapter_load_exposed_s"),
            ("adapter_copy_hidden_share", "adapter_copy_hidden_s", "adapter_copy_exposed_s"),
            ("queued_copy_hidden_share", "queued_copy_hidden_s", "queued_copy_exposed_s")):
        hidden, exposed = out[hidden_key] or 0, out[exposed_key] or 0
        out[share] = round(hidden / (hidden + exposed), 4) if hidden + exposed > 0 else None
    return out


def run(args: argparse.Namespace) -> int:
    """Run the benchmark described by the arguments; prints a table and writes JSON."""
    # torch and the engine load here, not when `loraplane` builds its argument parsers.
    import torch

    from loraplane.engine.bench import report
    from loraplane.engine.bench.adapters import (
        WeightSets,
        register,
        register_folders,
    )
    from loraplane.engine.bench.driver import StepProfile, replay, warm_up
    from loraplane.engine.bench.metrics import decode_steps, summarize
    from loraplane.engine.distributed.engine import build_engine, close_engine
    from loraplane.engine.policies import make_policy

    setting = SETTINGS[args.setting]
    ranks = tuple(args.ranks or setting.ranks)
    _check(args, ranks)
    model_spec = args.model or f"random:{setting.model}"
    spec = WorkloadSpec(args.num_requests, args.num_adapters, args.rate, args.cv, args.alpha,
                        tuple(args.input_range), tuple(args.output_range),
                        args.round_robin_adapters, args.seed)
    cvs = args.cv_sweep or [args.cv]
    try:
        traces = {cv: make_trace(dataclasses.replace(spec, cv=cv)) for cv in cvs}
    except ValueError as e:
        raise SystemExit(f"loraplane bench: {e}") from None
    trace = traces[cvs[0]]
    cfg = EngineConfig(
        pool_bytes=int(args.pool_memory * 2**30) if args.pool_memory else None,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        max_lora_rank=args.max_lora_rank, max_waiting=max(4096, args.num_requests),
        seed=args.seed, **policy_config(args), **tier_config(args), **gpu_path_config(args))
    t = time.monotonic()
    try:
        engine = build_engine(model_spec, tensor_parallel_size=args.tensor_parallel_size,
                              device=args.device, dtype=args.dtype, engine_config=cfg)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"loraplane bench: cannot load model {model_spec!r}: {e}") from None
    device, dtype = engine.pool.data.device, engine.pool.data.dtype
    model_cfg = engine.config
    build_s = time.monotonic() - t
    ranks_of = adapter_ranks(args.num_adapters, ranks)
    sets = None
    t = time.monotonic()
    if args.num_adapters:
        sets = WeightSets(model_cfg, ranks_of, tuple(args.modules), args.sets_per_rank,
                          args.seed, dtype, device)
    results: dict[str, dict] = {}
    path: Path | None = None
    with contextlib.ExitStack() as stack:
        names: list[str] = []
        if sets is not None and (args.adapter_source == "disk" or args.tensor_parallel_size > 1):
            # Folders on disk: the source tier, and where tensor-parallel workers read shards.
            root = args.adapter_dir or Path(stack.enter_context(
                tempfile.TemporaryDirectory(prefix="loraplane-bench-")))
            if args.adapter_source == "disk":
                names = register_folders(engine, sets, ranks_of, root)
            else:
                sets.write_folders(root)
                names = register(engine, sets, ranks_of)
        elif sets is not None:
            names = register(engine, sets, ranks_of)
        adapters_s = time.monotonic() - t
        warm_up(engine, sets, args.seed)
        stats = engine.stats()
        pool_gib = stats.pool_pages_total * stats.page_bytes / 2**30
        # cv by cv, each under every policy: a run cut short by a time limit still compares the
        # policies on the cvs it finished (the JSON is rewritten after each replay).
        runs = [(policy, cv) for cv in cvs for policy in args.scheduling_policy]
        for policy, cv in runs:
            # Each run starts from the same state: the policy's own, and no adapter on the GPU
            # or in host RAM.
            engine.scheduler.set_policy(make_policy(
                dataclasses.replace(cfg, scheduling_policy=policy)))
            engine.adapters.drop_idle()
            before = tier_results(engine.stats())
            variants = compiled_variants()
            profile = None
            if args.profile_steps and (policy, cv) == runs[0]:
                profile = StepProfile(args.out / f"profile-{args.setting}-n{args.num_adapters}-"
                                      f"{datetime.datetime.now(datetime.timezone.utc):%Y%m%dT%H%M}.txt",
                                      *args.profile_steps, engine, python=args.profile_python)
            played = replay(engine, traces[cv], names, saturate=args.saturate, seed=args.seed,
                            profile=profile)
            compiled = new_variants(variants, compiled_variants())
            stats = engine.stats()
            key = "loraplane" if len(runs) == 1 else f"{policy} cv={cv:g}"
            results[key] = {
                "scheduling_policy": policy, "cv": cv,
                **summarize(played.records, args.slo_first_token), **decode_steps(played.steps),
                **tier_deltas(before, tier_results(stats)),
                "preemptions": played.preemptions,
                "admission_held_steps": played.admission_held_steps,
                # Triton kernels compiled during the timed replay (the warm-up missed them).
                "kernel_compiles": None if compiled is None
                else sum(map(len, compiled.values())),
                "kernel_compiles_by_kernel": None if compiled is None
                else {k: len(v) for k, v in compiled.items()},
                # What was new about each (the first few; a key lists every argument's class).
                "kernel_compile_keys": None if compiled is None
                else {k: [key[:600] for key in v[:4]] for k, v in compiled.items()},
                "adapters_resident_at_end": stats.adapters_resident,
                "adapters_host_at_end": stats.adapters_host,
                "pool_pages": stats.pool_pages_total, "page_bytes": stats.page_bytes}
            path = report.write(record_of(args, cfg, model_spec, dtype, device, ranks, sets,
                                          pool_gib, trace, build_s, adapters_s, results),
                                args.out, path)
        close_engine(engine)

    if args.baseline == "peft":
        from loraplane.engine.bench.peft_baseline import load_peft, run_peft

        del engine, played  # give the device memory to the baseline
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        model = load_peft(model_cfg, trace, names, ranks_of, sets, dtype=dtype, device=device,
                          seed=args.seed)
        records = run_peft(model, trace, names, batch_size=args.peft_batch_size,
                           saturate=args.saturate, seed=args.seed,
                           vocab_size=model_cfg.vocab_size, device=device)
        results["peft"] = summarize(records, args.slo_first_token)

    record = record_of(args, cfg, model_spec, dtype, device, ranks, sets, pool_gib, trace,
                       build_s, adapters_s, results)
    if "peft" in results and results["peft"].get("output_tokens_per_s"):
        ours, peft = results["loraplane"], results["peft"]
        record["ratios"] = {
            "req_per_s_vs_peft": round(ours["req_per_s"] / peft["req_per_s"], 2),
            "output_tokens_per_s_vs_peft": round(
                ours["output_tokens_per_s"] / peft["output_tokens_per_s"], 2)}
    path = report.write(record, args.out, path)
    print(report.header(record))
    print(report.table(results))
    if "ratios" in record:
        print("loraplane / PEFT: " + ", ".join(f"{k} {v}x" for k, v in record["ratios"].items()))
    print(f"-> {path}")
    return 0


def record_of(args: argparse.Namespace, cfg: EngineConfig, model_spec: str, dtype: Any,
              device: Any, ranks: tuple[int, ...], sets: Any, pool_gib: float, trace: list[Any],
              build_s: float, adapters_s: float, results: dict[str, dict]) -> dict:
    """The JSON record of a run: machine, versions, command, configuration, trace, results."""
    import numpy as np

    from loraplane.engine.bench import report
    from loraplane.engine.bench.adapters import ADAPTER_STORAGE

    return {
        "benchmark": "loraplane bench",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": report.machine(device),
        "versions": report.versions(),
        "command": " ".join(["loraplane", "bench", *sys.argv[2:]]) if len(sys.argv) > 1 else "",
        "config": {
            "setting": args.setting, "model": model_spec,
            "tensor_parallel_size": args.tensor_parallel_size,
            "cuda_graphs": not args.no_cuda_graphs,
            "fused_layers": not args.no_fused_layers,
            "admission_batch": args.admission_batch,
            "admission_hold_steps": args.admission_hold_steps,
            # Benchmarks of the TP LoRA collectives' cost only: outputs are wrong when set.
            "tp_skip_lora_collectives": args.tensor_parallel_size > 1
            and os.environ.get(SKIP_COLLECTIVES_ENV) == "1",
            # The TP LoRA collectives overlapped with the base GEMMs (OVERLAP_ENV).
            "tp_lora_overlap": args.tensor_parallel_size > 1 and overlap_collectives(),
            "dtype": str(dtype).removeprefix(
                "torch."), "device": str(device), "ranks": list(ranks),
            "modules": list(args.modules), "num_adapters": args.num_adapters,
            "adapter_storage": ADAPTER_STORAGE[args.adapter_source] if sets is not None
            else None,
            "adapter_source": args.adapter_source if sets is not None else None,
            "host_cache_gib": round(cfg.host_cache_bytes / 2**30, 6),
            "prefetch": cfg.prefetch, "adapter_load_workers": cfg.adapter_load_workers,
            "weight_sets_per_rank": args.sets_per_rank if sets is not None else None,
            "adapter_host_gib": round(sets.host_bytes / 2**30, 3) if sets is not None else 0,
            "num_requests": args.num_requests, "saturate": args.saturate, "rate": args.rate,
            "cv": args.cv, "cv_sweep": args.cv_sweep,
            "scheduling_policies": args.scheduling_policy,
            "max_adapters_per_batch": args.max_adapters_per_batch, "alpha": args.alpha,
            "round_robin_adapters": args.round_robin_adapters,
            "input_range": list(args.input_range), "output_range": list(args.output_range),
            "slo_s": args.slo_first_token, "seed": args.seed, "max_num_seqs": args.max_num_seqs,
            "max_num_batched_tokens": args.max_num_batched_tokens, "pool_gib": round(pool_gib, 3),
            "baseline": args.baseline,
            "peft_batch_size": args.peft_batch_size if args.baseline == "peft" else None,
            "sampling": "greedy, output length forced (ignore_eos)",
        },
        "trace": {
            "distinct_adapters_used": len({r.adapter for r in trace if r.adapter is not None}),
            "mean_input_len": round(float(np.mean([r.input_len for r in trace])), 1),
            "mean_output_len": round(float(np.mean([r.output_len for r in trace])), 1),
            "span_s": round(trace[-1].arrival, 3),
        },
        "setup_s": {"engine_build": round(build_s, 2), "adapters": round(adapters_s, 2)},
        "results": results,
    }
