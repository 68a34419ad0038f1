"""Reconcile one LoraAdapter: verify in S3, place on nodes through their agents, report status.

Each function returns normally when the adapter is Ready (or gone), raises
kopf.TemporaryError(delay=...) when S3, an agent or Redis is unreachable, and
kopf.PermanentError after writing phase Failed with a reason when the adapter is bad.
"""

from __future__ import annotations

import asyncio
import datetime
from typing import Any

import kopf
from pydantic import ValidationError

from loraplane.operator import s3
from loraplane.operator.agents import AgentRejected
from loraplane.operator.handlers.context import OperatorContext
from loraplane.operator.kube import SecretError
from loraplane.operator.plan import (
    NODE_LOST,
    AgentInfo,
    build_conditions,
    build_engine_name,
    build_record,
    plan_placement,
    plan_recheck,
    plan_version,
)
from loraplane.operator.registry import RegistryUnavailable
from loraplane.operator.spec import LoraAdapterSpec
from loraplane.operator.verify import AdapterFacts, AdapterRejected, verify


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class _Status:
    """Accumulates one status write into Kopf's patch (applied after the handler, even failed)."""

    def __init__(self, patch: kopf.Patch, status: dict[str, Any], generation: int) -> None:
        self.patch = patch
        self.previous = list(status.get("conditions") or [])
        self.generation = generation

    def build(self, phase: str, stage: str, ok: bool | None, reason: str, message: str,
              **fields: Any) -> dict[str, Any]:
        return {"phase": phase, "reason": reason, "message": message[:1024],
                "observedGeneration": self.generation,
                "conditions": build_conditions(stage, ok, reason, message, self.generation,
                                               _now(), self.previous),
                **fields}

    def set(self, phase: str, stage: str, ok: bool | None, reason: str, message: str,
            **fields: Any) -> None:
        self.patch.status.update(self.build(phase, stage, ok, reason, message, **fields))

    async def show(self, ctx: OperatorContext, namespace: str, name: str, phase: str,
                   stage: str, ok: bool | None, reason: str, message: str,
                   **fields: Any) -> None:
        """Write this status through the API now, for a person to see while the handler runs."""
        if ctx.kube is not None:
            await ctx.kube.patch_status(namespace, name, self.build(
                phase, stage, ok, reason, message, **fields))


def _facts_fields(facts: AdapterFacts) -> dict[str, Any]:
    return {"rank": facts.rank, "modules": list(facts.modules), "sizeBytes": facts.size_bytes}


async def _location(ctx: OperatorContext, namespace: str, spec: LoraAdapterSpec
                    ) -> s3.S3Location:
    src = spec.source.s3
    bucket, prefix = s3.parse_uri(src.uri)
    key_id = secret = None
    if src.credentials_secret_ref is not None:
        if ctx.kube is None:
            raise SecretError("no Kubernetes client to read credentialsSecretRef",
                              transient=False)
        key_id, secret = await ctx.kube.s3_credentials(namespace,
                                                       src.credentials_secret_ref.name)
    return s3.S3Location(bucket, prefix, src.endpoint, src.region, key_id, secret)


def _agent_body(loc: s3.S3Location, spec: LoraAdapterSpec) -> dict[str, Any]:
    source: dict[str, Any] = {"uri": spec.source.s3.uri, "endpoint": loc.endpoint,
                              "region": loc.region}
    if loc.access_key_id:
        source |= {"accessKeyId": loc.access_key_id, "secretAccessKey": loc.secret_access_key}
    return {"source": source, "sha256": spec.sha256}


def _fail(st: _Status, body: Any, stage: str, reason: str, message: str, **fields: Any) -> None:
    st.set("Failed", stage, False, reason, message, **({"readyNodes": 0} | fields))
    kopf.warn(body, reason=reason, message=message[:1024])


async def _evict_everywhere(ctx: OperatorContext, agents: list[AgentInfo], namespace: str,
                            name: str, version: str | None) -> list[str]:
    """Evict from every agent; the nodes that could not be reached."""
    results = await asyncio.gather(*(ctx.agents.evict(a, namespace, name, version)
                                     for a in agents), return_exceptions=True)
    return [a.node for a, r in zip(agents, results, strict=True)
            if isinstance(r, BaseException)]


async def reconcile(ctx: OperatorContext, *, namespace: str, name: str, spec: dict[str, Any],
                    status: dict[str, Any], generation: int, body: Any, patch: kopf.Patch,
                    retry: int, logger: Any) -> None:
    """Bring one adapter to Ready on the desired number of nodes (create, update, resume)."""
    st = _Status(patch, status, generation)
    try:
        parsed = LoraAdapterSpec.model_validate(dict(spec))
    except ValidationError as e:
        _fail(st, body, "Verified", "InvalidSpec", str(e))
        raise kopf.PermanentError(f"invalid spec: {e}") from None
    version = plan_version(parsed)
    engine_name = build_engine_name(namespace, name, version)
    if parsed.base_model != ctx.served_model_name:
        _fail(st, body, "Verified", "BaseModelMismatch",
              f"baseModel {parsed.base_model!r} is not served here; the engines serve "
              f"{ctx.served_model_name!r}", version=version)
        raise kopf.PermanentError("base model mismatch")

    # 1. Verify in S3: config + safetensors header, without downloading the weights.
    try:
        loc = await _location(ctx, namespace, parsed)
        facts = await asyncio.to_thread(
            verify, loc, ctx.model, name=f"{namespace}/{name}", max_rank=ctx.max_rank,
            max_bytes=ctx.max_bytes, sha256=parsed.sha256)
    except AdapterRejected as e:
        _fail(st, body, "Verified", e.reason, e.message, version=version)
        raise kopf.PermanentError(f"{e.reason}: {e.message}") from None
    except (s3.SourceError, SecretError) as e:
        if isinstance(e, SecretError) and not e.transient:
            _fail(st, body, "Verified", "CredentialsInvalid", str(e), version=version)
            raise kopf.PermanentError(str(e)) from None
        reason = e.reason if isinstance(e, s3.SourceError) else "CredentialsUnavailable"
        delay = ctx.backoff(retry)
        st.set("Pending", "Verified", None, reason, f"{e}; retrying in {delay:.0f}s",
               version=version)
        raise kopf.TemporaryError(str(e), delay=delay) from None
    except ValueError as e:  # an s3:// URI the schema let through
        _fail(st, body, "Verified", "InvalidSource", str(e), version=version)
        raise kopf.PermanentError(str(e)) from None

    # 2. Place: pick agents, ask each to cache and register this version.
    agents = await ctx.agents.discover()
    previous_nodes = {n["name"]: n for n in status.get("nodes") or []}
    current = {n for n, v in previous_nodes.items() if v.get("version") == version}
    chosen = plan_placement(agents, parsed, current, facts.size_bytes)
    want = parsed.placement.nodes
    if status.get("version") != version or status.get("phase") not in ("Fetching", "Ready"):
        # Kopf writes our patch only when the handler returns: show progress now (not on a
        # resume of a Ready adapter, which would flap to Fetching and back).
        await st.show(ctx, namespace, name, "Fetching", "Cached", None, "Fetching",
                      f"fetching version {version} onto {len(chosen)} node(s)",
                      version=version, engineName=engine_name, desiredNodes=want,
                      **_facts_fields(facts))
    results = await asyncio.gather(
        *(ctx.agents.put(a, namespace, name, version, _agent_body(loc, parsed)) for a in chosen),
        return_exceptions=True)
    nodes: list[dict[str, Any]] = []
    rejected: AgentRejected | None = None
    unavailable: list[str] = []
    for agent, result in zip(chosen, results, strict=True):
        node = {"name": agent.node, "version": version}
        if isinstance(result, AgentRejected):
            rejected = rejected or result
            node |= {"state": "Failed", "message": f"{result.reason}: {result.message}"[:512]}
        elif isinstance(result, BaseException):
            unavailable.append(agent.node)
            message = getattr(result, "message", repr(result))
            node |= {"state": "Unavailable", "message": str(message)[:512]}
        else:
            node |= {"state": "Loaded", "engines": list(result.get("engines", []))}
        nodes.append(node)
    ready = [n for n in nodes if n["state"] == "Loaded"]
    fields = {"version": version, "engineName": engine_name, "nodes": nodes,
              "desiredNodes": want, "readyNodes": len(ready), **_facts_fields(facts)}

    if rejected is not None:
        stuck = await _evict_everywhere(ctx, chosen, namespace, name, version)
        _fail(st, body, "Cached", rejected.reason, f"node {rejected.node}: {rejected.message}",
              **(fields | {"readyNodes": 0, "nodes": nodes}))
        if stuck:
            logger.warning("could not evict %s from %s", engine_name, stuck)
        raise kopf.PermanentError(f"{rejected.reason}: {rejected.message}")
    if len(ready) < want:
        delay = ctx.backoff(retry)
        if unavailable:
            reason = "AgentUnavailable"
            message = f"nodes {unavailable} did not answer"
        else:
            reason = "NotEnoughNodes"
            message = (f"{len(chosen)} eligible node(s) for {want} wanted "
                       f"(base model {parsed.base_model}, selector "
                       f"{parsed.placement.node_selector or {}})")
        st.set("Fetching", "Loaded", None, reason, f"{message}; retrying in {delay:.0f}s",
               **fields)
        raise kopf.TemporaryError(message, delay=delay)

    # 3. Ready: publish the record first (the gateway then forwards under this version's name),
    # then retire other versions and nodes no longer chosen.
    try:
        await ctx.registry.put(build_record(namespace, name, parsed, version))
    except RegistryUnavailable as e:
        delay = ctx.backoff(retry)
        st.set("Fetching", "Ready", None, "RegistryUnavailable", str(e), **fields)
        raise kopf.TemporaryError(str(e), delay=delay) from None
    chosen_nodes = {a.node for a in chosen}
    for agent in agents:
        old = previous_nodes.get(agent.node)
        if agent.node not in chosen_nodes and old is not None:
            await _evict_everywhere(ctx, [agent], namespace, name, None)
        elif old is not None and old.get("version") not in (None, version):
            await _evict_everywhere(ctx, [agent], namespace, name, old["version"])
    message = f"version {version} loaded on {len(ready)}/{want} node(s)"
    st.set("Ready", "Ready", True, "Loaded", message, **fields)
    if status.get("phase") != "Ready" or status.get("version") != version:
        kopf.event(body, type="Normal", reason="Ready", message=message)


async def recheck(ctx: OperatorContext, *, namespace: str, name: str, spec: dict[str, Any],
                  status: dict[str, Any], generation: int, body: Any, patch: kopf.Patch,
                  logger: Any) -> None:
    """Ask the nodes of a placed adapter whether they still hold its version (an agent's LRU
    eviction or a restart without cache loses it); put it back where lost, report in status."""
    st = _Status(patch, status, generation)
    version = str(status["version"])
    parsed = LoraAdapterSpec.model_validate(dict(spec))
    agents = {a.node: a for a in await ctx.agents.discover()}
    placed = list(status.get("nodes") or [])
    asked = [agents[n["name"]] for n in placed
             if n.get("name") in agents and n.get("version") == version]
    answers = await asyncio.gather(*(ctx.agents.held(a, namespace, name, version)
                                     for a in asked), return_exceptions=True)
    found = {a.node: r for a, r in zip(asked, answers, strict=True) if isinstance(r, str)}
    check = plan_recheck(placed, version, found, parsed.placement.nodes)
    was_ready = status.get("phase") == "Ready"
    if check.ready and not check.repair:
        if not was_ready or check.nodes != placed:
            message = f"version {version} loaded on {check.ready_nodes}/" \
                      f"{check.desired_nodes} node(s)"
            st.set("Ready", "Ready", True, "Loaded", message, nodes=check.nodes,
                   readyNodes=check.ready_nodes)
        return
    if was_ready:  # a re-check that found it lost already shows so
        logger.warning("%s", check.message)
        kopf.warn(body, reason=NODE_LOST, message=check.message)
        await st.show(ctx, namespace, name, "Fetching", "Loaded", False, NODE_LOST,
                      check.message, nodes=check.nodes, readyNodes=check.ready_nodes)

    # Put it back on the reachable nodes that lost it (the agent fetches from S3 again).
    try:
        loc = await _location(ctx, namespace, parsed)
    except SecretError as e:
        st.set("Fetching", "Loaded", False, NODE_LOST, f"{check.message}; {e}",
               nodes=check.nodes, readyNodes=check.ready_nodes)
        return
    results = await asyncio.gather(
        *(ctx.agents.put(agents[n], namespace, name, version, _agent_body(loc, parsed))
          for n in check.repair), return_exceptions=True)
    failed = {n: str(getattr(r, "message", r)) for n, r in
              zip(check.repair, results, strict=True) if isinstance(r, BaseException)}
    done = check.after_repair(failed)
    if done.ready:
        message = f"version {version} put back; loaded on {done.ready_nodes}/" \
                  f"{done.desired_nodes} node(s)"
        st.set("Ready", "Ready", True, "Loaded", message, nodes=done.nodes,
               readyNodes=done.ready_nodes)
        kopf.event(body, type="Normal", reason="Ready", message=message)
    else:
        st.set("Fetching", "Loaded", False, NODE_LOST,
               f"{done.message}; retrying at the next re-check", nodes=done.nodes,
               readyNodes=done.ready_nodes)


async def delete(ctx: OperatorContext, *, namespace: str, name: str, status: dict[str, Any],
                 body: Any, patch: kopf.Patch, retry: int, logger: Any) -> None:
    """Drop the record (the gateway stops admitting requests for it), then unregister and evict
    every version from every agent; then the finalizer goes. Nodes listed in status that do not
    answer are waited for a while."""
    patch.status["phase"] = "Terminating"
    try:
        await ctx.registry.remove(f"{namespace}/{name}")
    except RegistryUnavailable as e:
        raise kopf.TemporaryError(str(e), delay=ctx.backoff(retry)) from None
    ctx.agents.forget()
    agents = await ctx.agents.discover()
    stuck = await _evict_everywhere(ctx, agents, namespace, name, None)
    known = {a.node for a in agents}
    stuck += [n["name"] for n in status.get("nodes") or [] if n.get("name") not in known]
    if stuck and retry < ctx.delete_retries:
        raise kopf.TemporaryError(f"nodes {sorted(set(stuck))} did not confirm eviction",
                                  delay=ctx.backoff(retry))
    if stuck:
        kopf.warn(body, reason="EvictionIncomplete",
                  message=f"gave up waiting for nodes {sorted(set(stuck))}")
    logger.info("evicted %s/%s from %d node(s)", namespace, name, len(agents))
