"""What every handler needs, built once at startup and kept in Kopf's memo."""

from __future__ import annotations

from dataclasses import dataclass, field

from loraplane.engine.config import ModelConfig
from loraplane.operator.agents import AgentDirectory
from loraplane.operator.kube import KubeClient
from loraplane.operator.registry import Registry


@dataclass
class OperatorContext:
    """Settings and clients of one operator process."""

    model: ModelConfig
    served_model_name: str
    agents: AgentDirectory
    registry: Registry
    max_rank: int = 256
    max_bytes: int = 2 << 30
    retry_base: float = 1.0
    retry_cap: float = 60.0
    delete_retries: int = 10
    kube: KubeClient | None = None
    counters: dict[str, int] = field(default_factory=dict)

    def backoff(self, retry: int) -> float:
        from loraplane.operator.plan import plan_backoff

        return plan_backoff(retry, base=self.retry_base, cap=self.retry_cap)
