"""The operator's failures that become status conditions: each carries a CamelCase reason."""

from __future__ import annotations


class ConditionError(Exception):
    """A failure a `LoraAdapter` condition reports: reason (CamelCase) and a message people read."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
