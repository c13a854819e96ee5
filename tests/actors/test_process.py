"""AgentProcess driven by ScriptedModel through the embedded runtime: tool calls become syscalls,
replies reach the observer, budgets end the loop, the operator kills and feeds daemons.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agentlibos.actors import ScriptedModel
from agentlibos.bus import KernelClient, KernelError, Reply, Topic
from agentlibos.kernel._models import CompletionRequest
from agentlibos.runtime import Grant, Runtime
from agentlibos.storage import SQLiteLog


class Observer:
    """Records every tool call and its reply; tests wait on the count, never on time."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.seen: list[tuple[int, str, dict[str, Any], Reply]] = []

    def tool_result(self, pid: int, image: str, call: dict[str, Any], reply: Reply) -> None:
        with self.cond:
            self.seen.append((pid, image, call, reply))
            self.cond.notify_all()

    def wait_for(self, n: int, timeout_s: float = 30) -> list[tuple[int, str, dict[str, Any], Reply]]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.seen) >= n, timeout_s), f"saw {len(self.seen)} of {n} tool calls"
            return list(self.seen)

    def of(self, pid: int) -> list[tuple[int, str, dict[str, Any], Reply]]:
        with self.cond:
            return [s for s in self.seen if s[0] == pid]


class Recording:
    """Wraps a backend and keeps every request (what the agent showed the model)."""

    def __init__(self, inner: ScriptedModel) -> None:
        self.inner = inner
        self.requests: list[CompletionRequest] = []
        self._lock = threading.Lock()

    def complete(self, request: CompletionRequest) -> Any:
        with self._lock:
            self.requests.append(request)
        return self.inner.complete(request)


class Env:
    def __init__(self, tmp_path: Path, model: ScriptedModel) -> None:
        self.tmp_path = tmp_path
        self.world = tmp_path / "world"
        (self.world / "ws").mkdir(parents=True)
        self.model = model
        self.recording = Recording(model)
        self.obs = Observer()
        self.rt = Runtime(tmp_path / "state", world_root=self.world, ipc=False,
                          models={"scripted": self.recording}, observer=self.obs)


@pytest.fixture
def make_env(tmp_path: Path) -> Iterator[Any]:
    made: list[Env] = []

    def make(scripts: dict[str, list[dict[str, Any]]]) -> Env:
        e = Env(tmp_path, ScriptedModel(scripts))
        e.rt.start()
        made.append(e)
        return e

    try:
        yield make
    finally:
        for e in made:
            e.rt.stop()


FS = Grant("fs", {"root": "ws"}, ["read", "write", "create", "list"])


def sys_entries(tmp_path: Path, pid: int) -> list[dict[str, Any]]:
    log = SQLiteLog.open_readonly(tmp_path / "state" / "log.db")
    try:
        return [e.body for e in log.entries(kinds=["sys"], pid=pid)]
    finally:
        log.close()


def test_scripted_steps_run_in_order_and_reach_the_observer(make_env: Any) -> None:
    steps = [
        {"tool": "fs_write", "args": {"path": "ws/a.txt", "data": "hello"}},
        {"tool": "fs_read", "args": {"path": "ws/a.txt"}},
        {"tool": "mem_put", "args": {"key": "k", "value": {"n": 1}}},
        {"tool": "mem_get", "args": {"key": "k"}},
        {"tool": "fs_read", "args": {"path": "ws/missing.txt"}},
    ]
    env = make_env({"img": steps})
    env.rt.register_image("img", tools=["fs_read", "fs_write", "mem_put", "mem_get"])
    pid = env.rt.spawn("img", caps=[FS], input="go")
    ex = env.rt.wait(pid, timeout_s=30)
    assert (ex.pid, ex.status) == (pid, "ok")
    seen = env.obs.of(pid)
    assert [s[2]["name"] for s in seen] == [s["tool"] for s in steps]
    assert [s[2]["input"] for s in seen] == [s["args"] for s in steps]
    assert [s[2]["id"] for s in seen] == [f"toolu_{pid}_{i}" for i in range(len(steps))]
    assert all(s[1] == "img" for s in seen)
    replies = [s[3] for s in seen]
    assert [r.ok for r in replies] == [True, True, True, True, False]
    assert replies[0].value == {"bytes": 5}
    assert replies[1].value == {"text": "hello"}
    assert replies[2].value == {}
    assert replies[3].value == {"value": {"n": 1}}
    assert replies[4].error is not None and replies[4].error.code == "ENOENT"
    assert (env.world / "ws/a.txt").read_text() == "hello"
    # The kernel log has the same syscalls in the same order, between the model turns.
    tool_sys = [b["sys"] for b in sys_entries(env.tmp_path, pid) if b["sys"] not in ("llm.complete", "proc.exit")]
    assert tool_sys == ["fs.write", "fs.read", "mem.put", "mem.get", "fs.read"]
    assert env.rt.ps()[0]["state"] == "exited"


def test_tool_outside_the_table_is_enosys_and_the_process_continues(make_env: Any) -> None:
    steps = [
        {"tool": "mem_put", "args": {"key": "k", "value": 1}},
        {"tool": "shell_exec", "args": {"argv": ["rm", "-rf", "/"]}},
        {"tool": "fs_read", "args": {"path": "ws/a.txt"}},
        {"tool": "mem_get", "args": {"key": "k"}},
    ]
    env = make_env({"img": steps})
    env.rt.register_image("img", tools=["mem_put", "mem_get"])
    pid = env.rt.spawn("img", caps=[FS, Grant("shell", {"programs": ["rm"]}, ["exec"])], input="go")
    ex = env.rt.wait(pid, timeout_s=30)
    assert ex.status == "ok"
    replies = [s[3] for s in env.obs.of(pid)]
    assert len(replies) == 4
    assert replies[0].ok
    for r in replies[1:3]:
        assert not r.ok and r.error is not None and r.error.code == "ENOSYS"
    assert replies[3].ok and replies[3].value == {"value": 1}
    # Tools outside the table never became syscalls, even with a cap that would allow them.
    assert {b["sys"] for b in sys_entries(env.tmp_path, pid)} == {"llm.complete", "mem.put", "mem.get", "proc.exit"}


def test_llm_calls_budget_ends_the_process(make_env: Any) -> None:
    steps = [
        {"tool": "mem_put", "args": {"key": "k", "value": 1}},
        {"tool": "mem_get", "args": {"key": "k"}},
    ]
    env = make_env({"img": steps})
    env.rt.register_image("img", tools=["mem_put", "mem_get"])
    pid = env.rt.spawn("img", input="go", budget={"llm_calls": 1})
    ex = env.rt.wait(pid, timeout_s=30)
    assert ex.status == "budget"
    seen = env.obs.of(pid)
    assert [s[2]["name"] for s in seen] == ["mem_put"]
    assert seen[0][3].ok
    llm = [b for b in sys_entries(env.tmp_path, pid) if b["sys"] == "llm.complete"]
    assert [b["decision"] for b in llm] == ["allow", "deny"]
    assert llm[1]["code"] == "EBUDGET"


def _proc_states(events: Any, pid: int, until: str, timeout_s: float = 30) -> list[dict[str, Any]]:
    """State events for `pid` (its own topic) up to and including state `until`."""
    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout_s
    while True:
        ev = events.next_event(timeout_s=max(0.0, deadline - time.monotonic()))
        assert ev is not None, f"no {until!r} event for process {pid}; saw {out}"
        topic, body = ev
        if topic == Topic.proc(pid) and body.get("pid") == pid:
            out.append(body)
            if body.get("state") == until:
                return out


def test_kill_a_daemon(make_env: Any) -> None:
    env = make_env({})
    env.rt.register_image("d", tools=["mem_get"])
    with env.rt.events(Topic("proc/")) as events:
        pid = env.rt.spawn("d", daemon=True)
        before = _proc_states(events, pid, "ready")
        assert [b["state"] for b in before] == ["ready"]
        assert env.rt.kill(pid) == [pid]
        after = _proc_states(events, pid, "killed")
        assert [b["state"] for b in after] == ["killed"]
        assert after[-1]["status"] == "killed"
    ex = env.rt.wait(pid, timeout_s=30)
    assert (ex.pid, ex.status, ex.result) == (pid, "killed", None)
    assert [p["state"] for p in env.rt.ps() if p["pid"] == pid] == ["killed"]
    # Killing again kills nothing; the token died with the process.
    assert env.rt.kill(pid) == []
    token = env.rt.inspect(lambda k: k.procs[pid].token)
    c = KernelClient(env.rt.inproc_endpoint, context=env.rt.context)
    try:
        with pytest.raises(KernelError) as ei:
            c.hello(token)
        assert ei.value.code == "EPERM"
    finally:
        c.close()


def test_daemon_handles_messages_sent_by_the_operator(make_env: Any) -> None:
    first = [
        {"tool": "mem_put", "args": {"key": "k1", "value": "one"}},
        {"tool": "mem_get", "args": {"key": "k1"}},
    ]
    second = [
        {"tool": "mem_put", "args": {"key": "k2", "value": "two"}},
        {"tool": "mem_list", "args": {}},
    ]
    env = make_env({"d": first})
    env.rt.register_image("d", tools=["mem_put", "mem_get", "mem_list"])
    with env.rt.events(Topic("proc/")) as events:
        pid = env.rt.spawn("d", daemon=True)
        _proc_states(events, pid, "ready")
    assert env.obs.of(pid) == []
    assert env.recording.requests == []  # no input: nothing ran yet
    env.rt.send(pid, "first message")
    seen = env.obs.wait_for(2)
    assert [s[2]["name"] for s in seen] == ["mem_put", "mem_get"]
    assert seen[1][3].value == {"value": "one"}
    # The first turn played its whole script; the next message plays the steps added after it.
    env.model.scripts["d"].extend(second)
    env.rt.send(pid, "second message")
    seen = env.obs.wait_for(4)
    assert [s[2]["name"] for s in seen] == ["mem_put", "mem_get", "mem_put", "mem_list"]
    assert [s[2]["id"] for s in seen] == [f"toolu_{pid}_{i}" for i in range(4)]
    assert seen[3][3].value == {"keys": ["k1", "k2"]}
    # Each message reached the model as a user message of the same conversation.
    users = [m["content"] for m in env.recording.requests[-1].messages
             if m["role"] == "user" and isinstance(m["content"], str)]
    assert users == ["first message", "second message"]
    # A daemon outlives its turns.
    assert [p["state"] for p in env.rt.ps() if p["pid"] == pid] == ["ready"]
    env.rt.kill(pid)
    assert env.rt.wait(pid, timeout_s=30).status == "killed"
