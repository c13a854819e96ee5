"""An operator interrupts a hosted agent's turn and sends a follow-up: the agent loop ends the
turn (the calls it had not made come back to the model as EINTR results), waits, and answers the
follow-up in the same conversation."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agentlibos.actors._llm import AnthropicModel
from agentlibos.bus import Topic
from agentlibos.runtime import Grant, Runtime
from tests.actors.llm_servers import MessagesServer, message, text, tool_use


@pytest.fixture
def server() -> Iterator[MessagesServer]:
    with MessagesServer() as s:
        yield s


def test_interrupt_then_follow_up(tmp_path: Path, server: MessagesServer) -> None:
    (tmp_path / "w" / "notes").mkdir(parents=True)
    server.push(
        message(tool_use("t1", "fs_write", {"path": "notes/plan.txt", "data": "rm -rf"}),
                tool_use("t2", "fs_write", {"path": "notes/more.txt", "data": "x"}), stop_reason="tool_use"),
        message(text("Stopped. Hello instead."), input_tokens=20, output_tokens=5),
    )
    with AnthropicModel(base_url=server.url, api_key="test", timeout_s=10) as model, \
            Runtime(tmp_path / "s", world_root=tmp_path / "w", ipc=False, models={"anthropic": model}) as rt:
        rt.register_image("writer", tools=["fs_write"])
        with rt.events(Topic.approval()) as events:
            pid = rt.spawn("writer", model="anthropic:claude-test", input="write the plan",
                           caps=[Grant("fs", {"root": "notes"}, ["write", "create"], approval="always")],
                           budget={"llm_tokens": 1000})
            while True:
                ev = events.next_event(timeout_s=30)
                assert ev is not None, "the write never asked for approval"
                if ev[1].get("event") == "asked" and ev[1].get("pid") == pid:
                    break
        assert rt.interrupt(pid) == 1
        assert rt.operator.call("op.approvals")["approvals"] == []
        rt.send(pid, "never mind; just say hello")
        ex = rt.wait(pid, timeout_s=60)
        assert (ex.status, ex.result) == ("ok", "Stopped. Hello instead.")
    assert not (tmp_path / "w" / "notes" / "plan.txt").exists()
    assert not (tmp_path / "w" / "notes" / "more.txt").exists()
    follow = server.requests[1]["messages"]
    results: list[dict[str, Any]] = follow[2]["content"]
    assert [(r["tool_use_id"], r["is_error"]) for r in results] == [("t1", True), ("t2", True)]
    assert all(json.loads(r["content"])["error"]["code"] == "EINTR" for r in results)
    assert follow[-1] == {"role": "user", "content": "never mind; just say hello"}
