"""The operator's checkpoints: snapshot a live process, roll it back, start a new process from a
snapshot. A rollback never widens authority: a capability revoked since stays dead, one granted
since is gone, budget spent stays spent; a fork holds only what the operator grants it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agentlibos.actors import ScriptedModel
from agentlibos.bus import KernelError, Topic
from agentlibos.kernel._replay import replay_log
from agentlibos.runtime import Grant, Runtime
from tests.hosted import DOCS, Asking, Observer, Recording, next_event, session

READ_DOCS = {"tool": "fs_read", "args": {"path": "docs/a.txt"}, "cap": "docs"}


def code_of(fn: Callable[[], Any]) -> str:
    with pytest.raises(KernelError) as ei:
        fn()
    return ei.value.code


def memory(rt: Runtime, pid: int, key: str) -> Any:
    return rt.operator.call("op.mem.get", {"ns": f"self:{pid}", "key": key})["value"]


def said(request: Any) -> list[str]:
    """The plain-text messages of a model request, in order."""
    return [m["content"] for m in request.messages if isinstance(m["content"], str)]


class Answering(Recording):
    """A recording scripted model whose turns end as a real model's do: in words, after the tool
    calls (not on the last tool call, as a bare script's do)."""

    def complete(self, request: Any) -> Any:
        turn = super().complete(request)
        return dataclasses.replace(turn, final=False) if turn.stop_reason == "tool_use" else turn


def turn(rt: Runtime, model: Recording, pid: int, text: str, steps: list[dict[str, Any]]) -> dict[str, Any]:
    """Send `text`, the model playing `steps` and then answering in words; returns the turn's end."""
    model.inner = ScriptedModel({"d": [*steps]})
    with rt.events(Topic.llm()) as events:
        rt.send(pid, text)
        # The turn's last model call is the one that answers in words (no tool call left to run).
        for _ in range(len(steps) + 1):
            ev = next_event(events, lambda b: b.get("pid") == pid)
    return ev


def test_the_operator_rolls_a_hosted_process_back_and_forks_it(tmp_path: Path) -> None:
    model, seen = Answering({}), Observer()
    more = Grant("fs", {"root": "."}, ["read"], name="more")
    (tmp_path / "state" / "skills" / "tidy").mkdir(parents=True)
    (tmp_path / "state" / "skills" / "tidy" / "SKILL.md").write_text("Keep notes tidy.\n")
    with session(tmp_path, model, seen) as rt:
        rt.register_image("d", prompt="You keep notes.", tools=["fs_read", "mem_put", "skill_load"])
        pid = rt.spawn("d", daemon=True, caps=[DOCS], budget={"llm_calls": 100})
        turn(rt, model, pid, "hello", [{"tool": "mem_put", "args": {"key": "notes", "value": "one"}}])
        before = rt.checkpoint(pid, "before")
        calls = rt.operator.call("op.budget", {"pid": pid})
        # After the checkpoint: a cap revoked, another granted, the memory and conversation move on.
        rt.revoke(pid, "docs")
        assert rt.grant(pid, more) == "more"
        turn(rt, model, pid, "again", [{"tool": "mem_put", "args": {"key": "notes", "value": "two"}},
                                       {"tool": "skill_load", "args": {"name": "tidy"}}])
        assert memory(rt, pid, "notes") == "two"
        assert model.requests[-1].system == "You keep notes.\n\nKeep notes tidy."

        with rt.events(Topic.proc(pid)) as events:
            out = rt.restore(pid, "before")
            assert next_event(events, lambda b: b.get("event") == "restored")["checkpoint"] == before
        assert out["handles"] == ["docs", "model", "self"]  # `more` is gone; `docs` is back, still revoked
        assert memory(rt, pid, "notes") == "one"
        spent = rt.operator.call("op.budget", {"pid": pid})
        assert spent["llm_calls"]["used"] > calls["llm_calls"]["used"]  # budget spent stays spent

        turn(rt, model, pid, "third", [READ_DOCS, {"tool": "fs_read", "args": {"path": "docs/a.txt"}, "cap": "more"}])
        *_, revoked, gone = seen.wait_for(5)
        assert revoked.error is not None and revoked.error.code == "EREVOKED"
        assert gone.error is not None and gone.error.code == "EPERM"
        # The model saw the conversation as it stood at the checkpoint, then the new input.
        first_of_third = next(r for r in model.requests if said(r)[-1:] == ["third"])
        assert said(first_of_third) == ["hello", "third"]
        assert first_of_third.messages[1]["role"] == "assistant"  # the checkpoint kept the model's answer
        assert first_of_third.system == "You keep notes."  # the Skill loaded since is taken back too

        shown = rt.operator.call("op.ckpt.show", {"checkpoint": before})
        assert (shown["pid"], shown["label"], shown["author"], shown["memory"]) == (pid, "before", "operator", ["notes"])
        assert shown["skills"] == []  # the checkpoint is a copy: the Skill loaded after it is not in it
        assert {h["handle"]: h["status"] for h in shown["handles"]} == {"docs": "EREVOKED", "model": "live",
                                                                         "self": "live"}
        assert [(c["checkpoint"], c["author"]) for c in rt.checkpoints(pid)] == [(before, "operator")]

        # A fork: the snapshot's conversation and memory, and only the caps granted now.
        child = rt.fork(before, caps=[Grant("fs", {"root": "docs"}, ["read"], name="own")], daemon=True)
        turn(rt, model, child, "forked", [{"tool": "fs_read", "args": {"path": "docs/a.txt"}, "cap": "own"}])
        assert said(model.requests[-1]) == ["hello", "forked"]
        assert memory(rt, child, "notes") == "one"
        assert sorted(c["handle"] for c in rt.caps(child)) == ["model", "own", "self"]
        assert seen.wait_for(6)[-1].value["text"] == "alpha"

        # Refusals: another process's checkpoint, an unknown one, a dead process.
        assert code_of(lambda: rt.restore(child, before)) == "EPERM"
        assert code_of(lambda: rt.restore(pid, "no-such")) == "ENOENT"
        assert code_of(lambda: rt.fork(999)) == "ENOENT"
        rt.kill(child)
        assert code_of(lambda: rt.checkpoint(child)) == "ENOENT"

    # Operator checkpoints outlive a restart, and the whole log replays to the same state.
    with session(tmp_path, Recording({})) as rt:
        assert [c["checkpoint"] for c in rt.checkpoints()] == [before]
        # The handle the restore dropped stays dropped: a restart does not hand it back.
        assert sorted(c["handle"] for c in rt.caps(pid) if not c["dropped"]) == ["docs", "model", "self"]
        rt.restore(pid, before)
    report = replay_log(tmp_path / "state" / "log.db", state_dir=tmp_path / "replay")
    assert report.sessions == 2 and report.notes == []
    assert report.state_hash == report.recorded_hash is not None


def test_an_outside_process_is_rolled_back_on_the_kernel_side(tmp_path: Path) -> None:
    with session(tmp_path) as rt:
        rt.register_image("x")
        pid, token = rt.spawn_external("x", caps=[DOCS])
        with rt.client(token) as c:
            c.call("mem.put", {"key": "k", "value": 1})
            mark = rt.checkpoint(pid)
            c.call("mem.put", {"key": "k", "value": 2})
            c.call("mem.put", {"key": "other", "value": 3})
            rt.revoke(pid, "docs")
            with rt.events(Topic("proc/")) as events:
                rt.restore(pid, mark)
                assert next_event(events, lambda b: b.get("event") == "restored")["pid"] == pid
            assert c.call("mem.list", {})["keys"] == ["k"] and c.call("mem.get", {"key": "k"})["value"] == 1
            assert code_of(lambda: c.call("fs.read", {"path": "docs/a.txt"}, cap="docs")) == "EREVOKED"
        # A process may restore a checkpoint the operator took of it, as one it took itself.
        own = Grant("checkpoint", {"target": "self"}, ["restore"], name="ck")
        rt.grant(pid, own)
        with rt.client(token) as c:
            c.call("mem.put", {"key": "k", "value": 5})
            c.call("ckpt.restore", {"checkpoint": mark}, cap="ck")
            assert c.call("mem.get", {"key": "k"})["value"] == 1


def test_a_checkpoint_is_a_copy_of_what_the_process_had(tmp_path: Path) -> None:
    """What a process adds after its checkpoint (a JIT tool, a Skill) is gone after a restore,
    taken by the process itself or by the operator."""
    (tmp_path / "state" / "skills" / "tidy").mkdir(parents=True)
    (tmp_path / "state" / "skills" / "tidy" / "SKILL.md").write_text("Keep notes tidy.\n")
    source = "export default async function (input, sys) { return 1 }"
    with session(tmp_path) as rt:
        rt.register_image("x")
        pid, token = rt.spawn_external("x", caps=[Grant("checkpoint", {"target": "self"}, ["create", "restore"],
                                                        name="ck")])
        with rt.client(token) as c:
            mine = c.call("ckpt.create", {"label": "bare"}, cap="ck")["checkpoint"]
            theirs = rt.checkpoint(pid, "bare-too")
            c.call("tool.define", {"name": "shout", "source": source})
            c.call("skill.load", {"name": "tidy"})
            assert c.call("tool.list", {})["jit"] == ["shout"]
            for ck in (mine, theirs):
                c.call("ckpt.restore", {"checkpoint": ck}, cap="ck")
                assert c.call("tool.list", {})["jit"] == []
                assert c.call("skill.list", {})["loaded"] == []
                c.call("tool.define", {"name": "shout", "source": source})
                c.call("skill.load", {"name": "tidy"})


def test_a_process_starting_with_skills_sees_their_instructions(tmp_path: Path) -> None:
    """An image's Skills, and a checkpoint's, give a new process their instructions, as skill.load does."""
    (tmp_path / "state" / "skills" / "tidy").mkdir(parents=True)
    (tmp_path / "state" / "skills" / "tidy" / "SKILL.md").write_text("Keep notes tidy.\n")
    (tmp_path / "state" / "skills" / "garbled").mkdir(parents=True)
    (tmp_path / "state" / "skills" / "garbled" / "SKILL.md").write_bytes(b"\xff\xfe not UTF-8")
    model = Answering({})
    with session(tmp_path, model) as rt:
        rt.register_image("d", prompt="You keep notes.", tools=["skill_load"])
        # A Skill gone or broken since is left out; the process still starts.
        rt.register_image("skilled", prompt="You keep notes.", skills=["tidy", "missing", "garbled"])
        pid = rt.spawn("d", daemon=True)
        turn(rt, model, pid, "hello", [{"tool": "skill_load", "args": {"name": "tidy"}}])
        ck = rt.checkpoint(pid)
        for start in (lambda: rt.fork(ck, daemon=True), lambda: rt.spawn("skilled", daemon=True)):
            new = start()
            turn(rt, model, new, "go", [])
            assert model.requests[-1].system == "You keep notes.\n\nKeep notes tidy."
        _, token = rt.spawn_external("d")
        with rt.client(token) as c:
            assert code_of(lambda: c.call("skill.load", {"name": "garbled"})) == "EINVAL"


def test_an_approval_cannot_use_a_cap_a_rollback_dropped(tmp_path: Path) -> None:
    with session(tmp_path) as rt:
        rt.register_image("x")
        pid, token = rt.spawn_external("x")
        mark = rt.checkpoint(pid)
        rt.grant(pid, Grant("fs", {"root": "docs"}, ["write"], approval="always", name="gate"))
        with rt.client(token) as c:
            asking = Asking(rt, c, pid, "fs.write", {"path": "docs/a.txt", "data": "x"}, cap="gate")
            rt.restore(pid, mark)  # `gate` was granted after the checkpoint: dropped
            rt.operator.call("op.approve", {"id": asking.id})
            reply = asking.reply()
        assert reply.error is not None and reply.error.code == "EPERM"
        assert (tmp_path / "world" / "docs" / "a.txt").read_text() == "alpha"


def test_a_hibernated_process_wakes_rolled_back(tmp_path: Path) -> None:
    model = Answering({})
    with session(tmp_path, model, hibernate_after_s=0.05) as rt:
        rt.register_image("d", prompt="You keep notes.", tools=["mem_put"])
        pid = rt.spawn("d", daemon=True)
        turn(rt, model, pid, "hello", [])
        mark = rt.checkpoint(pid)
        turn(rt, model, pid, "again", [])
        assert rt.host.wait_hibernated(pid, 30)
        rt.restore(pid, mark)
        assert pid in rt.host.hibernated  # it stays asleep; it wakes with the checkpoint's conversation
        turn(rt, model, pid, "third", [])
        assert said(model.requests[-1]) == ["hello", "third"]
