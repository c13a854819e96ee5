"""A clean kernel restart: hosted processes idle between turns carry on with their conversation,
capabilities, budget and `self` memory; busy ones end interrupted; only the host may park one."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agentlibos.actors import ScriptedModel
from agentlibos.bus import KernelClient, KernelError, Topic
from agentlibos.kernel._replay import replay_log
from agentlibos.runtime import Grant, Runtime
from agentlibos.storage import SQLiteLog
from tests.hosted import DOCS, EVERYTHING, Observer, Recording, next_event, session

def code_of(fn: Callable[[], Any]) -> str:
    with pytest.raises(KernelError) as ei:
        fn()
    return ei.value.code


def states(rt: Runtime, pid: int) -> list[tuple[str, str | None]]:
    return [(p["state"], p["status"]) for p in rt.ps() if p["pid"] == pid]


def test_an_idle_hosted_daemon_carries_on_with_its_conversation(tmp_path: Path) -> None:
    read_docs = {"tool": "fs_read", "args": {"path": "docs/a.txt"}}
    shout = {"name": "shout", "source": "export default async function (input, sys) { return 1 }"}
    (tmp_path / "state" / "skills" / "tidy").mkdir(parents=True)
    (tmp_path / "state" / "skills" / "tidy" / "SKILL.md").write_text("Keep notes tidy.\n")
    first, seen = Recording({"d": [{"tool": "tool_define", "args": shout},
                                   {"tool": "skill_load", "args": {"name": "tidy"}}, read_docs]}), Observer()
    with session(tmp_path, first, seen) as rt:
        rt.register_image("d", prompt="You answer.", tools=["fs_read", "tool_define", "skill_load"])
        pid = rt.spawn("d", daemon=True, input="hello", caps=[DOCS, EVERYTHING])
        assert seen.wait_for(3)[2].value["text"] == "alpha"
        rt.revoke(pid, "all")
    # The first session alone (its stop entry holds the parked process) replays to its state hash.
    (tmp_path / "first").mkdir()
    for f in (tmp_path / "state").glob("log.db*"):
        shutil.copy(f, tmp_path / "first" / f.name)
    report = replay_log(tmp_path / "first" / "log.db", state_dir=tmp_path / "replay")
    assert report.state_hash == report.recorded_hash is not None

    second, seen = Recording({"d": [read_docs, {"tool": "fs_read", "args": {"path": "secret.txt"}, "cap": "all"}]}), \
        Observer()
    with session(tmp_path, second, seen) as rt:
        assert states(rt, pid) == [("ready", None)]
        assert rt.inspect(lambda k: (k.procs[pid].daemon, k.procs[pid].external)) == (True, False)
        rt.send(pid, "and again")
        again, revoked = seen.wait_for(2)
        assert again.value["text"] == "alpha"  # its caps still work
        assert not revoked.ok and revoked.error is not None and revoked.error.code == "EREVOKED"  # and stay dead
        asked, before = second.requests[0], first.requests[-1].messages
        # The model sees the earlier conversation (to the end of its last turn), then the follow-up,
        # with the affordances the process grew.
        assert asked.messages[:len(before)] == before and len(asked.messages) == len(before) + 3
        assert asked.messages[0]["content"] == "hello" and asked.messages[-1]["content"] == "and again"
        assert asked.messages[-3]["content"][0]["name"] == "fs_read"
        assert "alpha" in asked.messages[-2]["content"][0]["content"]
        assert asked.system == "You answer.\n\nKeep notes tidy."
        assert "shout" in [t["name"] for t in asked.tools]
        assert rt.inspect(lambda k: (sorted(k.procs[pid].jit_tools), k.procs[pid].skills)) == (["shout"], ["tidy"])
    # A daemon stays a daemon: idle after its turn, it carries on again.
    third = Recording({})
    with session(tmp_path, third) as rt:
        assert states(rt, pid) == [("ready", None)]
        with rt.events(Topic.llm()) as events:
            rt.send(pid, "third")
            next_event(events, lambda b: b.get("pid") == pid)
        said = [m["content"] for m in third.requests[0].messages if isinstance(m["content"], str)]
        assert said == ["hello", "and again", "third"]
        assert third.requests[0].system == "You answer.\n\nKeep notes tidy."
    log = SQLiteLog.open_readonly(tmp_path / "state" / "log.db")
    try:
        resumed = [e.body for e in log.entries(kinds=["proc.state"], pid=pid) if e.body.get("status")]
    finally:
        log.close()
    assert resumed == [{"pid": pid, "state": "ready", "status": "resumed after a restart"}] * 2
    # The whole log replays, session by session: each restarted kernel recovers from the earlier
    # sessions' entries and makes the same decisions, the resumed processes' included.
    whole = replay_log(tmp_path / "state" / "log.db", state_dir=tmp_path / "replay")
    log = SQLiteLog.open_readonly(tmp_path / "state" / "log.db")
    try:
        last = log.get(log.head()[0])
    finally:
        log.close()
    assert last is not None and last.kind == "kernel.stop"
    assert (whole.sessions, whole.entries, whole.notes) == (3, last.seq, [])
    assert whole.state_hash == whole.recorded_hash == last.body["state_hash"]


def test_a_hosted_process_busy_at_the_stop_is_interrupted(tmp_path: Path) -> None:
    model = ScriptedModel({"b": [{"tool": "fs_read", "args": {"path": "docs/a.txt"}}]})
    asking = Grant("fs", {"root": "docs"}, ["read"], approval="always")
    with session(tmp_path, model) as rt:
        rt.register_image("b", tools=["fs_read"])
        with rt.events(Topic.approval(), Topic("proc/")) as events:
            pid = rt.spawn("b", daemon=True, input="go", caps=[asking])
            next_event(events, lambda b: b.get("event") == "asked" and b.get("pid") == pid)
            idle = rt.spawn("b", daemon=True)  # no input: it waits for its first message
            next_event(events, lambda b: b.get("pid") == idle and b.get("state") == "ready")
    with session(tmp_path) as rt:
        assert states(rt, pid) == [("exited", "interrupted")]
        assert states(rt, idle) == [("ready", None)]
        assert code_of(lambda: rt.send(pid, "more")) == "ENOENT"


def test_an_interrupted_process_carries_on_and_ends_as_any_other(tmp_path: Path) -> None:
    asking = Grant("fs", {"root": "docs"}, ["read"], approval="always")
    seen = Observer()
    with session(tmp_path, ScriptedModel({"b": [{"tool": "fs_read", "args": {"path": "docs/a.txt"}}]}), seen) as rt:
        rt.register_image("b", tools=["fs_read"])
        with rt.events(Topic.approval()) as events:
            pid = rt.spawn("b", input="go", caps=[asking])
            next_event(events, lambda b: b.get("event") == "asked" and b.get("pid") == pid)
        assert rt.interrupt(pid) == 1
        (stopped,) = seen.wait_for(1)
        assert stopped.error is not None and stopped.error.code == "EINTR"
    second = Recording({})
    with session(tmp_path, second) as rt:
        assert states(rt, pid) == [("ready", None)]
        rt.send(pid, "go on")
        assert rt.wait(pid, timeout_s=30).status == "ok"  # not a daemon: its next turn was its last
        assert [m["content"] for m in second.requests[0].messages if isinstance(m["content"], str)] == ["go", "go on"]

def test_an_outside_process_keeps_its_own_memory(tmp_path: Path) -> None:
    with session(tmp_path) as rt:
        rt.register_image("x")
        pid, token = rt.spawn_external("x")
        with rt.client(token) as c:
            c.call("mem.put", {"key": "notes", "value": {"n": 1, "text": "kept"}})
    with session(tmp_path) as rt:
        with rt.client(token) as c:
            assert c.call("mem.get", {"key": "notes"})["value"] == {"n": 1, "text": "kept"}
            assert c.call("mem.list", {})["keys"] == ["notes"]
        assert rt.operator.call("op.mem.get", {"ns": f"self:{pid}", "key": "notes"})["value"]["text"] == "kept"


def test_only_the_host_parks_and_only_hosted_processes(tmp_path: Path) -> None:
    with session(tmp_path) as rt:
        rt.register_image("x")
        outside, token = rt.spawn_external("x")
        with rt.events(Topic("proc/")) as events:
            hosted = rt.spawn("x", daemon=True)
            next_event(events, lambda b: b.get("pid") == hosted and b.get("state") == "ready")
        forged = {"pid": hosted, "messages": [{"role": "user", "content": "not what it said"}]}
        with rt.client(token) as c:
            assert code_of(lambda: c.call("host.park", forged)) == "ENOSYS"
            assert code_of(lambda: c.call("host.park", {"pid": outside, "messages": []})) == "ENOSYS"
            assert c.call("proc.self")["pid"] == outside  # the kernel keeps serving
        assert code_of(lambda: rt.operator.call("host.park", forged)) == "ENOSYS"
        assert code_of(lambda: rt.operator.call("op.nope", {"x": 1})) == "ENOSYS"  # replayed as the operator's
        assert rt.inspect(lambda k: dict(k._host_parked)) == {}
        # Even the host parks no outside process, and no process that is not live.
        with KernelClient(rt.inproc_endpoint, context=rt.context, token=rt.config.host_token, role="host") as h:
            assert code_of(lambda: h.call("host.park", {"pid": outside, "messages": []})) == "EPERM"
            assert code_of(lambda: h.call("host.park", {"pid": 999, "messages": []})) == "ENOENT"
            assert code_of(lambda: h.call("op.ps")) == "ENOSYS"
        assert rt.inspect(lambda k: dict(k._host_parked)) == {}
    # The real host's connection was replaced, so its parking at the stop was refused too.
    with session(tmp_path) as rt:
        assert states(rt, hosted) == [("exited", "interrupted")]
        assert states(rt, outside) == [("ready", None)]
    assert replay_log(tmp_path / "state" / "log.db", state_dir=tmp_path / "replay").state_hash is not None
