"""The JIT tool runner against a real Deno host: values, syscalls, errors, limits, concurrency, crashes."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from agentlibos.actors._jit import JitResult, JitRunner, JitSourceError, find_deno, validate_source

pytestmark = pytest.mark.skipif(find_deno() is None, reason="deno is not installed (pip install deno)")


@pytest.fixture(scope="module")
def runner() -> Iterator[JitRunner]:
    r = JitRunner(time_limit_ms=3000)
    r.start()
    yield r
    r.close()


class Kernel:
    """An in-process stand-in for the kernel: answers from a table and records every call."""

    def __init__(self, replies: dict[str, tuple[bool, Any, str | None, str]] | None = None) -> None:
        self.replies = replies or {}
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.lock = threading.Lock()

    def __call__(self, name: str, args: dict[str, Any]) -> tuple[bool, Any, str | None, str]:
        with self.lock:
            self.calls.append((name, args))
        if name in self.replies:
            return self.replies[name]
        return True, {"echo": args}, None, ""


def tool(body: str) -> str:
    return f"export default async function (input: any, sys: any) {{\n{body}\n}}\n"


def test_tool_returns_a_value(runner: JitRunner) -> None:
    k = Kernel()
    res = runner.call(tool("const n: number = input.n; return {double: n * 2, s: 'é'}"), {"n": 21}, k)
    assert res == JitResult(True, {"double": 42, "s": "é"}, None, "", res.elapsed_ms)
    assert k.calls == []


def test_one_syscall_gets_its_value(runner: JitRunner) -> None:
    k = Kernel({"fs.read": (True, {"text": "hello"}, None, "")})
    res = runner.call(
        tool("const r = await sys.call('fs.read', {path: input.p}); return r.text + '!'"), {"p": "a.txt"}, k
    )
    assert res.ok, res
    assert res.value == "hello!"
    assert k.calls == [("fs.read", {"path": "a.txt"})]


def test_bytes_cross_both_ways(runner: JitRunner) -> None:
    k = Kernel({"fs.read": (True, {"bytes": b"\x00\xffab"}, None, "")})
    res = runner.call(tool("const r = await sys.call('fs.read', {path: 'b'}); return r.bytes.slice(1)"), None, k)
    assert res.ok, res
    assert res.value == b"\xffab"


def test_syscall_error_propagates_with_its_code(runner: JitRunner) -> None:
    k = Kernel({"fs.read": (False, None, "EPERM", "no")})
    res = runner.call(tool("return await sys.call('fs.read', {path: 'x'})"), None, k)
    assert not res.ok
    assert res.code == "EPERM"
    assert "no" in res.message
    k2 = Kernel({"fs.read": (False, None, "ENOENT", "missing")})
    res2 = runner.call(tool("return await sys.call('fs.read', {path: 'x'})"), None, k2)
    assert res2.code == "ENOENT"


def test_a_tool_can_catch_a_syscall_error_and_continue(runner: JitRunner) -> None:
    k = Kernel({"fs.read": (False, None, "EPERM", "no"), "fs.list": (True, {"entries": []}, None, "")})
    src = tool(
        """
        let first;
        try { await sys.call('fs.read', {path: 'x'}); first = 'read'; }
        catch (e) { first = [e instanceof SyscallError, e instanceof sys.SyscallError, e.code, e.message]; }
        const listed = await sys.call('fs.list', {path: '.'});
        return {first, listed};
        """
    )
    res = runner.call(src, None, k)
    assert res.ok, res
    assert res.value == {"first": [True, True, "EPERM", "no"], "listed": {"entries": []}}
    assert [c[0] for c in k.calls] == ["fs.read", "fs.list"]


def test_concurrent_syscalls_inside_one_tool(runner: JitRunner) -> None:
    k = Kernel()
    src = tool(
        "const rs = await Promise.all([1, 2, 3].map((i) => sys.call('mem.get', {key: 'k' + i}))); return rs.map((r) => r.echo.key)"
    )
    res = runner.call(src, None, k)
    assert res.value == ["k1", "k2", "k3"]


def test_tool_errors_are_eio(runner: JitRunner) -> None:
    res = runner.call(tool("throw new RangeError('boom')"), None, Kernel())
    assert (res.ok, res.code) == (False, "EIO")
    assert "boom" in res.message
    res = runner.call(tool("return 1n"), None, Kernel())
    assert res.code == "EIO"
    res = runner.call("export default async function (input) { return ( }", None, Kernel())
    assert res.code == "EIO"


@pytest.mark.parametrize(
    ("source", "fragment", "code"),
    [
        ("x" * (64 * 1024 + 1) + "export default 1", "limit", "EINVAL"),
        ("async function f() {}", "export default", "EINVAL"),
        (b"export default async function () { return '\xff' }", "UTF-8", "EINVAL"),
        ("export default async function () { return '\ud800' }", "UTF-8", "EINVAL"),
        ("import x from 'node:fs';\nexport default async function () {}", "import", "EPERM"),
        ("export default async function () { return await import('node:fs') }", "import", "EPERM"),
        ("export * from 'file:///etc/x.ts';\nexport default async function () {}", "exports only", "EPERM"),
        ("export /* */ {a} from 'data:,';\nexport default async function () {}", "exports only", "EPERM"),
        ("/// <reference types='file:///x.d.ts' />\nexport default async function () {}", "pragma", "EPERM"),
    ],
)
def test_invalid_sources_are_rejected(runner: JitRunner, source: Any, fragment: str, code: str) -> None:
    with pytest.raises(ValueError, match=fragment) as info:
        validate_source(source)
    assert isinstance(info.value, JitSourceError) and info.value.code == code
    k = Kernel()
    res = runner.call(source, None, k)
    assert (res.ok, res.code) == (False, code)
    assert k.calls == []


def test_valid_source_passes_validation() -> None:
    validate_source(tool("return 1"))


def test_time_limit_then_the_next_call_works(runner: JitRunner) -> None:
    res = runner.call(tool("while (true) {}"), None, Kernel(), time_limit_ms=300)
    assert (res.ok, res.code) == (False, "ETIMEDOUT")
    assert 250 <= res.elapsed_ms < 3000
    pid = runner.host_pid
    res = runner.call(tool("return 'after'"), None, Kernel())
    assert res.value == "after"
    assert runner.host_pid == pid, "a timeout must not cost the host"


def test_a_never_settling_tool_times_out(runner: JitRunner) -> None:
    res = runner.call(tool("await new Promise(() => {})"), None, Kernel(), time_limit_ms=200)
    assert res.code == "ETIMEDOUT"


def test_concurrency_4_threads_x_10_calls(runner: JitRunner) -> None:
    src = tool("const r = await sys.call('mem.get', {key: input.key}); return [input.key, r.echo.key]")
    results: dict[int, list[JitResult]] = {}
    kernels: dict[int, Kernel] = {}
    barrier = threading.Barrier(4)

    def worker(t: int) -> None:
        kernels[t] = k = Kernel()
        barrier.wait()
        results[t] = [runner.call(src, {"key": f"t{t}-{i}"}, k) for i in range(10)]

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    for t in range(4):
        assert [r.value for r in results[t]] == [[f"t{t}-{i}"] * 2 for i in range(10)]
        # each thread's syscalls were made by that thread's own sys_call, never another's
        assert [c[1]["key"] for c in kernels[t].calls] == [f"t{t}-{i}" for i in range(10)]


def test_host_crash_recovery() -> None:
    with JitRunner() as r:
        assert r.call(tool("return 1"), None, Kernel()).value == 1
        pid = r.host_pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        assert r._host is not None
        r._host.proc.wait(timeout=10)
        res = r.call(tool("return 2"), None, Kernel())
        assert res.value == 2, res
        assert r.host_pid not in (None, pid)


def test_host_killed_during_a_call_returns_eio_then_recovers() -> None:
    with JitRunner() as r:
        started = threading.Event()

        def sys_call(name: str, args: dict[str, Any]) -> tuple[bool, Any, str | None, str]:
            assert r.host_pid is not None
            os.killpg(r.host_pid, signal.SIGKILL)  # the host and everything it started
            started.set()
            return True, {}, None, ""

        res = r.call(tool("await sys.call('x', {}); return 'unreachable'"), None, sys_call)
        assert started.is_set()
        assert (res.ok, res.code) == (False, "EIO")
        assert r.call(tool("return 3"), None, Kernel()).value == 3


def test_unbounded_allocation_is_eio_and_the_runner_recovers() -> None:
    with JitRunner(memory_mb=64, time_limit_ms=20000) as r:
        res = r.call(tool("const a = []; while (true) a.push(new Array(100000).fill(Math.random()));"), None, Kernel())
        assert (res.ok, res.code) in ((False, "EIO"), (False, "ETIMEDOUT"))
        assert r.call(tool("return 'alive'"), None, Kernel()).value == "alive"


def test_missing_deno_is_a_clear_error(tmp_path: Any) -> None:
    r = JitRunner(deno_path=str(tmp_path / "no-deno"))
    with pytest.raises(RuntimeError, match="deno not found"):
        r.start()
