"""Hibernation: the host stops the actor of a process idle `hibernate_after_s` and starts it again
on its next message, unseen by the kernel: same conversation, affordances, capabilities, token."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from agentlibos.actors import ScriptedModel
from agentlibos.bus import Topic
from agentlibos.kernel._replay import replay_log
from agentlibos.runtime import Grant, Runtime
from tests.hosted import DOCS, EVERYTHING, Observer, Recording, next_event
from tests.hosted import session as hosted_session

READ_DOCS = {"tool": "fs_read", "args": {"path": "docs/a.txt"}}
READ_SECRET = {"tool": "fs_read", "args": {"path": "secret.txt"}, "cap": "all"}
SHOUT = {"name": "shout", "source": "export default async function (input, sys) { return 1 }"}
NAP = 0.05


def session(tmp_path: Path, model: Any, observer: Observer | None = None, hibernate_after_s: float = NAP) -> Runtime:
    return hosted_session(tmp_path, model, observer, hibernate_after_s=hibernate_after_s)


def actor_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("AgentProcess-")}


def test_an_idle_daemon_hibernates_and_wakes_on_its_next_message(tmp_path: Path) -> None:
    (tmp_path / "state" / "skills" / "tidy").mkdir(parents=True)
    (tmp_path / "state" / "skills" / "tidy" / "SKILL.md").write_text("Keep notes tidy.\n")
    model = Recording({"d": [{"tool": "tool_define", "args": SHOUT},
                             {"tool": "skill_load", "args": {"name": "tidy"}}, READ_DOCS]})
    seen = Observer()
    before = actor_threads()
    with session(tmp_path, model, seen) as rt:
        rt.register_image("d", prompt="You answer.", tools=["fs_read", "tool_define", "skill_load"])
        pid = rt.spawn("d", daemon=True, input="hello", caps=[DOCS, EVERYTHING])
        assert seen.wait_for(3)[2].value["text"] == "alpha"
        (thread,) = actor_threads() - before
        threads = threading.active_count()
        assert rt.host.wait_hibernated(pid, 30)
        thread.join(30)
        assert not thread.is_alive() and threading.active_count() < threads
        assert pid not in rt.host.actors
        # The kernel saw nothing: the process is as it was, and a capability revoked while it sleeps stays dead.
        assert [(p["state"], p["status"]) for p in rt.ps() if p["pid"] == pid] == [("ready", None)]
        rt.revoke(pid, "all")
        first, turns = model.requests[-1].messages, len(model.requests)
        model.inner = ScriptedModel({"d": [READ_DOCS, READ_SECRET]})
        rt.send(pid, "and again")
        _, _, _, again, revoked = seen.wait_for(5)
        assert again.value["text"] == "alpha"
        assert not revoked.ok and revoked.error is not None and revoked.error.code == "EREVOKED"
        asked = model.requests[turns]
        assert asked.messages[:len(first)] == first and len(asked.messages) == len(first) + 3
        assert asked.messages[0]["content"] == "hello" and asked.messages[-1]["content"] == "and again"
        assert "alpha" in asked.messages[-2]["content"][0]["content"]
        assert asked.system == "You answer.\n\nKeep notes tidy."
        assert "shout" in [t["name"] for t in asked.tools]
        # Idle again after the turn: it hibernates again.
        assert rt.host.wait_hibernated(pid, 30)
    # The host's stops and hellos are not in the log: it replays to the recorded state.
    report = replay_log(tmp_path / "state" / "log.db", state_dir=tmp_path / "replay")
    assert report.state_hash == report.recorded_hash is not None


def test_a_busy_process_is_never_hibernated(tmp_path: Path) -> None:
    model, seen = Recording({"d": [READ_DOCS]}), Observer()
    with session(tmp_path, model, seen) as rt:
        rt.register_image("d", tools=["fs_read"])
        gated = Grant("fs", {"root": "docs"}, ["read"], approval="always")
        pid = rt.spawn("d", daemon=True, caps=[gated])
        assert rt.host.wait_hibernated(pid, 30)  # never given input: idle from its start
        with rt.events(Topic.approval()) as events:
            rt.send(pid, "read it")
            next_event(events, lambda b: b.get("event") == "asked" and b.get("pid") == pid)
        # A daemon that went idle after this one blocked: by the time it hibernates, the blocked
        # one has waited longer than hibernate_after_s, and stays live.
        clock = rt.spawn("d", daemon=True)
        assert rt.host.wait_hibernated(clock, 30)
        assert pid in rt.host.actors and pid not in rt.host.hibernated
        # Interrupted, its turn ends: idle between turns, it hibernates; a follow-up wakes it.
        assert rt.interrupt(pid) == 1
        (ended,) = seen.wait_for(1)
        assert ended.error is not None and ended.error.code == "EINTR"
        assert rt.host.wait_hibernated(pid, 30)
        with rt.events(Topic.llm()) as events:
            rt.send(pid, "never mind")
            next_event(events, lambda b: b.get("pid") == pid)
        assert model.requests[-1].messages[-1]["content"] == "never mind"


def test_kill_while_hibernated(tmp_path: Path) -> None:
    before = actor_threads()
    with session(tmp_path, Recording({})) as rt:
        rt.register_image("d")
        pid = rt.spawn("d", daemon=True, input="hello")
        assert rt.host.wait_hibernated(pid, 30)
        for t in actor_threads() - before:
            t.join(30)
        threads = threading.active_count()
        assert rt.kill(pid) == [pid]
        assert rt.wait(pid, timeout_s=30).status == "killed"
        assert rt.host.wait_gone(pid, 30)
        assert rt.inspect(lambda k: k.procs[pid].state) == "killed"
        assert threading.active_count() <= threads and not actor_threads() - before


def test_a_hibernated_daemon_resumes_after_a_clean_restart(tmp_path: Path) -> None:
    first = Recording({"d": [READ_DOCS]})
    with session(tmp_path, first) as rt:
        rt.register_image("d", prompt="You answer.", tools=["fs_read"])
        pid = rt.spawn("d", daemon=True, input="hello", caps=[DOCS])
        assert rt.host.wait_hibernated(pid, 30)
    second, seen = Recording({"d": [READ_DOCS]}), Observer()
    with session(tmp_path, second, seen) as rt:
        assert [(p["state"], p["status"]) for p in rt.ps() if p["pid"] == pid] == [("ready", None)]
        rt.send(pid, "and again")
        assert seen.wait_for(1)[0].value["text"] == "alpha"
        asked, before = second.requests[0].messages, first.requests[-1].messages
        assert asked[:len(before)] == before and len(asked) == len(before) + 3
        assert asked[0]["content"] == "hello" and asked[-1]["content"] == "and again"
        assert "alpha" in asked[-2]["content"][0]["content"]
    # Both sessions replay, the parked hibernated process's resume included.
    report = replay_log(tmp_path / "state" / "log.db", state_dir=tmp_path / "replay")
    assert report.state_hash == report.recorded_hash is not None


@pytest.mark.parametrize("after", [0, -1])
def test_hibernation_off_keeps_actors_alive(tmp_path: Path, after: float) -> None:
    with session(tmp_path, Recording({}), hibernate_after_s=after) as rt:
        rt.register_image("d")
        with rt.events(Topic.llm()) as events:
            pid = rt.spawn("d", daemon=True, input="hello")
            next_event(events, lambda b: b.get("pid") == pid)
        assert not rt.host.wait_hibernated(pid, 0.3)
        assert pid in rt.host.actors and rt.host.actors[pid].is_alive()
