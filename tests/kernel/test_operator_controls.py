"""Operator control of running agents and permission requests: cap.request inside a requestable
ceiling, interrupt (EINTR) with a follow-up, deadlines; each logged and replayable."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from agentlibos.bus import EventStream, KernelError, Topic
from agentlibos.kernel._replay import replay_log
from agentlibos.runtime import Grant, Runtime
from agentlibos.storage import SQLiteLog


@contextmanager
def runtime(tmp_path: Path) -> Iterator[Runtime]:
    world = tmp_path / "world"
    (world / "docs").mkdir(parents=True, exist_ok=True)
    (world / "docs" / "a.txt").write_text("alpha")
    (world / "secret.txt").write_text("secret")
    with Runtime(tmp_path / "state", world_root=world, ipc=False) as rt:
        rt.register_image("x")
        yield rt


def in_thread(rt: Runtime, token: str, sys: str, args: dict[str, Any]) -> tuple[threading.Thread, dict[str, Any]]:
    box: dict[str, Any] = {}

    def go() -> None:
        with rt.client(token) as c:  # a client is confined to the thread that made it
            try:
                box["value"] = c.call(sys, args)
            except KernelError as exc:
                box["error"] = exc

    t = threading.Thread(target=go)
    t.start()
    return t, box


def next_asked(events: EventStream, pid: int) -> dict[str, Any]:
    while True:
        ev = events.next_event(timeout_s=30)
        assert ev is not None, "no approval was asked"
        if ev[1].get("event") == "asked" and ev[1].get("pid") == pid:
            return ev[1]


def code_of(fn: Callable[[], Any]) -> str:
    with pytest.raises(KernelError) as ei:
        fn()
    return ei.value.code


READ_DOCS = Grant("fs", {"root": "docs"}, ["read"])


def test_cap_request_needs_a_ceiling_and_a_human(tmp_path: Path) -> None:
    with runtime(tmp_path) as rt:
        pid0, token0 = rt.spawn_external("x")
        with rt.client(token0) as c:  # no ceiling: EPERM, nobody is asked
            assert code_of(lambda: c.call("cap.request", {"kind": "fs", "scope": {"root": "docs"},
                                                          "rights": ["read"]})) == "EPERM"
        assert rt.operator.call("op.approvals")["approvals"] == []

        pid, token = rt.spawn_external("x", requestable=[READ_DOCS])
        with rt.client(token) as c:
            # Outside the ceiling (a right it does not list, a wider root): EPERM without asking.
            assert code_of(lambda: c.call("cap.request", {"kind": "fs", "scope": {"root": "docs"},
                                                          "rights": ["write"]})) == "EPERM"
            assert code_of(lambda: c.call("cap.request", {"kind": "fs", "scope": {"root": "."},
                                                          "rights": ["read"]})) == "EPERM"
            assert code_of(lambda: c.call("cap.request", {"kind": "nope", "scope": {}, "rights": ["x"]})) == "EINVAL"
            assert code_of(lambda: c.call("fs.read", {"path": "docs/a.txt"})) == "EPERM"
        with rt.events(Topic.approval()) as events:
            args = {"kind": "fs", "scope": {"root": "docs", "paths": ["a.txt"]}, "rights": ["read"],
                    "reason": "I need it \x1b[31mnow"}
            t, box = in_thread(rt, token, "cap.request", args)
            asked = next_asked(events, pid)
            shown = asked["rendering"]
            assert shown["request"] == {"kind": "fs", "scope": {"root": "docs", "paths": ["a.txt"]}, "rights": ["read"]}
            assert "\x1b" not in shown["reason_from_process"]
            rt.operator.call("op.approve", {"id": asked["id"], "author": "alice"})
            t.join(30)
        handle = box["value"]["handle"]
        with rt.client(token) as c:
            assert c.call("fs.read", {"path": "docs/a.txt"}, cap=handle)["text"] == "alpha"
            assert code_of(lambda: c.call("fs.read", {"path": "secret.txt"})) == "EPERM"
        (cap,) = [r for r in rt.caps(pid) if r["handle"] == handle]
        assert cap["via"] == "cap.request" and cap["approval"] == "never"

        # A human may say no.
        with rt.events(Topic.approval()) as events:
            t, box = in_thread(rt, token, "cap.request", {"kind": "fs", "scope": {"root": "docs"}, "rights": ["read"]})
            asked = next_asked(events, pid)
            rt.operator.call("op.deny", {"id": asked["id"], "reason": "not today"})
            t.join(30)
        assert box["error"].code == "EDENIED"
    log = SQLiteLog.open_readonly(tmp_path / "state" / "log.db")
    try:
        decided = [(e.body["decision"], e.body["author"]) for e in log.entries(kinds=["approval.decide"])]
    finally:
        log.close()
    assert decided == [("approve", "alice"), ("deny", "operator")]
    report = replay_log(tmp_path / "state" / "log.db", state_dir=tmp_path / "replay")
    assert report.state_hash == report.recorded_hash


def test_interrupt_ends_what_the_process_waits_on_or_its_next_call(tmp_path: Path) -> None:
    with runtime(tmp_path) as rt:
        gated = Grant("fs", {"root": "docs"}, ["read"], approval="always")
        pid, token = rt.spawn_external("x", caps=[gated])
        with rt.events(Topic.approval()) as events:
            t, box = in_thread(rt, token, "fs.read", {"path": "docs/a.txt"})
            next_asked(events, pid)
            assert rt.interrupt(pid) == 1
            t.join(30)
        assert box["error"].code == "EINTR"
        assert rt.operator.call("op.approvals")["approvals"] == []
        # Nothing waiting: the next syscall gets EINTR, the one after runs; proc.exit is never interrupted.
        assert rt.interrupt(pid) == 0
        with rt.client(token) as c:
            assert code_of(lambda: c.call("budget.get", {})) == "EINTR"
            assert "syscalls" in c.call("budget.get", {})
            assert rt.interrupt(pid) == 0
            c.call("proc.exit", {"status": "ok"})
        assert rt.wait(pid, timeout_s=30).status == "ok"
        assert code_of(lambda: rt.interrupt(pid)) == "ENOENT"
    report = replay_log(tmp_path / "state" / "log.db", state_dir=tmp_path / "replay")
    assert report.state_hash == report.recorded_hash


def test_a_deadline_kills_the_process(tmp_path: Path) -> None:
    with runtime(tmp_path) as rt:
        pid, _token = rt.spawn_external("x")
        assert rt.deadline(pid, None) is None
        assert code_of(lambda: rt.deadline(pid, -1)) == "EINVAL"
        with rt.events(Topic.proc(pid)) as events:
            assert rt.deadline(pid, 0.05) is not None
            ex = rt.wait(pid, timeout_s=30)
            seen = []
            while (ev := events.next_event(timeout_s=5)) is not None:
                seen.append(ev[1].get("event"))
                if "deadline" in seen:
                    break
        assert ex.status == "deadline"
        assert "deadline" in seen
    log = SQLiteLog.open_readonly(tmp_path / "state" / "log.db")
    try:
        assert [e.pid for e in log.entries(kinds=["proc.deadline"])] == [pid]
    finally:
        log.close()
    report = replay_log(tmp_path / "state" / "log.db", state_dir=tmp_path / "replay")
    assert report.state_hash == report.recorded_hash


def test_pending_approvals_survive_a_restart(tmp_path: Path) -> None:
    """An approval pending at a restart stays in the queue. The request it gated ended with the
    restart; when the (resumed) process sends it again, it waits on that same approval, or runs
    once without asking if a human already said yes to it."""
    from agentlibos.bus import BusError

    (tmp_path / "world" / "docs").mkdir(parents=True)
    (tmp_path / "world" / "docs" / "b.txt").write_text("beta")
    gated = Grant("fs", {"root": "docs"}, ["read"], approval="always")
    with runtime(tmp_path) as rt:
        pid, token = rt.spawn_external("x", caps=[gated])
        asked = []
        with rt.events(Topic.approval()) as events, rt.client(token) as c:
            for name in ("a.txt", "b.txt"):
                with pytest.raises(BusError):  # sent; the answer waits for a human
                    c.request("fs.read", {"path": f"docs/{name}"}, timeout_s=0.001)
                asked.append(next_asked(events, pid))
    with Runtime(tmp_path / "state", world_root=tmp_path / "world", ipc=False) as rt:
        pending = rt.operator.call("op.approvals")["approvals"]
        assert [(p["id"], p["pid"], p["sys"]) for p in pending] == [(a["id"], pid, "fs.read") for a in asked]
        assert pending[0]["rendering"]["path"] == asked[0]["rendering"]["path"]
        assert "restarted" in pending[0]["rendering"]["note"]
        assert [p["state"] for p in rt.ps() if p["pid"] == pid] == ["ready"]  # an outside process carries on
        (old_cap,) = [c for c in rt.caps(pid) if c["kind"] == "fs"]
        assert (old_cap["approval"], old_cap["revoked"], old_cap["dropped"]) == ("always", False, False)
        # A yes before the retry: the retry of exactly that request runs once, without asking.
        out = rt.operator.call("op.approve", {"id": asked[0]["id"], "author": "bob"})
        assert "retries" in out["note"]
        with rt.events(Topic.approval()) as events:
            with rt.client(token) as c:
                assert c.call("fs.read", {"path": "docs/a.txt"})["text"] == "alpha"
            # The retry of the other request waits on its surviving approval (nothing new is asked).
            t, box = in_thread(rt, token, "fs.read", {"path": "docs/b.txt"})
            deadline = time.monotonic() + 30
            while [p["state"] for p in rt.ps() if p["pid"] == pid] != ["blocked"]:  # attached: it waits
                assert time.monotonic() < deadline, "the retry never waited on the surviving approval"
            rt.operator.call("op.approve", {"id": asked[1]["id"]})
            t.join(30)
            # once used, the carried yes is gone: the same read asks again
            t2, box2 = in_thread(rt, token, "fs.read", {"path": "docs/a.txt"})
            again = next_asked(events, pid)
            rt.operator.call("op.deny", {"id": again["id"]})
            t2.join(30)
        assert box2["error"].code == "EDENIED"
        assert again["id"] > asked[1]["id"]
    log = SQLiteLog.open_readonly(tmp_path / "state" / "log.db")
    try:
        kinds = [(e.kind, e.body["id"]) for e in log.entries(kinds=["approval.reuse", "approval.attach"])]
        decided = [(e.body["id"], e.body["author"]) for e in log.entries(kinds=["approval.decide"])]
    finally:
        log.close()
    assert ("approval.reuse", asked[0]["id"]) in kinds
    assert decided[:2] == [(asked[0]["id"], "bob"), (asked[1]["id"], "operator")]
    assert ("approval.attach", asked[1]["id"]) in kinds
    assert box["value"]["text"] == "beta"


def test_shared_memory_survives_a_restart_and_self_memory_ends_with_its_process(tmp_path: Path) -> None:
    team = Grant("memory", {"namespace": "team"}, ["read", "write", "delete"])
    with runtime(tmp_path) as rt:
        _pid, token = rt.spawn_external("x", caps=[team])
        with rt.client(token) as c:
            c.call("mem.put", {"ns": "team", "key": "plan", "value": {"step": 1}})
            c.call("mem.put", {"ns": "team", "key": "gone", "value": 1})
            c.call("mem.delete", {"ns": "team", "key": "gone"})
            c.call("mem.put", {"key": "mine", "value": "private"})
            assert code_of(lambda: c.call("mem.put", {"ns": "other", "key": "k", "value": 1})) == "EPERM"
        rt.operator.call("op.mem.put", {"ns": "team", "key": "seed", "value": "from the operator"})
    with Runtime(tmp_path / "state", world_root=tmp_path / "world", ipc=False) as rt:
        _pid2, token2 = rt.spawn_external("x", caps=[team])
        with rt.client(token2) as c:
            assert c.call("mem.get", {"ns": "team", "key": "plan"})["value"] == {"step": 1}
            assert c.call("mem.get", {"ns": "team", "key": "seed"})["value"] == "from the operator"
            assert code_of(lambda: c.call("mem.get", {"ns": "team", "key": "gone"})) == "ENOENT"
            assert code_of(lambda: c.call("mem.get", {"key": "mine"})) == "ENOENT"  # a new process, a new self
        assert code_of(lambda: rt.operator.call("op.mem.get", {"ns": "other", "key": "k"})) == "ENOENT"


def test_outside_processes_carry_on_after_a_clean_restart(tmp_path: Path) -> None:
    """Stopped cleanly, the kernel records what lets external processes carry on: after the
    restart the same token says hello again, with the same caps, budget and ceiling."""
    reader = Grant("fs", {"root": "docs"}, ["read"])
    gone = Grant("fs", {"root": "."}, ["read"])
    with runtime(tmp_path) as rt:
        pid, token = rt.spawn_external("x", caps=[reader, gone], budget={"syscalls": 10},
                                       requestable=[READ_DOCS])
        hosted = rt.spawn("x", input="hi")
        rt.wait(hosted, timeout_s=30)
        with rt.client(token) as c:
            assert c.call("fs.read", {"path": "docs/a.txt"})["text"] == "alpha"
            handles = {h["handle"]: h for h in c.call("cap.list")["caps"]}
            gone_handle = next(h for h, v in handles.items() if v["kind"] == "fs" and v["scope"]["root"] != "docs")
            c.call("cap.drop", {"handle": gone_handle})
            used = c.call("budget.get")["syscalls"]["used"]
    with Runtime(tmp_path / "state", world_root=tmp_path / "world", ipc=False) as rt:
        assert [p["state"] for p in rt.ps() if p["pid"] == pid] == ["ready"]
        with rt.client(token) as c:
            assert c.call("fs.read", {"path": "docs/a.txt"})["text"] == "alpha"
            assert code_of(lambda: c.call("fs.read", {"path": "secret.txt"})) == "EPERM"  # the dropped cap stays gone
            assert code_of(lambda: c.call("fs.read", {"path": "x"}, cap=gone_handle)) == "EPERM"
            budget = c.call("budget.get")["syscalls"]
            assert budget["limit"] == 10 and budget["used"] == used + 4  # went on counting (denials count too)
            # the ceiling came back too (refused as outside it, not for having none)
            with pytest.raises(KernelError) as ei:
                c.call("cap.request", {"kind": "fs", "scope": {"root": "."}, "rights": ["read"]})
            assert ei.value.code == "EPERM" and "outside" in ei.value.message
            for _ in range(8):
                try:
                    c.call("budget.get")
                except KernelError as exc:
                    assert exc.code == "EBUDGET"
                    break
            else:
                raise AssertionError("the budget did not survive the restart")
        with pytest.raises(KernelError):
            rt.client("0" * 32)
    log = SQLiteLog.open_readonly(tmp_path / "state" / "log.db")
    try:
        states = [(e.body["state"], e.body.get("status")) for e in log.entries(kinds=["proc.state"], pid=pid)]
    finally:
        log.close()
    assert ("ready", "resumed after a restart") in states


@pytest.mark.parametrize("grant, why", [
    ({"kind": "fs", "scope": {"root": "docs"}, "rights": ["read"], "expires": 60}, "unknown field 'expires'"),
    ({"kind": "fs", "scope": {"root": "docs"}, "rights": ["read"], "expires_in_s": "soon"}, "expires_in_s"),
    ({"kind": "fs", "scope": {"root": "docs"}, "rights": ["read"], "uses": True}, "uses"),
    ({"kind": "fs", "scope": {"root": "docs"}, "rights": ["read"], "approval": "sometimes"}, "approval"),
    ({"kind": "fs", "scope": {"root": "docs"}, "rights": ["read"], "name": ""}, "handle name"),
    ({"kind": "nope", "scope": {}, "rights": []}, "unknown capability kind"),
])
def test_a_bad_grant_is_refused_and_makes_no_process(tmp_path: Path, grant: dict[str, Any], why: str) -> None:
    """A typo in a grant never yields a different capability (a cap that never expires) or a
    half-made process: the whole spawn is refused, naming the field."""
    with runtime(tmp_path) as rt:
        before = rt.ps()
        for args in ({"image": "x", "caps": [grant], "external": True},
                     {"image": "x", "requestable": [grant], "external": True}):
            with pytest.raises(KernelError) as ei:
                rt.operator.call("op.spawn", args)
            assert ei.value.code == "EINVAL" and why in ei.value.message
        assert rt.ps() == before
        pid, _token = rt.spawn_external("x")
        with pytest.raises(KernelError) as ei:
            rt.operator.call("op.grant", {"pid": pid, **grant})
        assert ei.value.code == "EINVAL"
        assert ("takes no argument 'expires'" if "expires" in grant else why) in ei.value.message
        assert [c for c in rt.caps(pid) if c["kind"] == "fs"] == []
