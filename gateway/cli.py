"""Arguments and entry points of `loraplane gateway` and `loraplane tenants` (stdlib only here)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any


def add_gateway_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redis-url", help="Redis holding all state (default "
                   "redis://127.0.0.1:6379/0)")
    p.add_argument("--engine", action="append", dest="engines", metavar="URL",
                   help="base URL of an engine replica (repeatable)")
    p.add_argument("--k8s-selector", metavar="SELECTOR",
                   help="also discover engine pods with this label selector (in a pod, "
                   "or with --k8s-api)")
    p.add_argument("--k8s-namespace", help="namespace of the engine pods (default: the "
                   "gateway pod's own)")
    p.add_argument("--k8s-port", type=int, help="engine port if the pod names no port 'http' "
                   "(default 8000)")
    p.add_argument("--k8s-api", metavar="URL", help="Kubernetes API base URL (default: in-cluster "
                   "https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT)")
    p.add_argument("--k8s-token-file", type=Path, metavar="FILE", help="bearer token for the "
                   "Kubernetes API (default: the pod's service-account token)")
    p.add_argument("--host", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to bind (default 8080)")
    p.add_argument("--admin-token-file", type=Path, metavar="FILE",
                   help="file holding the admin API's bearer token")
    p.add_argument("--load-epsilon", type=float, help="load bound: no replica above (1 + e) x "
                   "the mean (default 0.25)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="log verbosity")


def run_gateway(args: argparse.Namespace) -> int:
    """Serve the gateway with flags over LORAPLANE_GATEWAY_* settings."""
    from pydantic import ValidationError

    from loraplane.gateway.main import run
    from loraplane.gateway.settings import Settings

    names = ("redis_url", "engines", "k8s_selector", "k8s_namespace", "k8s_port", "k8s_api",
             "k8s_token_file", "host", "port", "admin_token_file", "load_epsilon", "log_level")
    flags = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    try:
        settings = Settings(**flags)
    except ValidationError as e:
        raise SystemExit(f"loraplane gateway: {e}") from None
    if not settings.engines and not settings.k8s_selector:
        raise SystemExit("loraplane gateway: give --engine URL or --k8s-selector")
    run(settings)
    return 0


def add_tenants_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=os.environ.get("LORAPLANE_GATEWAY_URL",
                                                   "http://127.0.0.1:8080"),
                   help="the gateway (default $LORAPLANE_GATEWAY_URL or http://127.0.0.1:8080)")
    p.add_argument("--admin-token-file", type=Path, metavar="FILE",
                   help="file holding the admin token (default $LORAPLANE_GATEWAY_ADMIN_TOKEN)")
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    sub.add_parser("list", help="list tenants")
    for name, text in (("show", "one tenant"), ("delete", "delete a tenant and its keys"),
                       ("keys", "list a tenant's keys"), ("usage", "a tenant's usage")):
        sub.add_parser(name, help=text).add_argument("tenant")
    for name, text in (("create", "create a tenant"), ("set-limits", "replace its limits")):
        s = sub.add_parser(name, help=text)
        s.add_argument("tenant")
        s.add_argument("--rpm", type=int, help="requests per minute")
        s.add_argument("--tpm", type=int, help="tokens per minute")
        s.add_argument("--max-concurrent", type=int, help="concurrent requests")
    s = sub.add_parser("add-key", help="create a key (printed once)")
    s.add_argument("tenant")
    s.add_argument("--name", default="", help="a label for the key")
    s = sub.add_parser("revoke-key", help="revoke a key by id")
    s.add_argument("tenant")
    s.add_argument("key_id")
    s = sub.add_parser("share", help="register an adapter <tenant>/<name> and set its sharing")
    s.add_argument("adapter")
    s.add_argument("--public", action="store_true", help="every tenant may use it")
    s.add_argument("--with", dest="shared_with", action="append", default=[], metavar="TENANT",
                   help="a tenant that may use it (repeatable)")
    s = sub.add_parser("unregister", help="remove an adapter from the registry")
    s.add_argument("adapter")
    sub.add_parser("adapters", help="list registered adapters")
    sub.add_parser("replicas", help="list engine replicas and what they hold")
    sub.add_parser("new-key", help="print a new key and its hash (offline)")


def _limits(args: argparse.Namespace) -> dict[str, int | None]:
    return {"requests_per_minute": args.rpm, "tokens_per_minute": args.tpm,
            "max_concurrent_requests": args.max_concurrent}


def run_tenants(args: argparse.Namespace) -> int:
    """Run one admin action and print its JSON answer."""
    from loraplane.gateway.keys import hash_key, new_key

    if args.action == "new-key":
        key = new_key()
        print(json.dumps({"key": key, "hash": hash_key(key)}, indent=2))
        return 0
    t = getattr(args, "tenant", "")
    calls: dict[str, tuple[str, str, Any]] = {
        "list": ("GET", "/tenants", None),
        "show": ("GET", f"/tenants/{t}", None),
        "delete": ("DELETE", f"/tenants/{t}", None),
        "keys": ("GET", f"/tenants/{t}/keys", None),
        "usage": ("GET", f"/tenants/{t}/usage", None),
        "create": ("POST", "/tenants", {"name": t, "limits": _limits(args)}
                   if args.action == "create" else None),
        "set-limits": ("PUT", f"/tenants/{t}/limits", _limits(args)
                       if args.action == "set-limits" else None),
        "add-key": ("POST", f"/tenants/{t}/keys", {"name": getattr(args, "name", "")}),
        "revoke-key": ("DELETE", f"/tenants/{t}/keys/{getattr(args, 'key_id', '')}", None),
        "share": ("PUT", f"/adapters/{getattr(args, 'adapter', '')}",
                  {"public": getattr(args, "public", False),
                   "shared_with": getattr(args, "shared_with", [])}),
        "unregister": ("DELETE", f"/adapters/{getattr(args, 'adapter', '')}", None),
        "adapters": ("GET", "/adapters", None),
        "replicas": ("GET", "/replicas", None),
    }
    method, path, body = calls[args.action]
    status, answer = admin_call(args.url, _admin_token(args.admin_token_file), method, path,
                                body)
    if answer is not None:
        print(json.dumps(answer, indent=2))
    return 0 if status < 400 else 1


def _admin_token(path: Path | None) -> str:
    token = path.read_text().strip() if path else os.environ.get(
        "LORAPLANE_GATEWAY_ADMIN_TOKEN", "")
    if not token:
        raise SystemExit("loraplane tenants: no admin token (--admin-token-file or "
                         "LORAPLANE_GATEWAY_ADMIN_TOKEN)")
    return token


def admin_call(url: str, token: str, method: str, path: str,
               body: Any = None) -> tuple[int, Any]:
    """(status, JSON answer or None) of one admin API call."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        url.rstrip("/") + "/admin/v1" + path, data=data, method=method,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    except urllib.error.URLError as e:
        raise SystemExit(f"loraplane tenants: cannot reach {url}: {e.reason}") from None
    if status >= 400:
        print(f"error {status}", file=sys.stderr)
    return status, json.loads(raw) if raw else None
