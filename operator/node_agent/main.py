"""`loraplane node-agent`: command-line arguments and the HTTP server."""

from __future__ import annotations

import argparse
import os
import re
import socket
from pathlib import Path

from aiohttp import web

from loraplane.operator.node_agent.app import NodeAgent, build_app
from loraplane.operator.node_agent.cache import AdapterCache

HELP = """Run the node agent (a DaemonSet on GPU nodes): keeps LoRA adapters in a host-RAM
folder (tmpfs) shared with the engines of the node, pulls them from S3 on the operator's
request, verifies their checksum while streaming, evicts the least recently used ones when the
cache is full, and registers them with the engines."""

_UNITS = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "ki": 2**10, "mi": 2**20, "gi": 2**30}


def parse_bytes(text: str) -> int:
    """'512MiB', '2G', '1000' -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmg]i?)?b?\s*", text.lower())
    if m is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2) or ""])


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-dir", type=Path, default=Path("/dev/shm/loraplane"),
                   help="host-RAM folder shared with the engines (default /dev/shm/loraplane)")
    p.add_argument("--capacity", type=parse_bytes, default=parse_bytes("8GiB"),
                   help="bytes the cache may hold, e.g. 8GiB (default); LRU evicts beyond")
    p.add_argument("--max-adapter-bytes", type=parse_bytes, default=parse_bytes("2GiB"),
                   help="refuse weights files larger than this (default 2GiB)")
    p.add_argument("--engine", action="append", default=[], metavar="URL",
                   help="an engine on this node, e.g. http://127.0.0.1:8000 (repeatable)")
    p.add_argument("--node-name", default=os.environ.get("NODE_NAME") or socket.gethostname(),
                   help="this node's name (default $NODE_NAME, else the host name)")
    p.add_argument("--label", action="append", default=[], metavar="KEY=VALUE",
                   help="a node label placement selectors can match (repeatable)")
    p.add_argument("--resync-interval", type=float, default=15.0, metavar="S",
                   help="seconds between re-registering cached adapters with engines")
    p.add_argument("--host", default="0.0.0.0", help="address to bind (default 0.0.0.0)")
    p.add_argument("--port", type=int, default=8090, help="port to bind (default 8090)")
    p.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"], help="log verbosity")


def run(args: argparse.Namespace) -> int:
    """Serve the agent until interrupted."""
    labels = {}
    for item in args.label:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--label {item!r}: expected KEY=VALUE")
        labels[key] = value
    cache = AdapterCache(args.cache_dir, args.capacity)
    agent = NodeAgent(args.node_name, labels, cache, args.engine, args.max_adapter_bytes)
    web.run_app(build_app(agent, args.resync_interval), host=args.host, port=args.port,
                print=None, access_log=None)
    return 0
