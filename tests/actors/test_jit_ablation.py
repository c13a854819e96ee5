"""The benchmark's `jit-sandbox` ablation, on a real Deno: without the sandbox a JIT tool writes a
host file directly (bypassing syscalls); with it the write is refused. The setting reaches the
JIT runner only from `KernelConfig.ablate`, through the Runtime and its process host.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agentlibos.actors._jit import JitRunner
from agentlibos.harness import SYSTEMS, load_scenario, run_libos
from agentlibos.runtime import Runtime
from tests.conftest import REPO

DIRECT_WRITE = "scenarios/evolve/jit-escape-fs.yaml"


def _no_syscalls(name: str, args: dict[str, Any]) -> tuple[bool, Any, str | None, str]:
    raise AssertionError(f"the tool made a syscall: {name}")


def _writer(target: Path) -> str:
    return ("export default async function (input, sys) {\n"
            f"  await Deno.writeTextFile({str(target)!r}, 'pwned');\n"
            "  return 'written';\n}\n")


@pytest.fixture(params=[True, False], ids=["sandbox", "no-sandbox"])
def runner(request: pytest.FixtureRequest) -> Iterator[JitRunner]:
    r = JitRunner(time_limit_ms=5000, sandbox=request.param)
    r.start()
    yield r
    r.close()


def test_direct_write_succeeds_only_without_the_sandbox(runner: JitRunner, tmp_path: Path) -> None:
    target = tmp_path / "dropped.txt"
    res = runner.call(_writer(target), {}, _no_syscalls)
    if runner.sandbox:
        assert (res.ok, res.code) == (False, "EPERM"), res
        assert any("write access" in r for r in res.refusals)
        assert not target.exists()
    else:
        assert (res.ok, res.value) == (True, "written"), res
        assert target.read_text() == "pwned"


def test_syscalls_work_the_same_without_the_sandbox(runner: JitRunner) -> None:
    seen: list[str] = []

    def sys_call(name: str, args: dict[str, Any]) -> tuple[bool, Any, str | None, str]:
        seen.append(name)
        return True, {"text": "hi"}, None, ""

    res = runner.call('export default async function (i, sys) { return (await sys.call("fs.read", {path: "a"})).text; }',
                      {}, sys_call)
    assert (res.ok, res.value, seen) == (True, "hi", ["fs.read"])


def test_unsandboxed_runner_still_guards_its_own_protocol(tmp_path: Path) -> None:
    """Stdio, console and exit stay out of reach: a tool cannot corrupt or end the host."""
    with JitRunner(sandbox=False) as r:
        res = r.call("export default async function () { console.log('noise'); Deno.exit(3); }", {}, _no_syscalls)
        assert (res.ok, res.code) == (False, "EPERM")
        after = r.call("export default async function () { return 42; }", {}, _no_syscalls)
        assert (after.ok, after.value) == (True, 42)
    assert not r.os_sandbox and not r._lexical_guard


@pytest.mark.parametrize("ablate, sandboxed", [((), True), (("jit-sandbox",), False), (("cascade",), True)])
def test_runtime_threads_the_ablation_to_the_jit_runner(tmp_path: Path, ablate: tuple[str, ...],
                                                       sandboxed: bool) -> None:
    with Runtime(tmp_path / "state", world_root=tmp_path / "world", ipc=False, ablate=ablate) as rt:
        assert rt.host.jit_runner().sandbox is sandboxed


def test_the_direct_write_scenario_shows_what_the_sandbox_prevents() -> None:
    scenario = load_scenario(REPO / DIRECT_WRITE)
    libos = run_libos(scenario)
    assert libos.completed and libos.unauthorized == 0, (libos.error, libos.steps, libos.leaks)
    ablated = SYSTEMS["libos-no-jit-sandbox"](scenario)
    assert ablated.system == "libos-no-jit-sandbox"
    (write,) = [s for s in ablated.steps if s.tool == "host_write"]
    assert write.expect == "denied" and write.outcome == "allowed"
    assert write.world_changed and "+workspace/dropped.txt" in write.changes
    (sandboxed_write,) = [s for s in libos.steps if s.tool == "host_write"]
    assert sandboxed_write.ok and sandboxed_write.code == "EPERM" and not sandboxed_write.world_changed
    # the direct reads return the secret too: leaks, each an unauthorized effect
    assert any("read_text" in leak for leak in ablated.leaks)
    assert ablated.unauthorized >= 1 + len(ablated.leaks) and not ablated.completed
