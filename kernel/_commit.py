"""Pipelined group commit: one batch of log entries is being made durable on the committer
thread while the kernel thread goes on deciding the next; the kernel releases a batch's replies
and effects only when the committer reports it durable.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agentlibos.bus import Topic
from agentlibos.storage import LogBackend


@dataclass(slots=True)
class Outputs:
    """What waits on one commit: nothing here may leave before its entries are durable."""

    replies: list[tuple[bytes, int, bytes]] = field(default_factory=list)  # conn, request id, frame
    effects: list[tuple[int, Callable[[], Any], bytes, int]] = field(default_factory=list)  # ticket, fn, conn, rid
    events: list[tuple[Topic, dict[str, Any]]] = field(default_factory=list)
    commands: list[tuple[bytes, bytes]] = field(default_factory=list)  # conn, frame

    def __bool__(self) -> bool:
        return bool(self.replies or self.effects or self.events or self.commands)


@dataclass(frozen=True, slots=True)
class Committed:
    """Committer -> kernel: the batch is durable (error None) or the log failed."""

    error: str | None = None


class Committer:
    def __init__(self, log: LogBackend, notify: Callable[[Committed], None]) -> None:
        self._log = log
        self._notify = notify
        self._requests: queue.SimpleQueue[bool] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="agentlibos-commit", daemon=True)
        self._thread.start()

    def commit(self) -> None:
        self._requests.put(True)

    def stop(self) -> None:
        self._requests.put(False)
        self._thread.join(30)

    def _run(self) -> None:
        while self._requests.get():
            try:
                self._log.flush()
            except Exception as exc:  # LogWriteError or anything that means "not durable"
                self._notify(Committed(f"the log cannot be written ({exc}); the kernel accepts no more syscalls"))
            else:
                self._notify(Committed())
