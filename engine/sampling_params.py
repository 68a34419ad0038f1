"""Per-request sampling parameters, validated at the edge."""

from __future__ import annotations

from dataclasses import dataclass

from loraplane.engine.errors import BadRequestError


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples and when it stops."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k cut
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> None:
        """Raise BadRequestError naming the first parameter out of range."""
        if self.max_tokens < 1:
            raise BadRequestError("max_tokens must be at least 1", param="max_tokens")
        if not 0.0 <= self.temperature <= 2.0:
            raise BadRequestError("temperature must be in [0, 2]", param="temperature")
        if not 0.0 < self.top_p <= 1.0:
            raise BadRequestError("top_p must be in (0, 1]", param="top_p")
        if self.top_k < -1:
            raise BadRequestError("top_k must be -1, 0 or positive", param="top_k")
        if len(self.stop) > 16 or any(not s or len(s) > 256 for s in self.stop):
            raise BadRequestError("stop takes at most 16 non-empty strings of at most 256 "
                                  "characters", param="stop")
