"""A host's stop is never lost: however its wake pipe is busy (processes going idle wake it too),
the host thread sees the stop, hands over its idle processes and ends, well before the join timeout."""

from __future__ import annotations

import time
from pathlib import Path

from agentlibos.actors import ScriptedModel
from tests.hosted import session

ROUNDS = 40


def test_a_stop_racing_processes_going_idle_ends_the_host_thread(tmp_path: Path) -> None:
    for n in range(ROUNDS):
        # Each daemon answers "go" in one step and goes idle, waking the host thread just as it stops.
        rt = session(tmp_path / str(n), ScriptedModel({})).start()
        rt.register_image("d")
        for _ in range(4):
            rt.spawn("d", daemon=True, input="go")
        thread = rt.host._thread
        began = time.monotonic()
        rt.stop()
        assert not thread.is_alive(), f"round {n}: the host thread missed its stop"
        assert time.monotonic() - began < 5, f"round {n}: the stop waited on a timeout"
