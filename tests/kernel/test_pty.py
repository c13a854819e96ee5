"""The pty provider on real pseudo-terminals, through the real embedded runtime and alone: the
program allow-list, sessions bound to the process that opened them, session capabilities,
closing on owner exit (the program's whole terminal session is killed), EOF after the program
exits, per-read bounds, and the log of every decision and result.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from agentlibos.bus import KernelClient, KernelError
from agentlibos.kernel._provider import CallInfo, Provider
from agentlibos.kernel._pty import make_pty_provider
from agentlibos.runtime import Runtime
from agentlibos.storage import SQLiteLog

PATH = ("/usr/bin", "/bin")
SH: dict[str, Any] = {"kind": "pty", "scope": {"programs": ["sh"]}, "rights": ["open", "read", "write", "close"]}


def alive(pid: int) -> bool:
    """True while `pid` is a running (non-zombie) process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2:].split()[0] not in (b"Z", b"X")


@contextmanager
def runtime(tmp_path: Path, caps: list[dict[str, Any]] | None = None, **kw: Any
            ) -> Iterator[tuple[Runtime, int, KernelClient]]:
    (tmp_path / "w").mkdir(exist_ok=True)
    prov = make_pty_provider(path=PATH, world_root=str(tmp_path / "w"), env={}, **kw)
    rt = Runtime(tmp_path / "s", world_root=tmp_path / "w", ipc=False, providers=[prov])
    with rt:
        rt.register_image("x")
        pid, token = rt.spawn_external("x", caps=[SH] if caps is None else caps)
        c = rt.client(token)
        try:
            yield rt, pid, c
        finally:
            c.close()


def code_of(c: KernelClient, sys: str, args: dict[str, Any]) -> str:
    with pytest.raises(KernelError) as ei:
        c.call(sys, args)
    return ei.value.code


def read_until(c: KernelClient, sid: str, needle: str, tries: int = 60) -> str:
    """Read (each read waits up to 1 s for output) until `needle` (a regex) matches; everything read.
    Needles never match the terminal's echo of the command that prints them."""
    out = ""
    for _ in range(tries):
        r = c.call("pty.read", {"session": sid, "timeout_s": 1.0})
        out += r["data"]
        if re.search(needle, out) or r.get("eof"):
            break
    assert re.search(needle, out), out
    return out


def read_to_eof(c: KernelClient, sid: str, tries: int = 60) -> tuple[str, dict[str, Any]]:
    out = ""
    for _ in range(tries):
        r = c.call("pty.read", {"session": sid, "timeout_s": 1.0})
        out += r["data"]
        if r.get("eof"):
            return out, r
    raise AssertionError(f"no eof after {tries} reads: {out!r}")


def shell_pids(c: KernelClient, sid: str) -> tuple[int, int]:
    """The shell's pid and a background job's pid (job control puts it in its own group)."""
    c.call("pty.write", {"session": sid, "data": "sleep 1000 & echo pids $$ $! end\n"})
    m = re.search(r"pids (\d+) (\d+) end", read_until(c, sid, r"pids \d+ \d+ end"))
    assert m is not None
    return int(m[1]), int(m[2])


# --- through the runtime -------------------------------------------------------------------------


def test_open_checks_the_program_allow_list(tmp_path: Path) -> None:
    with runtime(tmp_path) as (_, _, c):
        assert code_of(c, "pty.open", {"argv": ["cat"]}) == "EPERM"  # installed, not allowed
        assert code_of(c, "pty.open", {"argv": ["no-such-program-xyz"]}) == "EPERM"
        assert code_of(c, "pty.open", {"argv": ["sh", "-c", "exit 0"], "cols": 0}) == "EINVAL"
        sid = c.call("pty.open", {"argv": ["/bin/sh"]})["session"]  # the same program by path
        assert sid.startswith("pty-")
        c.call("pty.close", {"session": sid})


def test_a_session_is_a_real_terminal(tmp_path: Path) -> None:
    with runtime(tmp_path) as (_, _, c):
        sid = c.call("pty.open", {"argv": ["sh"], "cols": 101, "rows": 33})["session"]
        assert c.call("pty.write", {"session": sid, "data": "echo $((6*7))\n"}) == {"written": 14}
        read_until(c, sid, "42\r\n")  # the result, not the echoed input
        c.call("pty.write", {"session": sid, "data": "tty; stty size; pwd; echo TERM=$TERM\n"})
        out = read_until(c, sid, "TERM=xterm")
        assert "/dev/pts/" in out and "33 101" in out and str(tmp_path / "w") in out
        assert c.call("pty.close", {"session": sid})["exit_code"] is not None


def test_after_the_program_exits_reads_drain_then_eof(tmp_path: Path) -> None:
    with runtime(tmp_path) as (_, _, c):
        sid = c.call("pty.open", {"argv": ["sh"]})["session"]
        c.call("pty.write", {"session": sid, "data": "echo bye; exit 3\n"})
        out, last = read_to_eof(c, sid)
        assert "bye\r\n" in out and last["exit_code"] == 3
        assert c.call("pty.read", {"session": sid}) == {"data": "", "eof": True, "exit_code": 3}
        assert code_of(c, "pty.write", {"session": sid, "data": "echo again\n"}) == "EIO"
        assert c.call("pty.close", {"session": sid}) == {"exit_code": 3}
        assert code_of(c, "pty.read", {"session": sid}) == "ENOENT"
        assert code_of(c, "pty.close", {"session": sid}) == "ENOENT"


def test_other_processes_need_a_cap_on_the_session(tmp_path: Path) -> None:
    with runtime(tmp_path) as (rt, _, c):
        sid = c.call("pty.open", {"argv": ["sh"]})["session"]
        _, t_none = rt.spawn_external("x")  # no pty capability at all: the kernel denies
        _, t_own = rt.spawn_external("x", caps=[SH])  # its own pty cap names no session: run() denies
        reader_pid, t_reader = rt.spawn_external("x")
        rt.grant(reader_pid, {"kind": "pty", "scope": {"programs": [], "session": sid}, "rights": ["read"]})
        with rt.client(t_none) as none, rt.client(t_own) as own, rt.client(t_reader) as reader:
            for other in (none, own):
                assert code_of(other, "pty.read", {"session": sid, "timeout_s": 0}) == "EPERM"
                assert code_of(other, "pty.write", {"session": sid, "data": "echo x\n"}) == "EPERM"
                assert code_of(other, "pty.close", {"session": sid}) == "EPERM"
            assert code_of(own, "pty.read", {"session": "pty-999"}) == "EPERM"  # authorization before existence
            assert code_of(reader, "pty.open", {"argv": ["sh"]}) == "EPERM"  # a session cap opens nothing
            c.call("pty.write", {"session": sid, "data": "echo shared-$((1+1))\n"})
            read_until(reader, sid, "shared-2")  # the session cap reads ...
            assert code_of(reader, "pty.write", {"session": sid, "data": "exit\n"}) == "EPERM"  # ... but has no write
            assert code_of(reader, "pty.close", {"session": sid}) == "EPERM"
            assert code_of(reader, "pty.read", {"session": "pty-999"}) == "EPERM"  # it covers its session only
            c.call("pty.close", {"session": sid})
            assert code_of(reader, "pty.read", {"session": sid}) == "ENOENT"


def test_a_holder_of_both_kinds_of_cap_names_the_session_cap(tmp_path: Path) -> None:
    # covers() cannot tell the caller, so a cap without `session` covers every session and the
    # kernel's implicit choice may pick it; run() then refuses (not the caller's session). Naming
    # the session cap's handle picks it.
    with runtime(tmp_path) as (rt, _, c):
        sid = c.call("pty.open", {"argv": ["sh"]})["session"]
        other, token = rt.spawn_external("x", caps=[SH])
        handle = rt.grant(other, {"kind": "pty", "scope": {"session": sid}, "rights": ["read", "write"]})
        with rt.client(token) as o:
            assert code_of(o, "pty.write", {"session": sid, "data": "echo x\n"}) == "EPERM"
            assert o.call("pty.write", {"session": sid, "data": "echo both-$((3+4))\n"}, cap=handle) == {"written": 19}
            out = ""
            for _ in range(60):
                out += o.call("pty.read", {"session": sid, "timeout_s": 1.0}, cap=handle)["data"]
                if "both-7" in out:
                    break
            assert "both-7" in out
            assert code_of(o, "pty.close", {"session": sid}) == "EPERM"
        c.call("pty.close", {"session": sid})


def test_the_owner_exiting_closes_its_sessions(tmp_path: Path) -> None:
    with runtime(tmp_path) as (rt, pid, c):
        sid = c.call("pty.open", {"argv": ["sh"]})["session"]
        shell, job = shell_pids(c, sid)
        assert alive(shell) and alive(job)
        reader_pid, t_reader = rt.spawn_external("x")
        rt.grant(reader_pid, {"kind": "pty", "scope": {"session": sid}, "rights": ["read"]})
        c.call("proc.exit", {"status": "ok"})
        rt.wait(pid, timeout_s=30)
        # The whole terminal session is gone: the shell's group and the job's own group.
        assert not alive(shell) and not alive(job)
        with rt.client(t_reader) as reader:
            assert code_of(reader, "pty.read", {"session": sid}) == "ENOENT"


def test_kill_and_runtime_stop_close_sessions(tmp_path: Path) -> None:
    with runtime(tmp_path) as (rt, pid, c):
        sid = c.call("pty.open", {"argv": ["sh"]})["session"]
        killed_shell, killed_job = shell_pids(c, sid)
        rt.kill(pid)
        assert not alive(killed_shell) and not alive(killed_job)
        _, token = rt.spawn_external("x", caps=[SH])
        with rt.client(token) as c2:
            sid2 = c2.call("pty.open", {"argv": ["sh"]})["session"]
            shell, job = shell_pids(c2, sid2)
    assert not alive(shell) and not alive(job)  # the provider's close() at kernel stop


def test_each_read_is_bounded_by_log_bytes(tmp_path: Path) -> None:
    with runtime(tmp_path, log_bytes=16) as (_, _, c):
        sid = c.call("pty.open", {"argv": ["sh"]})["session"]
        c.call("pty.write", {"session": sid, "data": "echo 0123456789abcdefghijklmnopqrstuvwxyz$((1+1))\n"})
        seen, reads = "", 0
        while "xyz2\r\n" not in seen and reads < 200:
            r = c.call("pty.read", {"session": sid, "timeout_s": 1.0, "max_bytes": 4096})
            assert len(r["data"].encode()) <= 16
            seen += r["data"]
            reads += 1
        assert "0123456789abcdefghijklmnopqrstuvwxyz2\r\n" in seen and reads > 4
        assert code_of(c, "pty.read", {"session": sid, "max_bytes": 0}) == "EINVAL"
        assert code_of(c, "pty.read", {"session": sid, "timeout_s": -1}) == "EINVAL"
        c.call("pty.close", {"session": sid})


def test_decisions_and_results_are_logged(tmp_path: Path) -> None:
    with runtime(tmp_path) as (rt, _, c):
        assert code_of(c, "pty.open", {"argv": ["cat"]}) == "EPERM"
        sid = c.call("pty.open", {"argv": ["sh"]})["session"]
        c.call("pty.write", {"session": sid, "data": "echo logged-$((2*3))\n"})
        read_until(c, sid, "logged-6")
        _, t_own = rt.spawn_external("x", caps=[SH])
        with rt.client(t_own) as own:
            assert code_of(own, "pty.read", {"session": sid}) == "EPERM"
        c.call("pty.close", {"session": sid})
    with SQLiteLog.open_readonly(tmp_path / "s" / "log.db") as log:
        decisions = [e for e in log.entries(kinds=["sys"]) if str(e.body.get("sys", "")).startswith("pty.")]
        results = {e.cause: e for e in log.entries(kinds=["result"]) if str(e.body.get("sys", "")).startswith("pty.")}
        denied_open, opened = decisions[0], decisions[1]
        assert (denied_open.body["sys"], denied_open.body["decision"], denied_open.body["code"]) == ("pty.open", "deny", "EPERM")
        assert denied_open.seq not in results
        assert opened.body["decision"] == "allow"
        assert opened.body["detail"]["argv"] == ["sh"] and opened.body["detail"]["program"].startswith("/")
        assert log.payload(results[opened.seq].seq) == (True, {"session": sid})
        writes = [d for d in decisions if d.body["sys"] == "pty.write"]
        assert writes[0].body["detail"]["session"] == sid and writes[0].body["detail"]["owner"] == opened.pid
        reads = [d for d in decisions if d.body["sys"] == "pty.read" and d.pid == opened.pid]
        text = "".join(log.payload(results[d.seq].seq)[1]["data"] for d in reads)
        assert "logged-6" in text  # the output is in the log, read by read
        foreign = [d for d in decisions if d.body["sys"] == "pty.read" and d.pid != opened.pid]
        # Ownership is the effect's check (covers() does not know the caller): allowed, then EPERM.
        assert foreign and results[foreign[0].seq].body["ok"] is False and results[foreign[0].seq].body["code"] == "EPERM"
        closes = [d for d in decisions if d.body["sys"] == "pty.close"]
        assert closes and results[closes[0].seq].body["ok"] is True


# --- the provider alone --------------------------------------------------------------------------


def info(sys: str, pid: int = 1, scope: dict[str, Any] | None = None) -> CallInfo:
    return CallInfo(pid=pid, sys=sys, handle="c1", scope=SH["scope"] if scope is None else scope)


def provider(tmp_path: Path, **kw: Any) -> Provider:
    return make_pty_provider(path=PATH, world_root=str(tmp_path), env={}, **kw)


def shutdown(prov: Provider) -> None:
    assert prov.close is not None
    prov.close()


def test_provider_shape_and_config_validation(tmp_path: Path) -> None:
    prov = provider(tmp_path)
    assert prov.kind == "pty" and prov.on_exit is not None and prov.close is not None
    rows = {r.name: r for r in prov.syscalls}
    assert set(rows) == {"pty.open", "pty.write", "pty.read", "pty.close"}
    assert {n: r.rights for n, r in rows.items()} == {
        "pty.open": ("open",), "pty.write": ("write",), "pty.read": ("read",), "pty.close": ("close",)}
    assert all(r.kind == "pty" and r.provider == "ext" and r.budget == ("syscalls",) for r in rows.values())
    assert [(a.name, a.type, a.required) for a in rows["pty.read"].args] == [
        ("session", "str", True), ("timeout_s", "num", False), ("max_bytes", "int", False)]
    for bad in ({"log_bytes": 0}, {"max_sessions": 0}, {"default_timeout_s": 60.0}, {"write_timeout_s": 0}):
        with pytest.raises(ValueError):
            provider(tmp_path, **bad)


def test_covers(tmp_path: Path) -> None:
    prov = provider(tmp_path)
    sh = {"programs": ["sh"]}
    assert prov.covers(sh, "pty.open", {"argv": ["sh", "-i"]})
    assert prov.covers(sh, "pty.open", {"argv": ["/bin/sh"]})
    assert prov.covers({"programs": ["/usr/bin/sh"]}, "pty.open", {"argv": ["sh"]})
    assert not prov.covers(sh, "pty.open", {"argv": ["cat"]})
    assert not prov.covers(sh, "pty.open", {"argv": []})
    assert not prov.covers(sh, "pty.open", {"argv": ["sh\x00"]})
    assert not prov.covers({}, "pty.open", {"argv": ["sh"]})  # no programs: nothing to open
    assert not prov.covers({"programs": [], "session": "pty-1"}, "pty.open", {"argv": ["sh"]})
    for sys in ("pty.read", "pty.write", "pty.close"):
        assert prov.covers({"session": "pty-1"}, sys, {"session": "pty-1"})
        assert not prov.covers({"session": "pty-1"}, sys, {"session": "pty-2"})
        assert prov.covers(sh, sys, {"session": "pty-2"})  # owner-only: decided in run()
    assert not prov.covers(sh, "pty.resize", {"session": "pty-1"})


def test_on_exit_and_close_release_everything(tmp_path: Path, fd_guard: None) -> None:
    prov = provider(tmp_path)
    a = prov.run({"argv": ["sh"]}, info("pty.open", pid=1))["session"]
    b = prov.run({"argv": ["sh"]}, info("pty.open", pid=2))["session"]
    assert prov.run({"session": a, "data": "echo $$ end\n"}, info("pty.write", pid=1)) == {"written": 12}
    out = ""
    for _ in range(60):
        out += prov.run({"session": a, "timeout_s": 1.0}, info("pty.read", pid=1))["data"]
        if re.search(r"\d+ end", out):
            break
    m = re.search(r"(\d+) end", out)
    assert m is not None
    shell = int(m[1])
    assert alive(shell)
    with pytest.raises(KernelError) as ei:
        prov.run({"session": a, "timeout_s": 0}, info("pty.read", pid=2))
    assert ei.value.code == "EPERM"
    assert prov.on_exit is not None and prov.close is not None
    prov.on_exit(1)
    assert not alive(shell)
    with pytest.raises(KernelError) as ei:
        prov.run({"session": a, "timeout_s": 0}, info("pty.read", pid=1))
    assert ei.value.code == "ENOENT"
    assert prov.run({"session": b, "timeout_s": 0}, info("pty.read", pid=2))["data"] is not None  # b is untouched
    prov.close()
    with pytest.raises(KernelError) as ei:
        prov.run({"session": b, "timeout_s": 0}, info("pty.read", pid=2))
    assert ei.value.code == "ENOENT"


def test_close_during_a_waiting_read(tmp_path: Path, fd_guard: None) -> None:
    prov = provider(tmp_path)
    sid = prov.run({"argv": ["sh"]}, info("pty.open"))["session"]
    got: list[Any] = []
    started = threading.Event()

    def reader() -> None:
        started.set()
        try:
            while True:  # until the close ends the session
                r = prov.run({"session": sid, "timeout_s": 20.0}, info("pty.read"))
                if r.get("eof"):
                    got.append(r)
                    return
        except KernelError as exc:
            got.append(exc.code)

    t = threading.Thread(target=reader)
    t.start()
    started.wait(10)
    assert prov.run({"session": sid}, info("pty.close"))["exit_code"] is not None
    t.join(30)
    assert not t.is_alive()
    assert got and (got[0] == "ENOENT" or got[0]["eof"] is True)
    shutdown(prov)


def test_session_limit(tmp_path: Path, fd_guard: None) -> None:
    prov = provider(tmp_path, max_sessions=1)
    sid = prov.run({"argv": ["sh"]}, info("pty.open"))["session"]
    with pytest.raises(KernelError) as ei:
        prov.run({"argv": ["sh"]}, info("pty.open"))
    assert ei.value.code == "EIO"
    prov.run({"session": sid}, info("pty.close"))
    prov.run({"session": prov.run({"argv": ["sh"]}, info("pty.open"))["session"]}, info("pty.close"))
    shutdown(prov)
