"""Pure functions that compute desired state: versions, placement, status, registry records."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from loraplane.gateway.schemas import Adapter
from loraplane.operator.spec import LoraAdapterSpec

CONDITION_TYPES = ("Verified", "Cached", "Loaded", "Ready")
NODE_LOST = "NodeLost"  # status.reason while the re-check puts a lost version back


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


def plan_recheck_wanted(status: dict[str, Any], generation: int) -> bool:
    """Whether the periodic re-check looks after this adapter: its current generation was placed
    (Ready), or a re-check found it lost; not while a create/update/retry is under way."""
    return (bool(status.get("version")) and status.get("observedGeneration") == generation
            and (status.get("phase") == "Ready" or status.get("reason") == NODE_LOST))


@dataclass(frozen=True)
class Recheck:
    """What a re-check found, and what to do about it."""

    nodes: list[dict[str, Any]]  # status.nodes as they are now
    repair: list[str]  # reachable nodes that lost the version: put it back there
    ready_nodes: int
    desired_nodes: int

    @property
    def ready(self) -> bool:
        return self.ready_nodes >= self.desired_nodes

    @property
    def message(self) -> str:
        lost = [n["name"] for n in self.nodes if n.get("state") != "Loaded"]
        return (f"version lost on node(s) {lost}: {self.ready_nodes}/{self.desired_nodes} "
                f"hold it")

    def after_repair(self, failed: dict[str, str]) -> Recheck:
        """The state once the version was put back on every node in repair but those in
        failed (node -> why)."""
        nodes = []
        for node in self.nodes:
            if node["name"] in failed:
                node = node | {"message": f"putting it back failed: {failed[node['name']]}"[:512]}
            elif node["name"] in self.repair:
                node = {k: v for k, v in node.items() if k != "message"} | {"state": "Loaded"}
            nodes.append(node)
        ready = self.ready_nodes + len(set(self.repair) - set(failed))
        return Recheck(nodes, [], ready, self.desired_nodes)


def plan_recheck(placed: list[dict[str, Any]], version: str, found: dict[str, str],
                 desired: int) -> Recheck:
    """Compare where status says the version is Loaded with what the agents report.

    found maps node -> "Loaded" (cached and registered with every engine), "Lost" (the agent
    answers but no longer has it, or an engine lacks it) or "Unavailable" (no answer); a node
    missing from found counts as Unavailable. Nodes whose placement had failed are left as
    they are.
    """
    nodes: list[dict[str, Any]] = []
    repair: list[str] = []
    for node in placed:
        if node.get("version") != version or node.get("state") == "Failed":
            nodes.append(node)
            continue
        state = found.get(node["name"], "Unavailable")
        entry = {k: v for k, v in node.items() if k != "message"} | {"state": state}
        if state == "Lost":
            repair.append(node["name"])
            entry["message"] = "no longer cached or registered on the node"
        elif state == "Unavailable":
            entry["message"] = "the node agent did not answer"
        nodes.append(entry)
    ready = sum(1 for n in nodes if n.get("state") == "Loaded" and n.get("version") == version)
    return Recheck(nodes, repair, ready, desired)


def build_record(namespace: str, name: str, spec: LoraAdapterSpec, version: str) -> Adapter:
    """The gateway's registry record of a Ready adapter: who may use it, and the name engines
    serve this version under (what the gateway forwards requests for ``<ns>/<name>`` as)."""
    return Adapter(id=f"{namespace}/{name}", public=spec.sharing.public,
                   shared_with=sorted(spec.sharing.shared_with),
                   engine_name=build_engine_name(namespace, name, version))
