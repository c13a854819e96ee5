"""Providers through the real embedded runtime: shell, fs, memory, llm, and the budgets they
charge, exercised by external processes that make syscalls directly over the bus.
"""

from __future__ import annotations

import gc
import os
import stat
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from agentlibos.actors import ScriptedModel
from agentlibos.bus import KernelClient, KernelError, Topic
from agentlibos.kernel._models import Completion, CompletionRequest
from agentlibos.runtime import Grant, Runtime

SHELL_ENV = {"ALOS_FIXED": "fixed-value"}
MEM_LIMIT = 200_000_000


class Boom:
    """A model backend that fails: a provider exception the kernel must turn into EIO."""

    def complete(self, request: CompletionRequest) -> Any:
        raise RuntimeError("backend exploded")


class Env:
    """A runtime whose shell searches `bin/` first, plus helpers for external processes."""

    def __init__(self, tmp_path: Path, rt: Runtime, bin_dir: Path) -> None:
        self.tmp_path = tmp_path
        self.rt = rt
        self.bin = bin_dir
        self.world = tmp_path / "world"
        self.clients: list[KernelClient] = []

    def proc(self, caps: list[Grant | dict[str, Any]] = (), budget: dict[str, float] | None = None  # type: ignore[assignment]
             ) -> tuple[int, KernelClient]:
        pid, token = self.rt.spawn_external("x", caps=list(caps), budget=budget)
        c = self.rt.client(token)
        self.clients.append(c)
        return pid, c

    def file(self, rel: str, text: str, mode: int | None = None) -> Path:
        p = self.world / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
        if mode is not None:
            p.chmod(mode)
        return p

    def program(self, name: str, text: str) -> Path:
        p = self.bin / name
        p.write_text(text)
        p.chmod(0o755)
        return p


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (tmp_path / "world" / "ws").mkdir(parents=True)
    rt = Runtime(tmp_path / "state", world_root=tmp_path / "world", ipc=False,
                 path=(str(bin_dir), "/usr/bin", "/bin"), shell_env=dict(SHELL_ENV), shell_mem_bytes=MEM_LIMIT,
                 models={"scripted": ScriptedModel({}), "boom": Boom()})
    e = Env(tmp_path, rt, bin_dir)
    with rt:
        rt.register_image("x")
        try:
            yield e
        finally:
            for c in e.clients:
                c.close()


def code_of(c: KernelClient, sys: str, args: dict[str, Any] | None = None, cap: str | None = None) -> str:
    with pytest.raises(KernelError) as ei:
        c.call(sys, args, cap=cap)
    return ei.value.code


def shell(programs: list[str], **scope: Any) -> Grant:
    return Grant("shell", {"programs": programs, "cwd": "ws", **scope}, ["exec"])


def fs(rights: list[str], root: str = "ws", name: str | None = None, **scope: Any) -> Grant:
    return Grant("fs", {"root": root, **scope}, rights, name=name)


HELLO = '#!/bin/sh\necho "hello $*"\necho "to stderr" >&2\nexit 3\n'


# --- shell -------------------------------------------------------------------------------------


def test_shell_argv_must_be_a_list(env: Env) -> None:
    env.program("hello", HELLO)
    _, c = env.proc([shell(["hello"])])
    assert code_of(c, "shell.exec", {"argv": "hello world"}) == "EINVAL"
    assert code_of(c, "shell.exec", {"argv": []}) == "EINVAL"
    assert code_of(c, "shell.exec", {"argv": ["hello", 3]}) == "EINVAL"
    # The kernel still serves the well-formed call.
    assert c.call("shell.exec", {"argv": ["hello", "world"]})["stdout"] == "hello world\n"


def test_shell_returns_exit_code_stdout_stderr(env: Env) -> None:
    env.program("hello", HELLO)
    _, c = env.proc([shell(["hello"])])
    v = c.call("shell.exec", {"argv": ["hello", "a", "b c"]})
    assert v["exit_code"] == 3
    assert v["stdout"] == "hello a b c\n"
    assert v["stderr"] == "to stderr\n"


def test_shell_stdin_is_passed(env: Env) -> None:
    _, c = env.proc([shell(["cat"])])
    v = c.call("shell.exec", {"argv": ["cat"], "stdin": "line one\nline two\n"})
    assert (v["exit_code"], v["stdout"], v["stderr"]) == (0, "line one\nline two\n", "")
    # Without stdin the program reads end-of-file at once (it does not hang).
    assert c.call("shell.exec", {"argv": ["cat"]})["stdout"] == ""


def test_shell_argv0_resolution(env: Env) -> None:
    prog = env.program("hello", HELLO)
    # A same-named script in the cwd: never what the capability allowed.
    env.file("ws/hello", "#!/bin/sh\necho impostor\n", mode=0o755)
    _, c = env.proc([shell(["hello"])])
    assert c.call("shell.exec", {"argv": ["hello"]})["stdout"] == "hello \n"
    # Allowed by name, runs by absolute path too (same resolved program).
    assert c.call("shell.exec", {"argv": [str(prog), "abs"]})["stdout"] == "hello abs\n"
    assert code_of(c, "shell.exec", {"argv": ["./hello"]}) == "EPERM"
    assert code_of(c, "shell.exec", {"argv": [str(env.world / "ws" / "hello")]}) == "EPERM"
    # A name found on PATH but not in the allow-list.
    assert code_of(c, "shell.exec", {"argv": ["cat"]}) == "EPERM"
    # A name that resolves to nothing.
    assert code_of(c, "shell.exec", {"argv": ["no-such-program"]}) == "EPERM"


def test_shell_program_allowed_by_absolute_path_runs_by_name(env: Env) -> None:
    prog = env.program("hello", HELLO)
    _, c = env.proc([shell([str(prog)])])
    assert c.call("shell.exec", {"argv": ["hello", "n"]})["stdout"] == "hello n\n"


def test_shell_argv_patterns(env: Env) -> None:
    env.program("hello", HELLO)
    _, c = env.proc([shell(["hello"], argv=[["hello", "status", "**"], ["hello", "-n", "*"], ["hello", "**", "end"]])])
    ok = [["hello", "status"], ["hello", "status", "a", "b"], ["hello", "-n", "x"], ["hello", "end"],
          ["hello", "a", "b", "end"]]
    for argv in ok:
        assert c.call("shell.exec", {"argv": argv})["stdout"] == "hello " + " ".join(argv[1:]) + "\n", argv
    bad = [["hello"], ["hello", "push"], ["hello", "-n"], ["hello", "-n", "x", "y"], ["hello", "end", "more"],
           ["hello", "Status"]]
    for argv in bad:
        assert code_of(c, "shell.exec", {"argv": argv}) == "EPERM", argv


def test_shell_cwd_must_lie_inside_the_caps_cwd(env: Env) -> None:
    (env.world / "ws" / "sub").mkdir()
    (env.world / "other").mkdir()
    _, c = env.proc([shell(["pwd"])])
    ws = os.path.realpath(env.world / "ws")
    assert c.call("shell.exec", {"argv": ["pwd"]})["stdout"].strip() == ws
    assert c.call("shell.exec", {"argv": ["pwd"], "cwd": "ws/sub"})["stdout"].strip() == os.path.join(ws, "sub")
    assert code_of(c, "shell.exec", {"argv": ["pwd"], "cwd": "other"}) == "EPERM"
    assert code_of(c, "shell.exec", {"argv": ["pwd"], "cwd": ""}) == "EPERM"
    assert code_of(c, "shell.exec", {"argv": ["pwd"], "cwd": "ws/../other"}) == "EPERM"
    assert code_of(c, "shell.exec", {"argv": ["pwd"], "cwd": "/tmp"}) == "EPERM"


def test_shell_timeout_above_the_caps_is_eperm(env: Env) -> None:
    env.program("hello", HELLO)
    _, c = env.proc([shell(["hello"], timeout_s=5)])
    assert code_of(c, "shell.exec", {"argv": ["hello"], "timeout_s": 10}) == "EPERM"
    assert c.call("shell.exec", {"argv": ["hello"], "timeout_s": 5})["exit_code"] == 3
    assert c.call("shell.exec", {"argv": ["hello"], "timeout_s": 1})["exit_code"] == 3
    assert code_of(c, "shell.exec", {"argv": ["hello"], "timeout_s": 0}) == "EINVAL"


def _alive(pid: int) -> bool:
    """True while `pid` is a running process (a zombie nobody reaped has ended)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat_line.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def test_shell_timeout_kills_the_whole_process_group(env: Env) -> None:
    # The program leaves a background child behind, records its pid, then outlives its limit.
    env.program("sleeper", '#!/bin/sh\nsleep 60 &\necho $! > "$1"\nsleep 60\n')
    _, c = env.proc([shell(["sleeper"], timeout_s=5)])
    started = time.monotonic()
    assert code_of(c, "shell.exec", {"argv": ["sleeper", "child.pid"], "timeout_s": 1}) == "ETIMEDOUT"
    assert time.monotonic() - started < 30
    child = int((env.world / "ws" / "child.pid").read_text())
    deadline = time.monotonic() + 5
    gone = threading.Event()
    while _alive(child) and time.monotonic() < deadline:
        gone.wait(0.02)  # poll interval while waiting on the condition
    assert not _alive(child), f"background child {child} survived the timeout"
    # The kernel keeps serving.
    assert c.call("mem.list") == {"keys": []}


def test_shell_env_is_scrubbed(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALOS_ALLOWED", "yes")
    monkeypatch.setenv("ALOS_SECRET", "do-not-leak")
    _, c = env.proc([shell(["env"], env=["ALOS_ALLOWED", "ALOS_UNSET"])])
    out = c.call("shell.exec", {"argv": ["env"]})
    assert out["exit_code"] == 0
    seen = dict(line.split("=", 1) for line in out["stdout"].splitlines() if "=" in line)
    assert set(seen) == {"ALOS_ALLOWED", "ALOS_FIXED", "PATH"}, seen
    assert seen["ALOS_ALLOWED"] == "yes"
    assert seen["ALOS_FIXED"] == "fixed-value"
    assert seen["PATH"] == os.pathsep.join((str(env.bin), "/usr/bin", "/bin"))
    assert "do-not-leak" not in out["stdout"]


def test_shell_memory_limit(env: Env) -> None:
    _, c = env.proc([shell(["python3"])])
    big = c.call("shell.exec", {"argv": ["python3", "-c", "b = bytearray(2_000_000_000); print('allocated')"]})
    assert big["exit_code"] != 0
    assert "allocated" not in big["stdout"]
    assert "MemoryError" in big["stderr"]
    small = c.call("shell.exec", {"argv": ["python3", "-c", "b = bytearray(10_000_000); print('allocated')"]})
    assert small["exit_code"] == 0 and small["stdout"] == "allocated\n"
    assert c.call("mem.put", {"key": "k", "value": 1}) == {}


def test_slow_shell_exec_does_not_delay_other_processes(env: Env) -> None:
    _, b = env.proc()
    b.call("mem.put", {"key": "k", "value": "v"})
    pid_a, token_a = env.rt.spawn_external("x", caps=[shell(["sleep"], timeout_s=20)])
    outcome: dict[str, Any] = {}

    def run_a() -> None:
        a = env.rt.client(token_a)
        try:
            outcome["reply"] = a.request("shell.exec", {"argv": ["sleep", "10"], "timeout_s": 20}, timeout_s=None)
        except zmq.ContextTerminated:
            outcome["terminated"] = True
        except BaseException as exc:  # surfaced by the assertions below
            outcome["error"] = exc
        finally:
            a.close()

    thread = threading.Thread(target=run_a, name="process-a")
    with env.rt.events(Topic.audit()) as events:
        thread.start()
        deadline = time.monotonic() + 30
        while True:
            ev = events.next_event(timeout_s=max(0.0, deadline - time.monotonic()))
            assert ev is not None, "A's shell.exec was never decided"
            _, body = ev
            if body.get("pid") == pid_a and body.get("sys") == "shell.exec":
                assert body["decision"] == "allow"
                break
    t0 = time.monotonic()
    assert b.call("mem.get", {"key": "k"}) == {"value": "v"}
    elapsed = time.monotonic() - t0
    assert elapsed < 1.0, f"B's mem.get took {elapsed:.3f} s while A's shell.exec ran"
    assert thread.is_alive() and "reply" not in outcome, "A's 10 s call should still be in flight"
    for c in env.clients:  # the context terminates only once every socket is closed
        c.close()
    env.clients.clear()
    env.rt.stop()  # ends A's wait: its client sees the context terminate
    thread.join(30)
    assert not thread.is_alive()
    assert "error" not in outcome, outcome
    assert outcome.get("terminated") or outcome.get("reply") is not None


# --- fs ----------------------------------------------------------------------------------------


def test_fs_exclude_hides_git(env: Env) -> None:
    env.file("ws/.git/config", "[core]")
    env.file("ws/a.txt", "A")
    _, c = env.proc([fs(["read", "write", "create", "list", "delete"], exclude=[".git"])])
    assert c.call("fs.read", {"path": "ws/a.txt"}) == {"text": "A"}
    assert code_of(c, "fs.read", {"path": "ws/.git/config"}) == "EPERM"
    assert code_of(c, "fs.write", {"path": "ws/.git/config", "data": "x"}) == "EPERM"
    assert code_of(c, "fs.write", {"path": "ws/.git/hooks.sh", "data": "x"}) == "EPERM"
    assert code_of(c, "fs.delete", {"path": "ws/.git/config"}) == "EPERM"
    assert code_of(c, "fs.list", {"path": "ws/.git"}) == "EPERM"
    assert code_of(c, "fs.stat", {"path": "ws/.git"}) == "EPERM"
    assert code_of(c, "fs.mkdir", {"path": "ws/.git/x"}) == "EPERM"
    names = {e["name"] for e in c.call("fs.list", {"path": "ws"})["entries"]}
    assert names == {"a.txt"}
    assert (env.world / "ws/.git/config").read_text() == "[core]"
    assert not (env.world / "ws/.git/hooks.sh").exists()


def test_fs_paths_globs(env: Env) -> None:
    for rel in ("ws/src/m.py", "ws/src/deep/er/n.py", "ws/src/m.txt", "ws/docs/x.md", "ws/docs/sub/y.md", "ws/a.txt"):
        env.file(rel, rel)
    _, c = env.proc([fs(["read", "list"], paths=["src/**/*.py", "docs/*.md"])])
    for rel in ("ws/src/m.py", "ws/src/deep/er/n.py", "ws/docs/x.md"):
        assert c.call("fs.read", {"path": rel}) == {"text": rel}
    for rel in ("ws/src/m.txt", "ws/docs/sub/y.md", "ws/a.txt"):
        assert code_of(c, "fs.read", {"path": rel}) == "EPERM", rel
    # A directory no glob matches cannot itself be listed; the cap root neither.
    assert code_of(c, "fs.list", {"path": "ws/src"}) == "EPERM"
    assert code_of(c, "fs.list", {"path": "ws"}) == "EPERM"


def test_fs_list_hides_uncovered_entries(env: Env) -> None:
    for rel in ("ws/src/m.py", "ws/src/deep/n.py", "ws/src/m.txt", "ws/src/.git/config", "ws/docs/x.md"):
        env.file(rel, rel)
    _, c = env.proc([fs(["read", "list"], paths=["src", "src/**/*.py", "docs/*.md"], exclude=["src/.git"])])
    src = {e["name"]: e["type"] for e in c.call("fs.list", {"path": "ws/src"})["entries"]}
    # m.txt is not covered; deep stays visible as a directory; the excluded .git is hidden.
    assert src == {"m.py": "file", "deep": "dir"}
    _, whole = env.proc([fs(["list"], paths=["**"], exclude=["**/*.txt", "docs"])])
    top = {e["name"]: e["type"] for e in whole.call("fs.list", {"path": "ws"})["entries"]}
    assert top == {"src": "dir"}
    src = {e["name"]: e["type"] for e in whole.call("fs.list", {"path": "ws/src"})["entries"]}
    assert src == {"m.py": "file", "deep": "dir", ".git": "dir"}


def test_fs_write_needs_write_for_existing_and_create_for_new(env: Env) -> None:
    env.file("ws/old.txt", "old")
    _, c = env.proc([fs(["write"], name="w"), fs(["create"], name="cr"), fs(["read"], name="r")])
    assert c.call("fs.write", {"path": "ws/old.txt", "data": "new"}, cap="w") == {"bytes": 3}
    assert c.call("fs.write", {"path": "ws/old.txt", "data": "+", "mode": "a"}, cap="w") == {"bytes": 1}
    assert (env.world / "ws/old.txt").read_text() == "new+"
    assert code_of(c, "fs.write", {"path": "ws/fresh.txt", "data": "f"}, cap="w") == "EPERM"
    assert not (env.world / "ws/fresh.txt").exists()
    assert code_of(c, "fs.write", {"path": "ws/old.txt", "data": "x"}, cap="cr") == "EPERM"
    assert c.call("fs.write", {"path": "ws/fresh.txt", "data": "f"}, cap="cr") == {"bytes": 1}
    assert (env.world / "ws/fresh.txt").read_text() == "f"
    assert code_of(c, "fs.write", {"path": "ws/old.txt", "data": "x"}, cap="r") == "EPERM"
    assert code_of(c, "fs.write", {"path": "ws/old.txt", "data": "x", "mode": "x"}, cap="w") == "EINVAL"
    assert (env.world / "ws/old.txt").read_text() == "new+"


def test_fs_stat_delete_mkdir(env: Env) -> None:
    env.file("ws/f.txt", "12345")
    env.file("ws/full/x", "x")
    _, c = env.proc([fs(["list"], name="l"), fs(["write"], name="w"), fs(["delete"], name="d"),
                     fs(["create"], name="cr")])
    st = c.call("fs.stat", {"path": "ws/f.txt"}, cap="l")
    assert st["type"] == "file" and st["size"] == 5 and abs(st["mtime"] - (env.world / "ws/f.txt").stat().st_mtime) < 1
    assert c.call("fs.stat", {"path": "ws/full"}, cap="l")["type"] == "dir"
    assert code_of(c, "fs.stat", {"path": "ws/f.txt"}, cap="w") == "EPERM"
    assert code_of(c, "fs.delete", {"path": "ws/f.txt"}, cap="w") == "EPERM"
    assert c.call("fs.delete", {"path": "ws/f.txt"}, cap="d") == {}
    assert not (env.world / "ws/f.txt").exists()
    assert code_of(c, "fs.delete", {"path": "ws/full"}, cap="d") == "EINVAL"  # not empty
    assert (env.world / "ws/full/x").exists()
    assert code_of(c, "fs.mkdir", {"path": "ws/newdir"}, cap="d") == "EPERM"
    assert c.call("fs.mkdir", {"path": "ws/newdir"}, cap="cr") == {}
    assert (env.world / "ws/newdir").is_dir()
    assert code_of(c, "fs.mkdir", {"path": "ws/newdir"}, cap="cr") == "EEXIST"
    assert c.call("fs.delete", {"path": "ws/newdir"}, cap="d") == {}
    assert not (env.world / "ws/newdir").exists()


def test_fs_enoent_inside_a_cap_eperm_outside(env: Env) -> None:
    (env.world / "other").mkdir()
    _, c = env.proc([fs(["read", "list", "delete"], exclude=[".git"])])
    assert code_of(c, "fs.read", {"path": "ws/missing.txt"}) == "ENOENT"
    assert code_of(c, "fs.stat", {"path": "ws/missing.txt"}) == "ENOENT"
    assert code_of(c, "fs.delete", {"path": "ws/missing.txt"}) == "ENOENT"
    assert code_of(c, "fs.list", {"path": "ws/nodir"}) == "ENOENT"
    # Authorization before existence: a missing path no cap covers is a denial, not ENOENT.
    assert code_of(c, "fs.read", {"path": "other/missing.txt"}) == "EPERM"
    assert code_of(c, "fs.read", {"path": "nowhere/missing.txt"}) == "EPERM"
    assert code_of(c, "fs.read", {"path": "ws/.git/missing"}) == "EPERM"
    assert code_of(c, "fs.read", {"path": "ws/../other/missing.txt"}) == "EPERM"


def test_fs_bytes_written_budget(env: Env) -> None:
    _, c = env.proc([fs(["read", "write", "create"])], budget={"fs_bytes_written": 10})
    assert c.call("fs.write", {"path": "ws/a.txt", "data": "abcdef"}) == {"bytes": 6}
    # 4 bytes left: a 5-byte write is refused whole, before the effect.
    assert code_of(c, "fs.write", {"path": "ws/a.txt", "data": "12345"}) == "EBUDGET"
    assert (env.world / "ws/a.txt").read_text() == "abcdef"
    assert code_of(c, "fs.write", {"path": "ws/a.txt", "data": "12345", "mode": "a"}) == "EBUDGET"
    assert (env.world / "ws/a.txt").read_text() == "abcdef"
    assert code_of(c, "fs.write", {"path": "ws/b.txt", "data": "12345"}) == "EBUDGET"
    assert not (env.world / "ws/b.txt").exists()
    assert c.call("fs.write", {"path": "ws/a.txt", "data": "wxyz", "mode": "a"}) == {"bytes": 4}
    assert (env.world / "ws/a.txt").read_text() == "abcdefwxyz"
    view = c.call("budget.get")["fs_bytes_written"]
    assert view["limit"] == 10 and view["used"] == 10 and view["remaining"] == 0
    assert code_of(c, "fs.write", {"path": "ws/a.txt", "data": "z", "mode": "a"}) == "EBUDGET"
    assert c.call("fs.read", {"path": "ws/a.txt"}) == {"text": "abcdefwxyz"}


# --- memory ------------------------------------------------------------------------------------


def test_memory_self_namespaces_are_isolated(env: Env) -> None:
    team = Grant("memory", {"namespace": "team"}, ["read", "write", "list", "delete"])
    _, a = env.proc([team])
    _, b = env.proc([team])
    _, outsider = env.proc()
    a.call("mem.put", {"key": "k", "value": {"from": "a"}})
    assert code_of(b, "mem.get", {"key": "k"}) == "ENOENT"
    assert b.call("mem.list") == {"keys": []}
    b.call("mem.put", {"key": "k", "value": "b's"})
    assert a.call("mem.get", {"key": "k"}) == {"value": {"from": "a"}}
    assert b.call("mem.get", {"key": "k"}) == {"value": "b's"}
    assert b.call("mem.get", {"key": "k", "ns": "self"}) == {"value": "b's"}
    # The shared namespace is one store for both holders.
    a.call("mem.put", {"key": "shared", "value": [1, 2, 3], "ns": "team"})
    assert b.call("mem.get", {"key": "shared", "ns": "team"}) == {"value": [1, 2, 3]}
    assert code_of(b, "mem.get", {"key": "shared"}) == "ENOENT"  # not in b's self
    b.call("mem.delete", {"key": "shared", "ns": "team"})
    assert code_of(a, "mem.get", {"key": "shared", "ns": "team"}) == "ENOENT"
    assert code_of(outsider, "mem.get", {"key": "shared", "ns": "team"}) == "EPERM"
    assert code_of(outsider, "mem.put", {"key": "x", "value": 1, "ns": "team"}) == "EPERM"
    assert code_of(outsider, "mem.list", {"ns": "team"}) == "EPERM"


def test_memory_value_size_limit(env: Env) -> None:
    _, c = env.proc()
    assert c.call("mem.put", {"key": "ok", "value": "x" * 60_000}) == {}
    assert code_of(c, "mem.put", {"key": "big", "value": "x" * (64 * 1024 + 1)}) == "EINVAL"
    assert code_of(c, "mem.put", {"key": "big", "value": b"\x00" * (64 * 1024)}) == "EINVAL"
    assert code_of(c, "mem.get", {"key": "big"}) == "ENOENT"
    assert code_of(c, "mem.put", {"key": "", "value": 1}) == "EINVAL"
    assert code_of(c, "mem.put", {"key": "k" * 257, "value": 1}) == "EINVAL"
    assert c.call("mem.list") == {"keys": ["ok"]}


def test_memory_list_prefix_and_empty(env: Env) -> None:
    team = Grant("memory", {"namespace": "team"}, ["list"])
    _, c = env.proc([team])
    assert c.call("mem.list") == {"keys": []}
    assert c.call("mem.list", {"ns": "team"}) == {"keys": []}
    for k in ("a/2", "a/1", "b/1", "ab"):
        c.call("mem.put", {"key": k, "value": k})
    assert c.call("mem.list", {"prefix": "a/"}) == {"keys": ["a/1", "a/2"]}
    assert c.call("mem.list", {"prefix": "a"}) == {"keys": ["a/1", "a/2", "ab"]}
    assert c.call("mem.list", {"prefix": "zzz"}) == {"keys": []}
    assert c.call("mem.list") == {"keys": ["a/1", "a/2", "ab", "b/1"]}
    c.call("mem.delete", {"key": "ab"})
    assert code_of(c, "mem.delete", {"key": "ab"}) == "ENOENT"
    assert c.call("mem.list", {"prefix": "a"}) == {"keys": ["a/1", "a/2"]}


# --- llm ---------------------------------------------------------------------------------------

MSGS = [{"role": "user", "content": "hi"}]


def test_llm_needs_the_model_cap(env: Env) -> None:
    _, c = env.proc()
    v = c.call("llm.complete", {"messages": MSGS})
    assert isinstance(v["content"], list) and "stop_reason" in v
    assert c.call("llm.complete", {"messages": MSGS, "model": "scripted"}, cap="model")["content"] == v["content"]
    # A model outside the cap's `models` is a denial, even one a backend serves.
    assert code_of(c, "llm.complete", {"messages": MSGS, "model": "boom"}) == "EPERM"
    assert code_of(c, "llm.complete", {"messages": MSGS, "model": "gpt-other"}) == "EPERM"
    c.call("cap.drop", {"handle": "model"})
    assert code_of(c, "llm.complete", {"messages": MSGS}) == "EPERM"


def test_llm_max_tokens_above_the_caps_is_eperm(env: Env) -> None:
    _, c = env.proc([Grant("llm", {"models": ["scripted"], "max_tokens": 100}, ["complete"], name="small")])
    assert code_of(c, "llm.complete", {"messages": MSGS, "max_tokens": 200}, cap="small") == "EPERM"
    assert c.call("llm.complete", {"messages": MSGS, "max_tokens": 100}, cap="small")["content"]
    assert c.call("llm.complete", {"messages": MSGS, "max_tokens": 50}, cap="small")["content"]
    assert code_of(c, "llm.complete", {"messages": MSGS, "max_tokens": 0}, cap="small") == "EINVAL"


def test_llm_calls_budget(env: Env) -> None:
    _, c = env.proc(budget={"llm_calls": 1})
    c.call("llm.complete", {"messages": MSGS})
    assert code_of(c, "llm.complete", {"messages": MSGS}) == "EBUDGET"
    view = c.call("budget.get")["llm_calls"]
    assert view["limit"] == 1 and view["used"] == 1
    # Other syscalls do not draw on llm_calls.
    assert c.call("mem.list") == {"keys": []}


def test_llm_tokens_budget_checks_max_tokens_up_front(env: Env) -> None:
    _, c = env.proc(budget={"llm_tokens": 100})
    assert code_of(c, "llm.complete", {"messages": MSGS, "max_tokens": 101}) == "EBUDGET"
    assert c.call("llm.complete", {"messages": MSGS, "max_tokens": 100})["content"]


# --- wall clock --------------------------------------------------------------------------------


def test_wall_s_budget(env: Env) -> None:
    # 0.5 s rather than 0.2 s: the first calls must land inside the window even on a loaded host.
    limit = 0.5
    t0 = time.monotonic()
    _, c = env.proc(budget={"wall_s": limit})
    assert c.call("mem.put", {"key": "k", "value": 1}) == {}
    assert c.call("mem.get", {"key": "k"}) == {"value": 1}
    # Keep calling until the deadline denies; bounded, and never denied before the limit passed.
    deadline = t0 + 30
    denied_at = None
    while time.monotonic() < deadline:
        try:
            c.call("mem.get", {"key": "k"})
        except KernelError as exc:
            assert exc.code == "EBUDGET", exc
            denied_at = time.monotonic()
            break
    assert denied_at is not None, "wall_s never ran out"
    assert denied_at - t0 >= limit
    assert code_of(c, "budget.get") == "EBUDGET"
    assert code_of(c, "llm.complete", {"messages": MSGS}) == "EBUDGET"


# --- robustness --------------------------------------------------------------------------------


def test_provider_exception_is_eio_and_the_kernel_keeps_serving(env: Env) -> None:
    _, c = env.proc([Grant("llm", {"models": ["boom"]}, ["complete"], name="boom")])
    assert code_of(c, "llm.complete", {"messages": MSGS, "model": "boom"}, cap="boom") == "EIO"
    assert c.call("mem.put", {"key": "k", "value": 1}) == {}
    _, other = env.proc()
    assert other.call("llm.complete", {"messages": MSGS})["content"] is not None
    assert code_of(c, "llm.complete", {"messages": MSGS, "model": "boom"}) == "EIO"
    assert c.call("mem.get", {"key": "k"}) == {"value": 1}


def test_unexecutable_program_is_eio(env: Env) -> None:
    # Executable bit set, but no shebang and no valid binary format: exec fails (ENOEXEC).
    env.program("garbage", "")
    (env.bin / "garbage").write_bytes(b"\x7fELF\x00not-really-elf")
    _, c = env.proc([shell(["garbage"])])
    assert code_of(c, "shell.exec", {"argv": ["garbage"]}) == "EIO"
    assert c.call("mem.list") == {"keys": []}


def test_fs_read_of_a_fifo_fails_without_hanging(env: Env) -> None:
    fifo = env.world / "ws" / "pipe"
    os.mkfifo(fifo)
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    _, c = env.proc([fs(["read", "write"])])
    t0 = time.monotonic()
    assert code_of(c, "fs.read", {"path": "ws/pipe"}) in ("EINVAL", "EIO")
    assert code_of(c, "fs.write", {"path": "ws/pipe", "data": "x"}) in ("EINVAL", "EIO")
    assert time.monotonic() - t0 < 10
    assert c.call("mem.list") == {"keys": []}


def test_refused_hello_closes_the_client_socket(env: Env) -> None:
    """A client whose hello is refused must not leak its socket: a leaked socket keeps
    `zmq.Context.term()` (and so `Runtime.stop()`) waiting forever."""
    codes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            env.rt.client("not-a-token")
        except KernelError as exc:
            codes.append(exc.code)
        gc.collect()  # the half-built client is garbage now; its socket's __del__ reports a leak
    assert codes == ["EPERM"]
    leaked = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert leaked == [], f"KernelClient left its socket open after a refused hello: {leaked}"


class Counted:
    """A backend that reports 10 input + 5 output tokens per turn."""

    def complete(self, request: CompletionRequest) -> Any:
        return Completion(content=[{"type": "text", "text": "ok"}], stop_reason="end_turn",
                          usage={"input_tokens": 10, "output_tokens": 5}, model=request.model)


def test_llm_tokens_charge_is_the_reported_usage(tmp_path: Path) -> None:
    """`max_tokens` is checked up front; what is charged is what the turn used (15 tokens here),
    not the up-front amount plus the usage on top of it."""
    with Runtime(tmp_path / "state", world_root=tmp_path / "world", ipc=False, models={"counted": Counted()}) as rt:
        rt.register_image("x", model="counted")
        _, token = rt.spawn_external("x", budget={"llm_tokens": 1000})
        c = rt.client(token)
        try:
            assert c.call("llm.complete", {"messages": MSGS, "max_tokens": 100})["usage"]["output_tokens"] == 5
            used = c.call("budget.get")["llm_tokens"]["used"]
            assert used == 15, f"one turn that used 15 tokens was charged {used:g}"
        finally:
            c.close()
