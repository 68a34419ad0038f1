"""The Kopf wrappers: each `@kopf.on...` handler only unpacks Kopf's arguments and delegates.

The re-check timer is registered by register_recheck(), as its interval is a command-line flag.
"""

from __future__ import annotations

from typing import Any

import kopf

from loraplane.operator.handlers import adapter, startup
from loraplane.operator.handlers.context import OperatorContext
from loraplane.operator.plan import plan_recheck_wanted
from loraplane.operator.spec import GROUP, PLURAL, VERSION

RESOURCE = (GROUP, VERSION, PLURAL)


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """Kopf settings (progress in annotations, not status) and the clients handlers use."""
    startup.configure(settings, memo)


@kopf.on.login()
def login(memo: kopf.Memo, **kwargs: Any) -> kopf.ConnectionInfo | None:
    """Log in as Kopf would, and keep the credentials for reading Secrets."""
    return startup.login(memo, **kwargs)


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    """Close the clients."""
    await startup.cleanup(memo)


@kopf.on.probe(id="agents")
async def agents_probe(memo: kopf.Memo, **_: Any) -> int:
    """Liveness detail: how many node agents answer."""
    return len(await memo.ctx.agents.discover())


@kopf.on.create(*RESOURCE)
@kopf.on.update(*RESOURCE, field="spec")
@kopf.on.resume(*RESOURCE)
async def reconcile(*, memo: Any, namespace: str | None, name: str, spec: kopf.Spec,
                    status: kopf.Status, meta: kopf.Meta, body: kopf.Body, patch: kopf.Patch,
                    retry: int, logger: kopf.Logger, **_: Any) -> None:
    """Verify, place, load; Ready when loaded on the desired nodes."""
    ctx: OperatorContext = memo.ctx
    await adapter.reconcile(ctx, namespace=namespace or "", name=name, spec=dict(spec),
                            status=dict(status), generation=int(meta.get("generation") or 0),
                            body=body, patch=patch, retry=retry, logger=logger)


@kopf.on.delete(*RESOURCE)
async def delete(*, memo: Any, namespace: str | None, name: str, status: kopf.Status,
                 body: kopf.Body, patch: kopf.Patch, retry: int, logger: kopf.Logger,
                 **_: Any) -> None:
    """Evict everywhere, unregister, drop the record; the finalizer is released after."""
    await adapter.delete(memo.ctx, namespace=namespace or "", name=name, status=dict(status),
                         body=body, patch=patch, retry=retry, logger=logger)


def _placed(status: kopf.Status, meta: kopf.Meta, **_: Any) -> bool:
    return plan_recheck_wanted(dict(status), int(meta.get("generation") or 0))


async def recheck(*, memo: Any, namespace: str | None, name: str, spec: kopf.Spec,
                  status: kopf.Status, meta: kopf.Meta, body: kopf.Body, patch: kopf.Patch,
                  logger: kopf.Logger, **_: Any) -> None:
    """Still on the desired nodes? Put it back where lost; Ready reflects what nodes hold."""
    await adapter.recheck(memo.ctx, namespace=namespace or "", name=name, spec=dict(spec),
                          status=dict(status), generation=int(meta.get("generation") or 0),
                          body=body, patch=patch, logger=logger)


def register_recheck(interval: float) -> None:
    """@kopf.timer on placed adapters every `interval` seconds (a flag, hence not at import)."""
    kopf.timer(*RESOURCE, id="recheck", interval=interval, initial_delay=interval,
               when=_placed)(recheck)
