"""Capabilities and budgets through the real embedded runtime (ZeroMQ bus, SQLite log): what a
process can do with its handles, what revocation reaches, and that every decision is logged.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agentlibos.bus import KernelClient, KernelError, Reply, Topic
from agentlibos.runtime import Grant, Runtime
from agentlibos.storage import SQLiteLog


class Proc:
    """A daemon process driven by the test: its syscalls, and each reply, for the log check."""

    def __init__(self, pid: int, client: KernelClient) -> None:
        self.pid = pid
        self.client = client
        self.calls: list[tuple[str, str | None, Reply]] = []

    def request(self, sys: str, args: dict[str, Any] | None = None, cap: str | None = None) -> Reply:
        reply = self.client.request(sys, args, cap=cap)
        self.calls.append((sys, cap, reply))
        return reply

    def call(self, sys: str, args: dict[str, Any] | None = None, cap: str | None = None) -> Any:
        return self.request(sys, args, cap).unwrap()

    def code(self, sys: str, args: dict[str, Any] | None = None, cap: str | None = None) -> str:
        with pytest.raises(KernelError) as ei:
            self.call(sys, args, cap)
        return ei.value.code


class World:
    def __init__(self, tmp_path: Path, rt: Runtime) -> None:
        self.tmp_path = tmp_path
        self.rt = rt
        self.root = tmp_path / "world"
        self.procs: list[Proc] = []

    def spawn(self, caps: list[Grant] = (), budget: dict[str, float] | None = None) -> Proc:  # type: ignore[assignment]
        # Attach only after the host's own connection for the process: a later hello from the
        # host would take the process's connection over from ours.
        with self.rt.events(Topic("proc/")) as events:
            pid = self.rt.spawn("x", caps=list(caps), budget=budget, daemon=True)
            while not self.rt.inspect(lambda k: k.procs[pid].conn is not None):
                assert events.next_event(timeout_s=30) is not None, f"process {pid} never attached"
        token = self.rt.inspect(lambda k: k.procs[pid].token)
        proc = Proc(pid, self.rt.client(token))
        self.procs.append(proc)
        return proc

    def file(self, rel: str, text: str) -> Path:
        p = self.root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
        return p

    def cap_id(self, pid: int, handle: str) -> int:
        return self.rt.inspect(lambda k: k.caps.by_handle(pid, handle).id)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    rt = Runtime(tmp_path / "state", world_root=tmp_path / "world", ipc=False)
    w = World(tmp_path, rt)
    with rt:
        rt.register_image("x")
        try:
            yield w
        finally:
            for p in w.procs:
                p.client.close()
    check_log(tmp_path / "state" / "log.db", w.procs)


def check_log(db: Path, procs: list[Proc]) -> None:
    """Every call made in the test has its `sys` entry: its decision, code and capability."""
    log = SQLiteLog.open_readonly(db)
    try:
        for proc in procs:
            sys_entries = list(log.entries(kinds=["sys"], pid=proc.pid))
            assert len(sys_entries) == len(proc.calls), [e.body for e in sys_entries]
            for (sys, cap, reply), entry in zip(proc.calls, sys_entries, strict=True):
                body = entry.body
                assert body["sys"] == sys
                if reply.ok:
                    assert body["decision"] == "allow", body
                    assert "code" not in body
                    # The reply cites the decision itself or the result entry it caused.
                    if reply.seq != entry.seq:
                        result = log.get(reply.seq)
                        assert result is not None and result.kind == "result" and result.cause == entry.seq
                    if cap is not None:
                        assert body["handle"] == cap and isinstance(body["cap"], int)
                else:
                    assert reply.seq == entry.seq
                    assert body["code"] == reply.error.code
                    # Denials are decisions; malformed and unknown requests are rejected before one.
                    if reply.error.is_denial:
                        assert body["decision"] == "deny", body
                    else:
                        assert body["decision"] in ("fail", "reject"), body
    finally:
        log.close()


def fs_grant(rights: list[str], name: str | None = None, **kw: Any) -> Grant:
    return Grant("fs", {"root": "ws"}, rights, name=name, **kw)


# --- the tests ---------------------------------------------------------------------------------


def test_cap_list_shows_self_model_and_grants(world: World) -> None:
    p = world.spawn([fs_grant(["read", "list"]), Grant("memory", {"namespace": "team"}, ["read"], name="team")])
    caps = {c["handle"]: c for c in p.call("cap.list")["caps"]}
    assert set(caps) == {"self", "model", "c1", "team"}
    assert caps["self"]["kind"] == "memory" and caps["self"]["scope"] == {"namespace": "self"}
    assert caps["model"]["kind"] == "llm" and caps["model"]["rights"] == ["complete"]
    assert caps["c1"] == {"handle": "c1", "kind": "fs", "scope": {"root": "ws"}, "rights": ["list", "read"],
                          "approval": "never", "expires": None, "uses": None, "revoked": False}
    # Another process sees only its own.
    q = world.spawn()
    assert {c["handle"] for c in q.call("cap.list")["caps"]} == {"self", "model"}


def test_derive_narrows_and_is_usable(world: World) -> None:
    world.file("ws/docs/a.md", "alpha")
    world.file("ws/src/b.py", "beta")
    p = world.spawn([fs_grant(["read", "write", "create"])])
    h = p.call("cap.derive", {"handle": "c1", "narrow": {"scope": {"root": "ws/docs"}, "rights": ["read"]}})["handle"]
    assert h == "c2"
    assert p.call("fs.read", {"path": "ws/docs/a.md"}, cap=h) == {"text": "alpha"}
    assert p.code("fs.read", {"path": "ws/src/b.py"}, cap=h) == "EPERM"
    assert p.code("fs.write", {"path": "ws/docs/a.md", "data": "x"}, cap=h) == "EPERM"
    p.call("fs.write", {"path": "ws/docs/new.md", "data": "n"}, cap="c1")
    assert (world.root / "ws/docs/new.md").read_text() == "n"
    named = p.call("cap.derive", {"handle": "self", "narrow": {"rights": ["read"]}, "as": "ro"})["handle"]
    assert named == "ro"
    p.call("mem.put", {"key": "k", "value": [1, 2]}, cap="self")
    assert p.call("mem.get", {"key": "k"}, cap="ro") == {"value": [1, 2]}
    assert p.code("mem.put", {"key": "k", "value": 3}, cap="ro") == "EPERM"


@pytest.mark.parametrize(
    "narrow",
    [{"scope": {"root": ""}}, {"scope": {"root": "other"}}, {"rights": ["read", "delete"]}, {"approval": "never"},
     {"uses": 10}],
)
def test_widening_narrow_is_eperm(world: World, narrow: dict[str, Any]) -> None:
    p = world.spawn([fs_grant(["read"], approval="always", uses=5)])
    assert p.code("cap.derive", {"handle": "c1", "narrow": narrow}) == "EPERM"
    assert {c["handle"] for c in p.call("cap.list")["caps"]} == {"self", "model", "c1"}


def test_revoke_cascades_down_the_chain_only(world: World) -> None:
    world.file("ws/a.txt", "A")
    p = world.spawn([fs_grant(["read"])])
    c2 = p.call("cap.derive", {"handle": "c1"})["handle"]
    c3 = p.call("cap.derive", {"handle": c2})["handle"]
    assert p.call("cap.revoke", {"handle": c2}) == {"revoked": 2}
    assert p.code("fs.read", {"path": "ws/a.txt"}, cap=c3) == "EREVOKED"
    assert p.code("fs.read", {"path": "ws/a.txt"}, cap=c2) == "EREVOKED"
    assert p.code("cap.derive", {"handle": c3}) == "EREVOKED"
    assert p.call("fs.read", {"path": "ws/a.txt"}, cap="c1") == {"text": "A"}
    assert p.call("fs.read", {"path": "ws/a.txt"}) == {"text": "A"}  # the kernel picks the live one
    views = {c["handle"]: c["revoked"] for c in p.call("cap.list")["caps"]}
    assert views == {"self": False, "model": False, "c1": False, c2: True, c3: True}


def test_operator_revoke_reaches_caps_granted_to_other_processes(world: World) -> None:
    world.file("ws/a.txt", "A")
    a = world.spawn([fs_grant(["read", "grant"]), fs_grant(["read"], name="nogrant")])
    b = world.spawn()
    assert a.code("cap.grant", {"handle": "nogrant", "to": b.pid}) == "EPERM"
    assert a.code("cap.grant", {"handle": "c1", "to": 999}) == "ENOENT"
    got = a.call("cap.grant", {"handle": "c1", "to": b.pid, "narrow": {"rights": ["read"]}})
    assert got["pid"] == b.pid
    hb = got["handle"]
    assert b.call("fs.read", {"path": "ws/a.txt"}, cap=hb) == {"text": "A"}
    # The granted copy has no grant right: b cannot pass it on.
    assert b.code("cap.grant", {"handle": hb, "to": a.pid}) == "EPERM"
    revoked = world.rt.revoke(a.pid, "c1")
    assert world.cap_id(a.pid, "c1") in revoked and world.cap_id(b.pid, hb) in revoked
    assert b.code("fs.read", {"path": "ws/a.txt"}, cap=hb) == "EREVOKED"
    assert b.code("fs.read", {"path": "ws/a.txt"}) == "EREVOKED"
    assert b.code("cap.derive", {"handle": hb}) == "EREVOKED"
    assert a.code("fs.read", {"path": "ws/a.txt"}, cap="c1") == "EREVOKED"
    assert a.call("fs.read", {"path": "ws/a.txt"}, cap="nogrant") == {"text": "A"}


def test_drop_closes_the_handle(world: World) -> None:
    world.file("ws/a.txt", "A")
    p = world.spawn([fs_grant(["read"])])
    c2 = p.call("cap.derive", {"handle": "c1"})["handle"]
    assert p.call("cap.drop", {"handle": "c1"}) == {}
    assert p.code("fs.read", {"path": "ws/a.txt"}, cap="c1") == "EPERM"
    assert p.code("cap.drop", {"handle": "c1"}) == "EPERM"
    # Dropping is not revoking: what was derived still works, and the next handle is new.
    assert p.call("fs.read", {"path": "ws/a.txt"}, cap=c2) == {"text": "A"}
    assert p.call("cap.derive", {"handle": c2})["handle"] not in ("c1", c2)
    p.call("cap.drop", {"handle": "self"})
    assert p.code("mem.put", {"key": "k", "value": 1}) == "EPERM"


def test_uses_run_out(world: World) -> None:
    world.file("ws/a.txt", "A")
    p = world.spawn([fs_grant(["read"], uses=2)])
    assert p.call("fs.read", {"path": "ws/a.txt"}, cap="c1") == {"text": "A"}
    assert p.call("fs.read", {"path": "ws/a.txt"}, cap="c1") == {"text": "A"}
    assert p.code("fs.read", {"path": "ws/a.txt"}, cap="c1") == "EEXPIRED"
    assert p.code("fs.read", {"path": "ws/a.txt"}) == "EEXPIRED"
    # A denied use consumes nothing; the count stays at zero.
    assert world.rt.inspect(lambda k: k.caps.by_handle(p.pid, "c1").uses) == 0


def test_deriving_is_not_a_use(world: World) -> None:
    # ABI: "Deriving is not a use: it consumes no `uses`".
    world.file("ws/a.txt", "A")
    p = world.spawn([fs_grant(["read", "grant"], uses=2)])
    q = world.spawn()
    child = p.call("cap.derive", {"handle": "c1", "narrow": {"rights": ["read"]}})["handle"]
    p.call("cap.grant", {"handle": "c1", "to": q.pid, "narrow": {"uses": 1}})
    parent_uses = world.rt.inspect(lambda k: k.caps.by_handle(p.pid, "c1").uses)
    child_uses = world.rt.inspect(lambda k: k.caps.by_handle(p.pid, child).uses)
    assert parent_uses == 2, f"cap.derive/cap.grant spent uses of c1: {parent_uses} left of 2"
    assert child_uses is not None and child_uses <= parent_uses
    assert p.call("fs.read", {"path": "ws/a.txt"}, cap="c1") == {"text": "A"}
    assert p.call("fs.read", {"path": "ws/a.txt"}, cap="c1") == {"text": "A"}


def test_expired_derivation(world: World) -> None:
    world.file("ws/a.txt", "A")
    p = world.spawn([fs_grant(["read"])])
    h = p.call("cap.derive", {"handle": "c1", "narrow": {"expires_in_s": 0}})["handle"]
    assert p.code("fs.read", {"path": "ws/a.txt"}, cap=h) == "EEXPIRED"
    assert p.code("cap.derive", {"handle": h}) == "EEXPIRED"


def test_budget_syscalls(world: World) -> None:
    p = world.spawn(budget={"syscalls": 3})
    p.call("mem.put", {"key": "k", "value": "v"})
    assert p.call("mem.get", {"key": "k"}) == {"value": "v"}
    view = p.call("budget.get")
    assert view["syscalls"]["limit"] == 3
    assert view["syscalls"]["used"] in (2, 3) and view["syscalls"]["remaining"] == 3 - view["syscalls"]["used"]
    assert view["llm_tokens"]["limit"] is None
    assert p.code("mem.get", {"key": "k"}) == "EBUDGET"
    assert p.code("budget.get") == "EBUDGET"
    after = world.rt.operator.call("op.budget", {"pid": p.pid})
    assert after["syscalls"]["used"] == 3 and after["syscalls"]["remaining"] == 0


def test_unheld_handle_is_eperm(world: World) -> None:
    world.file("ws/a.txt", "A")
    p = world.spawn([fs_grant(["read"])])
    assert p.code("fs.read", {"path": "ws/a.txt"}, cap="c99") == "EPERM"
    assert p.code("mem.get", {"key": "k"}, cap="c99") == "EPERM"
    assert p.code("cap.derive", {"handle": "c99"}) == "EPERM"
    assert p.code("cap.revoke", {"handle": "c99"}) == "EPERM"
    assert p.code("cap.drop", {"handle": "c99"}) == "EPERM"
    # A held handle of the wrong kind does not authorize either.
    assert p.code("fs.read", {"path": "ws/a.txt"}, cap="self") == "EPERM"
    # Another process's handle is not mine.
    q = world.spawn()
    assert q.code("fs.read", {"path": "ws/a.txt"}, cap="c1") == "EPERM"
    assert q.code("cap.revoke", {"handle": "c1"}) == "EPERM"
    assert p.call("fs.read", {"path": "ws/a.txt"}, cap="c1") == {"text": "A"}


def test_unknown_syscall_is_enosys(world: World) -> None:
    p = world.spawn()
    assert p.code("fs.chmod", {"path": "x"}) == "ENOSYS"
    assert p.code("op.spawn", {"image": "x"}) == "ENOSYS"  # operator requests are not syscalls
    assert p.code("cap.request", {}) == "EINVAL"  # served now: its arguments are checked


@pytest.mark.parametrize(
    ("sys", "args"),
    [
        ("fs.read", {"path": 5}),
        ("fs.read", {}),
        ("fs.read", {"path": "ws/a.txt", "bogus": 1}),
        ("mem.put", {"key": "k"}),
        ("mem.get", {"key": True}),
        ("cap.derive", {"handle": 1}),
        ("cap.derive", {"handle": "c1", "narrow": "read"}),
        ("cap.derive", {"handle": "c1", "narrow": {"ttl": 1}}),
        ("cap.derive", {"handle": "c1", "narrow": {"rights": "read"}}),
        ("cap.derive", {"handle": "c1", "narrow": {"scope": {"root": "../x"}}}),
        ("cap.derive", {"handle": "c1", "narrow": {"scope": {"bogus": 1}}}),
        ("cap.derive", {"handle": "c1", "narrow": {"uses": -1}}),
        ("cap.drop", {"handle": "c1", "extra": 1}),
        ("budget.get", {"dim": "syscalls"}),
    ],
)
def test_bad_args_are_einval(world: World, sys: str, args: dict[str, Any]) -> None:
    world.file("ws/a.txt", "A")
    p = world.spawn([fs_grant(["read"])])
    assert p.code(sys, args) == "EINVAL"
    assert p.call("fs.read", {"path": "ws/a.txt"}, cap="c1") == {"text": "A"}
