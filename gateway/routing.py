"""Which replica serves a request: adapter residency first, bounded load, consistent hashing.

Replicas are ranked by (over the load bound, tier of the adapter there, rendezvous hash):
- the load bound is consistent hashing with bounded loads (Mirrokni et al.): no replica takes a
  request that would put it above ceil((1 + epsilon) x mean load);
- the tier prefers replicas holding the adapter on the GPU, then in host memory, then neither;
- rendezvous (highest-random-weight) hashing of the adapter id orders replicas within a tier,
  so an adapter sticks to the same few replicas and spills to the next ones when they are full.
The whole ranking is returned: the first replica is the choice, the rest are retry fallbacks.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from typing import Protocol, TypeVar

TIER_RANK = {"gpu": 0, "host": 1}  # an adapter a replica does not hold ranks after these


class ReplicaState(Protocol):
    @property
    def url(self) -> str: ...

    @property
    def load(self) -> int: ...

    @property
    def tiers(self) -> Mapping[str, str]: ...


R = TypeVar("R", bound=ReplicaState)


def rendezvous(key: str, node: str) -> int:
    """A stable pseudo-random weight of (key, node)."""
    digest = hashlib.blake2b(f"{key}\x00{node}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def load_bound(replicas: Sequence[ReplicaState], epsilon: float) -> int:
    """The most requests one replica may hold after taking one more request."""
    total = sum(r.load for r in replicas) + 1
    return math.ceil((1 + epsilon) * total / len(replicas))


def rank(adapter: str | None, replicas: Sequence[R], epsilon: float) -> list[R]:
    """``replicas`` in the order to try them for a request for ``adapter`` (None: base model)."""
    if not replicas:
        return []
    if adapter is None:  # any replica holds the base model: least loaded first
        return sorted(replicas, key=lambda r: (r.load, r.url))
    bound = load_bound(replicas, epsilon)

    def key(r: R) -> tuple[bool, int, int]:
        return (r.load + 1 > bound, TIER_RANK.get(r.tiers.get(adapter, ""), len(TIER_RANK)),
                -rendezvous(adapter, r.url))

    return sorted(replicas, key=key)
