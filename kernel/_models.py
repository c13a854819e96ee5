"""The model backend interface behind `llm.complete`: messages and tool definitions in, content
blocks (text and tool_use) out. The scripted model, the Anthropic SDK and replay all fit it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from agentlibos.bus._turn import Completion

__all__ = ["Completion", "CompletionRequest", "ModelBackend"]


@dataclass(frozen=True, slots=True)
class CompletionRequest:
    pid: int
    image: str
    model: str
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] = field(default_factory=list)
    system: str | None = None
    max_tokens: int | None = None


class ModelBackend(Protocol):
    """Anything that can take one model turn. Called on an effect worker thread, never the kernel's."""

    def complete(self, request: CompletionRequest) -> Completion: ...
