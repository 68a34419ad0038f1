"""`loraplane operator`: command-line arguments, then Kopf's operator loop."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random

from loraplane.engine.config import NAMED_SHAPES

HELP = """Run the LoraAdapter operator (Kopf): verifies adapters in S3, places them on GPU
nodes through the node agents, reports status conditions and events, writes the gateway's
records to Redis, and evicts everywhere on delete."""


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-model", default="smollm2-135m", choices=sorted(NAMED_SHAPES),
                   help="shape of the served base model, to check adapter shapes against")
    p.add_argument("--served-model-name", default=None,
                   help="the base model's name engines report and spec.baseModel must match "
                        "(default: the --base-model name)")
    p.add_argument("--agent", action="append", default=[], metavar="URL",
                   help="a node agent's URL (repeatable)")
    p.add_argument("--agent-service", default=os.environ.get("LORAPLANE_AGENT_SERVICE"),
                   metavar="HOST:PORT",
                   help="headless Service of the node agents: every address is an agent")
    p.add_argument("--redis-url", default=os.environ.get("LORAPLANE_REDIS_URL"),
                   help="where to write adapter records for the gateway (default: none)")
    p.add_argument("--max-lora-rank", type=int, default=256, help="refuse adapters above this")
    p.add_argument("--max-adapter-bytes", type=int, default=2 << 30,
                   help="refuse weights files larger than this many bytes")
    p.add_argument("--retry-base", type=float, default=1.0, metavar="S",
                   help="first retry delay after a transient failure; doubles up to --retry-cap")
    p.add_argument("--retry-cap", type=float, default=60.0, metavar="S")
    p.add_argument("--namespace", "-n", action="append", default=[],
                   help="watch only this namespace (repeatable; default: all namespaces)")
    p.add_argument("--peering", default=None,
                   help="Kopf peering object shared by replicas (default: Kopf's, if present)")
    p.add_argument("--priority", type=int, default=None,
                   help="peering priority: the live replica with the highest one works, the "
                        "others wait (default: random, as Kopf pauses every replica when two "
                        "share the highest priority)")
    p.add_argument("--peering-lifetime", type=int, default=60, metavar="S",
                   help="seconds after a replica's last keep-alive that its peers take over")
    p.add_argument("--recheck-interval", type=float, default=60.0, metavar="S",
                   help="how often to ask the nodes of a Ready adapter whether they still hold "
                        "it (and put it back where lost)")
    p.add_argument("--standalone", action="store_true", help="no peering")
    p.add_argument("--liveness", default="http://0.0.0.0:8080/healthz",
                   help="liveness probe endpoint ('' to disable)")
    p.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"], help="log verbosity")


def run(args: argparse.Namespace) -> int:
    """Run Kopf with our handlers until interrupted."""
    import kopf

    from loraplane.operator import main  # registers the handlers
    from loraplane.operator.handlers.startup import Options

    opts = Options(base_model=args.base_model, served_model_name=args.served_model_name,
                   agent_urls=tuple(args.agent), agent_service=args.agent_service,
                   redis_url=args.redis_url, max_rank=args.max_lora_rank,
                   max_bytes=args.max_adapter_bytes, retry_base=args.retry_base,
                   retry_cap=args.retry_cap, peering_lifetime=args.peering_lifetime)
    main.register_recheck(args.recheck_interval)
    priority = args.priority if args.priority is not None else random.randint(1, 1 << 30)
    logging.getLogger().handlers.clear()
    kopf.configure(verbose=args.log_level == "debug", log_prefix=True)  # "[ns/name] ..." lines
    asyncio.run(kopf.operator(
        clusterwide=not args.namespace, namespaces=args.namespace,
        standalone=args.standalone or None, peering_name=args.peering, priority=priority,
        liveness_endpoint=args.liveness or None, memo=kopf.Memo(options=opts)))
    return 0
