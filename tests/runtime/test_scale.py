"""How many live processes a host runs: each holds a socket, so the open-files limit is the cap,
not ZeroMQ's default of 1023; a process past the cap ends with an error instead of hanging."""

from __future__ import annotations

import resource
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from agentlibos.bus import EventStream, Topic
from agentlibos.kernel import replay_log
from agentlibos.runtime import Runtime
from agentlibos.runtime._runtime import FD_RESERVE


def _settle(events: EventStream, pending: set[int], ended: dict[int, str], timeout_s: float) -> None:
    """Take the events already there (or wait TIMEOUT_S for one): a pid leaves PENDING when its
    actor said hello (ready) or the kernel ended it (ENDED: pid -> status)."""
    ev = events.next_event(timeout_s=timeout_s)
    while ev is not None:
        body = ev[1]
        if body.get("state") == "ready":
            pending.discard(body.get("pid"))
        elif body.get("state") == "exited":
            pending.discard(body.get("pid"))
            ended[body["pid"]] = str(body.get("status"))
        ev = events.next_event(timeout_s=0)


def _spawn_daemons(rt: Runtime, n: int) -> tuple[set[int], dict[int, str]]:
    """N idle daemons; the ones still unsettled after a minute, and the ones that ended."""
    rt.register_image("idle")
    pending: set[int] = set()
    ended: dict[int, str] = {}
    with rt.events(Topic("proc/")) as events:
        for _ in range(n):
            pending.add(rt.spawn("idle", daemon=True))
            _settle(events, pending, ended, 0)  # keep up, so that no event overflows the subscription
        deadline = time.monotonic() + 60
        while pending and time.monotonic() < deadline:
            _settle(events, pending, ended, 1)
    return pending, ended


def test_more_live_processes_than_the_default_socket_limit(tmp_path: Path) -> None:
    with Runtime(tmp_path / "state", world_root=tmp_path / "world", ipc=False, hibernate_after_s=0) as rt:
        pending, ended = _spawn_daemons(rt, 1100)
        assert not pending and not ended, f"{len(pending)} never attached, {len(ended)} ended"
        assert sum(p["state"] == "ready" for p in rt.ps()) == 1100


@pytest.fixture
def few_files() -> Iterator[int]:
    """A low open-files limit for this test: the socket cap follows it (ZeroMQ fails cleanly at its
    own cap, well before the process runs out of files)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_RESERVE + 1100, hard))
    try:
        yield 1100
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_process_the_host_cannot_run_ends_with_an_error(tmp_path: Path, few_files: int) -> None:
    with Runtime(tmp_path / "state", world_root=tmp_path / "world", ipc=False, hibernate_after_s=0) as rt:
        assert rt.context.get(zmq.MAX_SOCKETS) == few_files
        pending, ended = _spawn_daemons(rt, few_files + 30)
        assert not pending, f"{len(pending)} processes neither attached nor ended"
        assert ended and set(ended.values()) == {"error"}, ended
        pid = min(ended)
        gone = rt.wait(pid, timeout_s=5)
        assert gone.status == "error" and "could not run" in str(gone.result)
        live = sum(p["state"] == "ready" for p in rt.ps())
        assert live + len(ended) == few_files + 30
    # What the host reported is in the log, and replays.
    report = replay_log(tmp_path / "state" / "log.db")
    assert report.state_hash == report.recorded_hash is not None
