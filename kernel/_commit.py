"""Group commit: what one commit round holds back until its log entries are durable."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agentlibos.bus import Topic


@dataclass(slots=True)
class Outputs:
    """What waits on one commit: nothing here may leave before its entries are durable."""

    replies: list[tuple[bytes, int, bytes]] = field(default_factory=list)  # conn, request id, frame
    effects: list[tuple[int, Callable[[], Any], bytes, int]] = field(default_factory=list)  # ticket, fn, conn, rid
    events: list[tuple[Topic, dict[str, Any]]] = field(default_factory=list)
    commands: list[tuple[bytes, bytes]] = field(default_factory=list)  # conn, frame

    def __bool__(self) -> bool:
        return bool(self.replies or self.effects or self.events or self.commands)
