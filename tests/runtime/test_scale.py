"""A host runs more live processes than ZeroMQ's default socket limit (1023): each one holds a socket."""

from __future__ import annotations

import time
from pathlib import Path

from agentlibos.bus import EventStream, Topic
from agentlibos.runtime import Runtime

MANY = 1100


def _ready(events: EventStream, waiting: set[int], timeout_s: float) -> None:
    """Take the events already there (or wait TIMEOUT_S for one): pids that said hello leave WAITING."""
    ev = events.next_event(timeout_s=timeout_s)
    while ev is not None:
        if ev[1].get("state") == "ready":
            waiting.discard(ev[1].get("pid"))  # its actor said hello over its own socket
        ev = events.next_event(timeout_s=0)


def test_more_live_processes_than_the_default_socket_limit(tmp_path: Path) -> None:
    with Runtime(tmp_path / "state", world_root=tmp_path / "world", ipc=False, hibernate_after_s=0) as rt:
        rt.register_image("idle")
        waiting: set[int] = set()
        with rt.events(Topic("proc/")) as events:
            for _ in range(MANY):
                waiting.add(rt.spawn("idle", daemon=True))
                _ready(events, waiting, 0)  # keep up, so that no event overflows the subscription
            deadline = time.monotonic() + 60
            while waiting and time.monotonic() < deadline:
                _ready(events, waiting, 1)
        assert not waiting, f"{len(waiting)} of {MANY} processes never attached"
        assert sum(p["state"] == "ready" for p in rt.ps()) == MANY
