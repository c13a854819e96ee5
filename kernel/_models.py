"""The model backend interface behind `llm.complete`: messages and tool definitions in, content
blocks (text and tool_use) out. The scripted model, the Anthropic SDK and replay all fit it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class CompletionRequest:
    pid: int
    image: str
    model: str
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] = field(default_factory=list)
    system: str | None = None
    max_tokens: int | None = None


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


class ModelBackend(Protocol):
    """Anything that can take one model turn. Called on an effect worker thread, never the kernel's."""

    def complete(self, request: CompletionRequest) -> Completion: ...
