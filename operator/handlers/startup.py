"""Operator start-up: Kopf settings, login, and the clients kept in the memo."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import kopf

from loraplane.engine.config import NAMED_SHAPES
from loraplane.operator.agents import AgentDirectory
from loraplane.operator.handlers.context import OperatorContext
from loraplane.operator.kube import KubeClient
from loraplane.operator.registry import make_registry

log = logging.getLogger("loraplane.operator")


@dataclass(frozen=True)
class Options:
    """What the command line decided (see loraplane/operator/cli.py)."""

    base_model: str
    served_model_name: str | None
    agent_urls: tuple[str, ...]
    agent_service: str | None
    redis_url: str | None
    max_rank: int
    max_bytes: int
    retry_base: float
    retry_cap: float
    peering_lifetime: int = 60


def configure(settings: kopf.OperatorSettings, memo: kopf.Memo) -> None:
    """Keep Kopf's bookkeeping in annotations so status holds only what users read."""
    opts: Options = memo.options
    settings.persistence.finalizer = "loraplane.io/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="loraplane.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="loraplane.io", key="last-handled-configuration")
    settings.posting.level = logging.WARNING  # our own Ready/failure events, not handler chatter
    settings.networking.request_timeout = 60
    # A replica killed without saying goodbye blocks its peers this long.
    settings.peering.lifetime = opts.peering_lifetime
    model = NAMED_SHAPES[opts.base_model]
    memo.ctx = OperatorContext(
        model=model, served_model_name=opts.served_model_name or model.name,
        agents=AgentDirectory(list(opts.agent_urls), opts.agent_service),
        registry=make_registry(opts.redis_url), max_rank=opts.max_rank,
        max_bytes=opts.max_bytes, retry_base=opts.retry_base, retry_cap=opts.retry_cap,
        kube=KubeClient(memo.conn) if getattr(memo, "conn", None) else None)
    if not opts.redis_url:
        log.info("no --redis-url: adapter records for the gateway are not written")
    if not opts.agent_urls and not opts.agent_service:
        log.warning("no --agent or --agent-service: adapters cannot be placed")


def login(memo: kopf.Memo, **kwargs: Any) -> kopf.ConnectionInfo | None:
    """In-cluster service account first, then kubeconfig, as Kopf does by default."""
    conn = kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)
    memo.conn = conn
    ctx: OperatorContext | None = getattr(memo, "ctx", None)
    if ctx is not None and conn is not None:
        ctx.kube = KubeClient(conn)
    return conn


async def cleanup(memo: kopf.Memo) -> None:
    ctx: OperatorContext | None = getattr(memo, "ctx", None)
    if ctx is None:
        return
    await ctx.agents.close()
    await ctx.registry.close()
    if ctx.kube is not None:
        await ctx.kube.close()
