"""Pure functions that compute desired state: versions, placement, status, registry records."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from loraplane.gateway.schemas import Adapter
from loraplane.operator.spec import LoraAdapterSpec

CONDITION_TYPES = ("Verified", "Cached", "Loaded", "Ready")


@dataclass(frozen=True)
class AgentInfo:
    """One node agent as it describes itself at GET /v1/info."""

    node: str
    url: str
    labels: dict[str, str] = field(default_factory=dict)
    base_models: tuple[str, ...] = ()
    engines: tuple[str, ...] = ()
    capacity_bytes: int = 0
    used_bytes: int = 0

    @property
    def free_bytes(self) -> int:
        return self.capacity_bytes - self.used_bytes


def plan_version(spec: LoraAdapterSpec) -> str:
    """The adapter version: a hash of what decides its weights (not of sharing or placement)."""
    s3 = spec.source.s3
    essence = {"baseModel": spec.base_model, "uri": s3.uri, "endpoint": s3.endpoint,
               "region": s3.region, "sha256": spec.sha256}
    return hashlib.sha256(json.dumps(essence, sort_keys=True).encode()).hexdigest()[:12]


def build_engine_name(namespace: str, name: str, version: str) -> str:
    """The name engines serve one version under; KV/prefix reuse is keyed by it."""
    return f"{namespace}/{name}@{version}"


def plan_placement(agents: list[AgentInfo], spec: LoraAdapterSpec, current: set[str],
                   size_bytes: int) -> list[AgentInfo]:
    """The agents to hold the adapter: eligible ones, current holders first, then most free RAM.

    Eligible: serves the base model, matches the node selector, has room for the weights.
    Returns at most placement.nodes agents (fewer when fewer are eligible).
    """
    selector = spec.placement.node_selector
    eligible = [a for a in agents
                if spec.base_model in a.base_models
                and all(a.labels.get(k) == v for k, v in selector.items())
                and (a.node in current or a.capacity_bytes >= size_bytes)]
    eligible.sort(key=lambda a: (a.node not in current, -a.free_bytes, a.node))
    return eligible[:spec.placement.nodes]


def plan_backoff(retry: int, *, base: float = 1.0, cap: float = 60.0) -> float:
    """Seconds before retry number `retry` (0-based): exponential, capped."""
    return min(cap, base * 2 ** min(retry, 16))


def build_condition(type_: str, ok: bool | None, reason: str, message: str, generation: int,
                    now: str, previous: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """One standard condition; lastTransitionTime kept when the status did not change."""
    status = "Unknown" if ok is None else ("True" if ok else "False")
    since = now
    for c in previous or []:
        if c.get("type") == type_ and c.get("status") == status:
            since = c.get("lastTransitionTime", now)
    return {"type": type_, "status": status, "reason": reason, "message": message[:1024],
            "observedGeneration": generation, "lastTransitionTime": since}


def build_conditions(stage: str, ok: bool | None, reason: str, message: str, generation: int,
                     now: str, previous: list[dict[str, Any]] | None = None
                     ) -> list[dict[str, Any]]:
    """All four conditions when the rollout got to `stage` (one of CONDITION_TYPES).

    Stages before `stage` are True; `stage` itself gets ok/reason/message; later ones and Ready
    are Unknown (or False when ok is False).
    """
    out = []
    reached = CONDITION_TYPES.index(stage)
    for i, t in enumerate(CONDITION_TYPES):
        if i < reached:
            out.append(build_condition(t, True, "Done" if t != "Ready" else reason, "",
                                       generation, now, previous))
        elif i == reached:
            out.append(build_condition(t, ok, reason, message, generation, now, previous))
        elif t == "Ready" and ok is False:
            out.append(build_condition(t, False, reason, message, generation, now, previous))
        else:
            out.append(build_condition(t, None, "Waiting", f"waiting for {stage}", generation,
                                       now, previous))
    return out


def build_record(namespace: str, name: str, spec: LoraAdapterSpec, version: str) -> Adapter:
    """The gateway's registry record of a Ready adapter: who may use it, and the name engines
    serve this version under (what the gateway forwards requests for ``<ns>/<name>`` as)."""
    return Adapter(id=f"{namespace}/{name}", public=spec.sharing.public,
                   shared_with=sorted(spec.sharing.shared_with),
                   engine_name=build_engine_name(namespace, name, version))
