"""One model turn, the value `llm.complete` returns: content blocks (text and tool_use), the stop
reason, token usage. Shared by the kernel's model interface and every model adapter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Completion"]


@dataclass(frozen=True, slots=True)
class Completion:
    content: list[dict[str, Any]]
    stop_reason: str
    usage: dict[str, int] = field(default_factory=lambda: {"input_tokens": 0, "output_tokens": 0})
    model: str = ""
    #: The model has nothing after the tool results of this turn (a script that ran out).
    final: bool = False

    def to_value(self) -> dict[str, Any]:
        return {
            "content": self.content,
            "stop_reason": self.stop_reason,
            "usage": dict(self.usage),
            "model": self.model,
            "final": self.final,
        }
